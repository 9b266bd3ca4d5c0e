"""Run one JobActor directly: a memory store, the built-in models and tools, a person who
decides approvals. For tests of the actor's conversation and of continuing from a log."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import trio

from backstream.actors.clock import WallClock
from backstream.actors.config import Config
from backstream.actors.job import JobActor
from backstream.actors.joblog import JobLog
from backstream.actors.ports import ChatTurn, Model, OutputSink, TurnResult
from backstream.protocol.continuation import Continuation
from backstream.protocol.events import ApprovalRequiredEvent, LogEvent, TextEvent
from backstream.protocol.lifecycle import LogState
from backstream.protocol.records import JobProgress, JobRecord, JobRequest
from backstream.runtime.models.builtin import builtin_model
from backstream.runtime.stores.memory import MemoryStore
from backstream.runtime.tools.demo import send_note
from backstream.runtime.tools.registry import ToolRegistry

FAST = {"tokens_per_s": 1_000_000}  # the built-in models' words without waiting


class Ran(NamedTuple):
    actor: JobActor
    model: RecordingModel
    store: MemoryStore


class RecordingModel:
    """A real model, wrapped: it keeps each turn it was asked (with how many log entries the
    job had then) and each turn's result."""

    def __init__(self, inner: Model) -> None:
        self.inner = inner
        self.log: JobLog | None = None
        self.turns: list[tuple[ChatTurn, int]] = []
        self.results: list[TurnResult] = []

    async def run_turn(self, turn: ChatTurn, sink: OutputSink) -> TurnResult:
        assert self.log is not None
        self.turns.append((turn, self.log.last_seq))
        result = await self.inner.run_turn(turn, sink)
        self.results.append(result)
        return result


def tool_registry() -> ToolRegistry:
    tools = ToolRegistry.with_builtins()
    tools.register(send_note)  # needs approval
    return tools


def new_record(request: JobRequest, job_id: str = "j_1") -> JobRecord:
    return JobRecord(
        job_id=job_id,
        user="alice",
        thread_id="t",
        message_id=f"m_{job_id}",
        request=request,
        status="running",
        seq=0,
        epoch=1,
        content_length=0,
        created_at=1.0,
        updated_at=1.0,
    )


async def decide_approvals(log: JobLog, actor: JobActor, decisions: Sequence[bool | None]) -> None:
    """Decide each wait for approval in turn: approve, decline, or (None) let it time out."""
    for decision in decisions:
        while log.state is not LogState.AWAITING_APPROVAL:
            await trio.sleep(0.001)
        asked = [e for e in log.entries() if isinstance(e, ApprovalRequiredEvent)][-1]
        # A continued job may not wait yet when its log already says it does.
        while decision is not None and actor.decide(asked.call_id, decision) is None:
            await trio.sleep(0.001)
        while log.state is LogState.AWAITING_APPROVAL:
            await trio.sleep(0.001)


async def run_job(
    record: JobRecord,
    config: Config,
    *,
    decisions: Sequence[bool | None] = (),
    log: JobLog | None = None,
    stored: Sequence[LogEvent] = (),
    tools: ToolRegistry | None = None,
    continuation: Continuation = Continuation.INTERRUPT,
    model: Model | None = None,
) -> Ran:
    """Run the job to its end. ``log``: a rebuilt log to continue from (under
    ``continuation``); ``stored``: the entries the store holds already; ``model``: instead of
    the built-in model the request names."""
    store = MemoryStore()
    await store.open()
    await store.create_job(record)
    if stored:
        length = sum(len(e.text) for e in stored if isinstance(e, TextEvent))
        progress = JobProgress("running", len(stored), length, 1.0)
        await store.commit(record.job_id, stored, progress)
    model = RecordingModel(
        model
        or builtin_model(
            record.request.model, echo_rate=1_000_000, max_argument_chars=config.max_output_chars
        )
    )
    actor = JobActor(
        record,
        config=config,
        store=store,
        model=model,
        clock=WallClock(),
        tools=tools if tools is not None else tool_registry(),
        log=log,
        continuation=continuation,
    )
    model.log = actor.log
    async with trio.open_nursery() as nursery:
        nursery.start_soon(decide_approvals, actor.log, actor, decisions)
        await actor.run()
        nursery.cancel_scope.cancel()
    return Ran(actor, model, store)
