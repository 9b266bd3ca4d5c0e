"""A job whose instance died in the middle of a turn is taken over by a live runtime and
continued there, with the same job id: it ends with the same answer as an undisturbed run
(SQLite: the next runtime on the file; Redis: any instance, once the lease lapsed)."""

from __future__ import annotations

import contextlib
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

from backstream import Config, MemoryStore, Store, open_runtime
from backstream.actors.ports import Handover
from backstream.client import open_client
from backstream.protocol.conversation import INTERRUPTED_CALL_OUTPUT
from backstream.protocol.events import (
    ApprovalRequiredEvent,
    LogEvent,
    RewindEvent,
    StatusEvent,
    TextEvent,
    ToolCallEvent,
    ToolResultEvent,
)
from backstream.protocol.records import JobProgress, JobRecord, JobRequest, SharedCapacity
from backstream.runtime.stores.redis import RedisStore
from backstream.runtime.stores.sqlite import SqliteStore
from backstream.runtime.tools.demo import send_note
from backstream.runtime.tools.registry import ToolRegistry
from tests.conftest import delete_prefix, redis_url, require_redis
from tests.ws_helpers import served

FAST = {"tokens_per_s": 1_000_000}
CONFIG = Config(drain_timeout=0)


def lorem_request(words: int = 40, model: str = "backstream/lorem") -> JobRequest:
    return JobRequest(
        model=model, messages=({"role": "user", "content": "go"},), params={**FAST, "max_tokens": words}
    )


@asynccontextmanager
async def stores_on(kind: str, tmp_path: Any) -> AsyncIterator[Any]:
    """A ``sqlite`` file or a ``redis`` prefix of the test's own, as a maker of store
    objects on it (one per "instance")."""
    if kind == "sqlite":
        path = f"{tmp_path}/jobs.db"
        yield lambda: SqliteStore(path)
        return
    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    try:
        yield lambda: RedisStore(redis_url(), prefix=prefix)
    finally:
        await delete_prefix(prefix)


@pytest.fixture(params=["sqlite", "redis"])
async def place(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Any]:
    """Where jobs live, as a maker of store objects on it (``stores_on``)."""
    async with stores_on(request.param, tmp_path) as make:
        yield make


async def undisturbed(request: JobRequest) -> str:
    async with open_runtime(CONFIG, store=MemoryStore()) as rt:
        started = await rt.start_job(
            user="alice",
            thread_id="t",
            message_id="m",
            model=request.model,
            messages=request.messages,
            params=request.params,
        )
        handle = await rt._lookup(started.job.job_id, "alice")
        await handle.wait_until_ended()
        info = await rt.get_job(started.job.job_id, user="alice", include_content=True)
    assert info.job.status == "completed"
    return info.content or ""


async def plant_orphan(store: Store, request: JobRequest, entries: list[LogEvent]) -> JobRecord:
    """A job as an instance that died leaves it: live, its lease lapsed, ``entries`` durable."""
    async with opened(store):
        record = await plant_orphan_in(store, request, entries)
    as_if_killed(store, "i_dead")
    return record


async def plant_orphan_in(store: Store, request: JobRequest, entries: list[LogEvent]) -> JobRecord:
    """``plant_orphan`` through a store that is open (and stays so)."""
    now = time.time()
    record = JobRecord(
        job_id=f"j_{uuid.uuid4().hex[:10]}", user="alice", thread_id="t", message_id="m",
        request=request, status="running", seq=0, epoch=1, content_length=0,
        created_at=now - 2, updated_at=now - 2, owner="i_dead", lease_until=now - 1,
    )  # fmt: skip
    # Its lease ended a second ago (on Redis, leases are on Redis's clock: "a second ago" is
    # measured from the ``now`` the store is given).
    capacity = SharedCapacity(now=now, lease_until=now - 1, max_jobs=10, max_jobs_per_user=10)
    await store.create_job(record, capacity)
    length = sum(len(e.text) for e in entries if isinstance(e, TextEvent))
    await store.commit(record.job_id, entries, JobProgress("running", len(entries), length, now - 1))
    return record


