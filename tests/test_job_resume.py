"""A job log rebuilt from stored entries, and a job actor that continues from one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from backstream.actors.clock import WallClock
from backstream.actors.config import Config
from backstream.actors.job import JobActor
from backstream.actors.joblog import JobLog, OutputLimitExceeded
from backstream.protocol.events import (
    ApprovalRequiredEvent,
    LogEvent,
    StatusEvent,
    TextEvent,
    ToolCallEvent,
    ToolResultEvent,
)
from backstream.protocol.lifecycle import IllegalOrder, LogOrder, LogState
from backstream.protocol.records import JobRecord, JobRequest
from backstream.runtime.models.builtin import EchoModel
from backstream.runtime.stores.memory import MemoryStore
from backstream.runtime.tools.registry import ToolRegistry
from tests.job_harness import FAST, new_record, run_job, tool_registry

# -- JobLog.from_entries ---------------------------------------------------------------------


Pick = Callable[[Sequence[Any]], Any]  # chooses one of the options given
TEXTS = ["a", "bc", "abcabcab", "xyz" * 5]


def grow(log: JobLog, pick: Pick, steps: int) -> None:
    """Append up to ``steps`` entries the lifecycle allows where the log is, as ``pick``
    chooses; stop at the output limit or the end."""
    for i in range(steps):
        state = log.state
        if state is LogState.NOT_STARTED:
            log.append_status("running")
        elif state in (LogState.NEXT_TURN, LogState.MODEL_TURN, LogState.CALLS_ANNOUNCED):
            moves = ["text", "reasoning", "delta", "call", "failed"]
            moves += ["ask", "result"] if state is LogState.CALLS_ANNOUNCED else ["completed"]
            try:
                turn_step(log, pick(moves), pick(TEXTS), f"c{pick([i, i - 1])}")
            except OutputLimitExceeded:
                return
        elif state is LogState.APPROVAL_REQUESTED:
            log.append_status("awaiting_approval")
        elif state is LogState.AWAITING_APPROVAL:
            asked = [e for e in log.entries() if isinstance(e, ApprovalRequiredEvent)][-1]
            log.append_approval(asked.call_id, pick([True, False]))
        elif state is LogState.APPROVAL_DECIDED:
            log.append_status("running")
        elif state is LogState.TOOLS_ANSWERING:
            log.append_tool_result(f"r{i}", "calculate", pick(TEXTS) * 3, False)
        else:
            return


def turn_step(log: JobLog, move: str, text: str, call_id: str) -> None:
    if move == "text":
        log.append_text(text)
    elif move == "reasoning":
        log.append_reasoning(text)
    elif move == "delta":
        log.append_tool_call_delta(call_id, "calculate", text)
    elif move == "call":
        log.append_tool_call(call_id, "calculate", text)
    elif move == "ask":
        asked = [e for e in log.entries() if isinstance(e, ToolCallEvent)][-1]
        log.append_approval_required(asked.call_id, "send_note", "{}")
    elif move == "result":
        log.append_tool_result(call_id, "calculate", text * 3, False)
    else:
        log.append_status(move)  # type: ignore[arg-type]


def replaying(choices: list[int]) -> Pick:
    numbers = iter(choices * 3)
    return lambda options: options[next(numbers, 0) % len(options)]


def same_log(a: JobLog, b: JobLog) -> None:
    assert list(a.entries()) == list(b.entries())
    assert (a.state, a.status, a.terminal, a.content_length) == (
        b.state,
        b.status,
        b.terminal,
        b.content_length,
    )


@given(
    st.data(), st.integers(0, 40), st.sampled_from([20, 60, 1000]), st.lists(st.integers(0, 99), max_size=40)
)
def test_a_rebuilt_log_equals_the_log_it_was_stored_from(
    data: st.DataObject, steps: int, limit: int, then: list[int]
) -> None:
    """Same entries, state and budgets: whatever comes next is appended, cut or refused
    the same way in both."""
    original = JobLog("j", 1, max_output_chars=limit)
    grow(original, lambda options: data.draw(st.sampled_from(options)), steps)
    rebuilt = JobLog.from_entries("j", 1, original.entries(), max_output_chars=limit)
    same_log(original, rebuilt)
    for log in (original, rebuilt):  # the same choices for both
        grow(log, replaying(then), len(then))
    same_log(original, rebuilt)


def test_a_rebuilt_log_continues_with_the_next_seq() -> None:
    log = JobLog("j", 1, max_output_chars=10)
    log.append_status("running")
    log.append_text("abcdef")
    rebuilt = JobLog.from_entries("j", 1, log.entries(), max_output_chars=10)
    with pytest.raises(OutputLimitExceeded):
        rebuilt.append_text("ghijkl")  # the stored text counts toward the budget
    assert rebuilt.entries(2) == [TextEvent(seq=3, text="ghij")] and rebuilt.content() == "abcdefghij"


def test_stored_entries_out_of_order_or_with_gaps_are_refused() -> None:
    with pytest.raises(ValueError, match="entry 2 has seq 3"):
        JobLog.from_entries("j", 1, [StatusEvent(1, "running"), TextEvent(3, "a")], max_output_chars=10)
    with pytest.raises(IllegalOrder, match="'text' entry may not follow a log in state 'not_started'"):
        JobLog.from_entries("j", 1, [TextEvent(1, "a")], max_output_chars=10)


# -- a job actor continues from a rebuilt log ------------------------------------------------------

CONFIG = Config(max_output_chars=10_000)


def ask(text: str, tools: tuple[str, ...]) -> JobRequest:
    messages = ({"role": "user", "content": text},)
    return JobRequest(model="backstream/tools-demo", messages=messages, params=FAST, tools=tools)


def upto(entries: Sequence[LogEvent], state: LogState, nth: int = 1) -> list[LogEvent]:
    """The entries up to the ``nth`` time the log is in ``state``."""
    order = LogOrder()
    for i, entry in enumerate(entries):
        if order.advance(entry) is state:
            nth -= 1
            if nth == 0:
                return list(entries[: i + 1])
    raise AssertionError(f"the log is not in {state} that often")


async def resumed(record: JobRecord, prefix: list[LogEvent], usage: dict[str, Any] | None, **kw: Any) -> Any:
    """Run ``record``'s job from a log rebuilt from ``prefix`` (as a store would hold it)."""
    later = attrs.evolve(record, seq=len(prefix), usage=usage)
    log = JobLog.from_entries(record.job_id, record.epoch, prefix, max_output_chars=CONFIG.max_output_chars)
    return await run_job(later, CONFIG, log=log, stored=prefix, **kw)