def as_if_killed(store: Store, owner: str) -> None:
    """A SQLite store closed cleanly marks its live jobs handed off (no owner); the dead
    instance these tests play was killed, so its jobs keep its name."""
    if isinstance(store, SqliteStore):
        with contextlib.closing(sqlite3.connect(store.path)) as conn:
            conn.execute("UPDATE jobs SET owner = ? WHERE owner IS NULL", (owner,))
            conn.commit()


@asynccontextmanager
async def opened(store: Store) -> AsyncIterator[None]:
    """The store open, its background work running (a dead instance's, in these tests)."""
    await store.open()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            yield
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


def partial_log(answer: str, words: int) -> list[LogEvent]:
    said = answer.split(" ")[:words]
    entries: list[LogEvent] = [StatusEvent(seq=1, status="running")]
    entries += [TextEvent(seq=i + 2, text=w + " ") for i, w in enumerate(said)]
    return entries


async def run_until_ended(store: Store, job_id: str, config: Config = CONFIG) -> tuple[Any, Any, Any]:
    async with open_runtime(config, store=store) as rt:
        handle = await rt._lookup(job_id, "alice")
        with trio.fail_after(10):
            await handle.wait_until_ended()
        info = await rt.get_job(job_id, user="alice", include_content=True)
        _, log = await rt.job_log(job_id, user="alice")
        stats = rt.statistics()
    return info, log, stats


async def test_an_orphan_cut_mid_turn_is_continued_to_the_same_answer(place: Any) -> None:
    request = lorem_request()
    answer = await undisturbed(request)
    entries = partial_log(answer, 7)
    record = await plant_orphan(place(), request, entries)
    info, log, stats = await run_until_ended(place(), record.job_id)
    assert info.job.status == "completed" and info.content == answer
    assert info.job.job_id == record.job_id and info.job.epoch == 2  # the same job, one takeover
    assert list(log[: len(entries)]) == entries  # what was durable stands, seqs continue
    assert not any(isinstance(e, RewindEvent) for e in log)
    assert stats.keeper.continued_total == 1 and stats.jobs.continuations_total == {"prefill": 1}


async def test_restart_policy_withdraws_the_partial_turn(place: Any) -> None:
    request = lorem_request()
    answer = await undisturbed(request)
    entries = partial_log(answer, 5)
    record = await plant_orphan(place(), request, entries)
    config = Config(drain_timeout=0, continuations={"backstream/lorem": "restart"})
    info, log, stats = await run_until_ended(place(), record.job_id, config)
    assert info.job.status == "completed" and info.content == answer
    rewind = log[len(entries)]
    assert rewind == RewindEvent(seq=len(entries) + 1, to_seq=1, content_length=0)
    chars = sum(len(e.text) for e in entries if isinstance(e, TextEvent))
    assert stats.jobs.regenerated_chars_total == chars and stats.jobs.continuations_total == {"restart": 1}


def interrupting() -> Config:
    return Config(drain_timeout=0, continuations={"backstream/*": "interrupt"})


INTERRUPTING = interrupting()


@pytest.mark.parametrize(
    ("config", "epoch", "why"),
    [
        (INTERRUPTING, 1, "policy"),
        (attrs.evolve(CONFIG, max_continuations=2), 3, "limit"),  # taken over twice already
        (attrs.evolve(CONFIG, job_timeout=1.0), 1, "timeout"),  # created 2 s ago
    ],
)
async def test_an_orphan_not_to_continue_ends_interrupted(
    place: Any, config: Config, epoch: int, why: str
) -> None:
    request = lorem_request()
    answer = await undisturbed(request)
    entries = partial_log(answer, 3)
    store = place()
    record = await plant_orphan(store, request, entries)
    if epoch > 1:  # as if handed over before: its epoch counts the hand-overs
        await bump_epoch(place(), epoch)
    info, _, stats = await run_until_ended(place(), record.job_id, config)
    assert info.job.status == "interrupted" and info.content == "".join(
        e.text for e in entries if isinstance(e, TextEvent)
    )
    assert stats.keeper.continued_total == 0 and stats.keeper.recovered_total == 1


async def bump_epoch(store: Store, epoch: int) -> None:
    """Hand the orphan over (and let its lease lapse) until its epoch is ``epoch``."""
    async with opened(store):
        taken: list[Handover] = []
        while not taken or taken[0].record.epoch < epoch:
            now = time.time()
            owner = f"i_{uuid.uuid4().hex[:6]}"
            taken = await store.take_orphans(owner, now + 100, now - 1)
    as_if_killed(store, owner)


# -- tool calls ---------------------------------------------------------------------------------

CHARGES: list[str] = []


def charge_card(amount: int) -> str:
    """Charge the card (not idempotent: twice is twice the money)."""
    CHARGES.append(str(amount))
    return f"charged {amount}"


def tools_with_charge() -> ToolRegistry:
    tools = ToolRegistry.with_builtins()
    tools.register(charge_card, name="charge_card")
    tools.register(send_note)
    return tools


def tools_request(*tools: str) -> JobRequest:
    messages = ({"role": "user", "content": "what is 6*7?"},)
    return JobRequest(model="backstream/tools-demo", messages=messages, params=FAST, tools=tools)


async def test_a_call_cut_short_runs_again_only_if_its_tool_is_idempotent(place: Any) -> None:
    CHARGES.clear()
    entries: list[LogEvent] = [
        StatusEvent(seq=1, status="running"),
        ToolCallEvent(seq=2, call_id="c1", name="calculate", arguments='{"expression": "6*7"}'),
        ToolCallEvent(seq=3, call_id="c2", name="charge_card", arguments='{"amount": 5}'),
    ]
    record = await plant_orphan(place(), tools_request("calculate", "charge_card"), entries)
    async with open_runtime(CONFIG, store=place(), tools=tools_with_charge()) as rt:
        handle = await rt._lookup(record.job_id, "alice")
        with trio.fail_after(10):
            ended = await handle.wait_until_ended()
        _, log = await rt.job_log(record.job_id, user="alice")
    results = {e.call_id: e for e in log if isinstance(e, ToolResultEvent)}
    assert (results["c1"].output, results["c1"].is_error) == ("42", False)  # idempotent: run again
    assert (results["c2"].output, results["c2"].is_error) == (INTERRUPTED_CALL_OUTPUT, True)
    assert CHARGES == []  # never charged twice (nor once more here)
    assert ended.status == "completed"  # the model went on with both results


async def test_a_pending_approval_survives_the_takeover(place: Any) -> None:
    entries: list[LogEvent] = [
        StatusEvent(seq=1, status="running"),
        ToolCallEvent(seq=2, call_id="c1", name="send_note", arguments='{"to": "Ada", "text": "hi"}'),
        ApprovalRequiredEvent(seq=3, call_id="c1", name="send_note", arguments='{"to": "Ada", "text": "hi"}'),
        StatusEvent(seq=4, status="awaiting_approval"),
    ]
    record = await plant_orphan(place(), tools_request("send_note"), entries)
    async with open_runtime(CONFIG, store=place(), tools=tools_with_charge()) as rt:
        with trio.fail_after(10):
            await rt.approve(record.job_id, "c1", True, user="alice")
            ended = await (await rt._lookup(record.job_id, "alice")).wait_until_ended()
        _, log = await rt.job_log(record.job_id, user="alice")
    [result] = [e for e in log if isinstance(e, ToolResultEvent)]
    assert not result.is_error and "Ada" in result.output  # approved, then run once
    assert ended.status == "completed"


async def test_the_python_client_watch_applies_the_rewind(tmp_path: Any) -> None:
    """Watched over the wire from the start, a restarted turn's text is withdrawn by the
    ``rewind``: the watch's ``content`` is the answer; the text entries alone repeat it."""
    request = lorem_request(30)
    answer = await undisturbed(request)
    entries = partial_log(answer, 6)
    path = f"{tmp_path}/jobs.db"
    record = await plant_orphan(SqliteStore(path), request, entries)
    config = Config(drain_timeout=0, continuations={"backstream/lorem": "restart"})
    async with served(config, store=SqliteStore(path)) as srv, open_client(srv.url, "tok-alice") as client:
        joined = ""
        with trio.fail_after(10):
            async with client.watch(record.job_id) as batches:
                async for batch in batches:
                    joined += "".join(e.text for e in batch.events if isinstance(e, TextEvent))
                    rewinds = [e for e in batch.events if isinstance(e, RewindEvent)]
                    assert all(e.content_length == 0 for e in rewinds)
                content = batches.content
    partial = "".join(e.text for e in entries if isinstance(e, TextEvent))
    assert content == answer and joined == partial + answer