async def test_a_job_continues_into_its_second_turn_as_if_never_stopped() -> None:
    record = new_record(ask("what is 6*7?", ("calculate",)))
    whole = await run_job(record, CONFIG)
    entries = list(whole.actor.log.entries())
    after_tools = upto(entries, LogState.NEXT_TURN, nth=2)  # the first turn's calls answered
    assert isinstance(after_tools[-1], ToolResultEvent)
    # The log records usage only at the end: the store gives the first turn's.
    again = await resumed(record, after_tools, whole.model.results[0].usage)
    assert list(again.actor.log.entries()) == entries
    assert [turn for turn, _ in again.model.turns] == [whole.model.turns[1][0]]  # the second turn only
    assert await again.store.read(record.job_id, 0, 100) == entries
    stored = await again.store.get_job(record.job_id)
    assert stored is not None and stored.status == "completed" and stored.seq == len(entries)
    terminal = whole.actor.log.terminal
    assert terminal is not None and terminal.usage is not None
    assert stored.content_length == len(whole.actor.log.content()) and stored.usage == terminal.usage


NOTE = ("send a note to Ada", ("send_note",))
BOTH = ("what is 6*7? and send a note to Ada", ("calculate", "send_note"))


@pytest.mark.parametrize(
    ("job", "stop_at", "decisions"),
    [
        (("what is 6*7?", ("calculate",)), LogState.CALLS_ANNOUNCED, []),
        (NOTE, LogState.APPROVAL_REQUESTED, [True]),  # the wait is not logged yet
        (NOTE, LogState.AWAITING_APPROVAL, [False]),
        (NOTE, LogState.APPROVAL_DECIDED, [True]),  # decided before the stop
        (BOTH, LogState.AWAITING_APPROVAL, [True]),
        (BOTH, LogState.TOOLS_ANSWERING, [True]),  # one result logged, one to come
    ],
)
async def test_a_turn_stopped_among_its_calls_is_finished_as_if_never_stopped(
    job: tuple[str, tuple[str, ...]], stop_at: LogState, decisions: list[bool]
) -> None:
    """Results and decisions the log holds stand; a wait for approval goes on (or is
    logged, if it was not yet) and the person's decision comes in as usual."""
    record = new_record(ask(*job))
    whole = await run_job(record, CONFIG, decisions=decisions)
    entries = list(whole.actor.log.entries())
    prefix = upto(entries, stop_at)
    decided_before = stop_at in (LogState.APPROVAL_DECIDED, LogState.TOOLS_ANSWERING)
    again = await resumed(
        record, prefix, whole.model.results[0].usage, decisions=[] if decided_before else decisions
    )
    assert list(again.actor.log.entries()) == entries
    assert [turn for turn, _ in again.model.turns] == [whole.model.turns[1][0]]
    assert await again.store.read(record.job_id, 0, 100) == entries


async def test_an_actor_refuses_a_log_it_cannot_continue() -> None:
    record = new_record(ask("what is 6*7?", ("calculate",)))
    model, tools = EchoModel(default_rate=1.0), tool_registry()
    ended: list[LogEvent] = [StatusEvent(1, "running"), StatusEvent(2, "aborted")]
    mid_turn: list[LogEvent] = [StatusEvent(1, "running"), TextEvent(2, "Let me")]
    other = JobLog("j_other", 1, max_output_chars=100)
    for log, why in [
        (JobLog.from_entries(record.job_id, 1, ended, max_output_chars=100), "the log has ended"),
        (
            JobLog.from_entries(record.job_id, 1, mid_turn, max_output_chars=100),
            "in the middle of a model turn",
        ),
        (other, "the log is job j_other's"),
    ]:
        with pytest.raises(ValueError, match=why):  # refused before it touches anything
            JobActor(
                record,
                config=CONFIG,
                store=MemoryStore(),
                model=model,
                clock=WallClock(),
                tools=tools,
                log=log,
            )


async def test_a_wait_the_log_shows_goes_on_though_the_tool_has_gone() -> None:
    """The log says a person is asked: the job waits for the answer, then gives the call
    the result of a tool that no longer exists."""
    record = new_record(ask(*NOTE))
    whole = await run_job(record, CONFIG, decisions=[True])
    prefix = upto(list(whole.actor.log.entries()), LogState.AWAITING_APPROVAL)
    log = JobLog.from_entries(record.job_id, 1, prefix, max_output_chars=CONFIG.max_output_chars)
    again = await run_job(
        attrs.evolve(record, seq=len(prefix)),
        CONFIG,
        log=log,
        stored=prefix,
        decisions=[True],
        tools=ToolRegistry.with_builtins(),
    )
    results = [e for e in again.actor.log.entries() if isinstance(e, ToolResultEvent)]
    assert [(r.output, r.is_error) for r in results] == [("tool 'send_note' does not exist", True)]
    assert again.actor.log.terminal is not None and again.actor.log.terminal.status == "completed"