async def test_a_stopping_instance_hands_its_jobs_to_a_live_one_at_once() -> None:
    """On a shared store, a runtime that stops leaves its job running and ends its lease at
    once: the other instance continues it long before ``lease_ttl``, to the same answer, and
    a watcher there sees every entry once, never ``gone``."""
    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    request = JobRequest(
        model="backstream/lorem",
        messages=({"role": "user", "content": "go"},),
        params={"max_tokens": 60, "tokens_per_s": 40},
    )
    answer = await undisturbed(lorem_request(60))
    config = Config(drain_timeout=0, lease_ttl=60.0, lease_renew_interval=0.2)
    try:
        async with open_runtime(config, store=RedisStore(redis_url(), prefix=prefix)) as b:
            async with open_runtime(config, store=RedisStore(redis_url(), prefix=prefix)) as a:
                started = await a.start_job(
                    user="alice", thread_id="t", message_id="m", model=request.model,
                    messages=request.messages, params=request.params,
                )  # fmt: skip
                job_id = started.job.job_id
                await trio.sleep(0.4)  # some words written
            # a has stopped: its job is b's within a round, not after lease_ttl (60 s)
            text, seqs = "", []
            with trio.fail_after(10):
                async with b.watch(job_id, user="alice") as batches:
                    async for batch in batches:
                        text += batch.text
                        seqs.append((batch.from_seq, batch.to_seq))
            info = await b.get_job(job_id, user="alice", include_content=True)
            stats = b.statistics()
    finally:
        await delete_prefix(prefix)
    assert info.job.status == "completed" and info.content == text == answer and info.job.epoch == 2
    assert [f for f, _ in seqs] == [1] + [t + 1 for _, t in seqs[:-1]]
    assert stats.keeper.continued_total == 1


async def test_a_stop_hands_off_at_once_when_another_instance_is_alive_else_drains() -> None:
    """With another instance alive, a stopping runtime leaves its continuable jobs to it at
    once, whatever ``drain_timeout`` says; alone, it drains them as before (they finish).
    A hand-off is no crash: it does not count toward ``max_continuations`` (0 here)."""
    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    params = {"max_tokens": 40, "tokens_per_s": 40}  # about a second
    config = Config(drain_timeout=30, lease_ttl=60.0, lease_renew_interval=0.2, max_continuations=0)

    def store() -> RedisStore:
        return RedisStore(redis_url(), prefix=prefix)

    async def start(rt: Any, message_id: str) -> str:
        started = await rt.start_job(
            user="alice", thread_id="t", message_id=message_id, model="backstream/lorem",
            messages=({"role": "user", "content": "go"},), params=params,
        )  # fmt: skip
        await trio.sleep(0.3)  # some words written
        return str(started.job.job_id)

    try:
        async with open_runtime(config, store=store()) as b:
            async with open_runtime(config, store=store()) as a:
                assert await a.store.others_alive(a.instance_id, time.time())
                handed = await start(a, "m1")
                stopping_at = trio.current_time()
            took = trio.current_time() - stopping_at
            with trio.fail_after(10):
                await (await b._lookup(handed, "alice")).wait_until_ended()
            info = await b.get_job(handed, user="alice")
            record, _ = await b.job_log(handed, user="alice")
            assert record.handoffs == 1 and record.epoch_ends[0] > 1
            assert await b.store.others_alive(b.instance_id, time.time()) is False  # a withdrew
            drained = await start(b, "m2")
            stopping_at = trio.current_time()
        alone_took = trio.current_time() - stopping_at
        async with open_runtime(config, store=store()) as c:
            alone = await c.get_job(drained, user="alice")
    finally:
        await delete_prefix(prefix)
    assert took < 10  # not the 30 s drain
    assert info.job.status == "completed" and info.job.epoch == 2
    assert alone.job.status == "completed" and alone.job.epoch == 1  # finished while draining
    assert alone_took < 10  # the drain ended when the job did
