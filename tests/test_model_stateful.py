"""A stateful model test: random sequences of starts, watches, aborts, approvals and clock
ticks against a runtime, checked against a reference model of what the contract promises.

Hypothesis' rules are synchronous; the runtime lives in a ``trio.run`` on a thread of its
own (one per example) with a ``MockClock``. Each rule hands a coroutine to that loop and
waits for it. Between rules the clock is frozen (``autojump_threshold`` infinite): only
what needs no timer moves on. Rules that need time (ticks, watches, aborts, approvals)
turn autojump on while they run, so minutes of job time pass in milliseconds. A rule
that does not finish within ``REAL_TIMEOUT`` real seconds fails the example as a hang.

Invariants: every watch is contiguous from its cursor with no gap, repeat or reorder and
agrees with every other watch (``bench/history.py``); each job ends with exactly one
terminal status, the one the model predicts; ``job.get`` agrees with the log; another
user's job is ``not_found`` exactly like a missing one; capacity is never exceeded and
refused only at the limit; finished jobs go away after their retention, not before;
notifications are the ones the rules promise.

Over Redis (``TestRedisModel``) the store is a ``RedisStore`` on a redis-server of the
test's own (not the one on 6379: this one is stopped), and one more rule,
``lose_and_regain_store``, takes it away and gives it back: Redis killed and restarted from
its append-only file (fsync on every write), frozen (SIGSTOP) and woken, frozen and killed
a moment after it wakes (commits that landed whose replies never came), or every
connection of ours cut (CLIENT KILL); for 0.3 to 25 s of the runtime's time, within
``store_outage_limit`` (30 s), while jobs run, up to three watches opened before stay open
through it, and an abort, a decision or another user's requests may come meanwhile. The
invariants are the same: nothing is lost or written twice (watches contiguous, the stored
log read back whole at the end), each job ends as it would have, a running job's abort and
decision need no store, another user's job answers exactly as a missing one (both
``unavailable`` while Redis is down), capacity holds. What an outage may change, and the
model allows: a watch that reads the store (its job had ended) may end ``unavailable``; a
watch that closed while the store was away stays present in Redis until that presence
lapses (``lease_ttl``), which may spare its job a notification meanwhile; and through an
outage long enough for a watch's presence to lapse (``PRESENCE_MAY_LAPSE``), a job that
ends before the keeper renews it may be notified though watched. The rule ends ``SETTLE``
seconds after the store is back, when every write held up has landed.

Clocks: the runtime runs on the ``MockClock``, Redis on real time. ``RedisStore`` keeps
leases, capacity slots and retention as wall times that the runtime computes from its clock
and that Lua compares with the time the runtime passes in, so they follow the mock clock
and the model predicts them. What Redis times by itself is not modelled: the expiry of
finished jobs' keys (an hour after retention, for a store that no sweep reaches), the TTLs
of the ``seen`` and ``notified`` keys (an hour, a day) and coredis' keepalive of the
subscriber; an example's minutes of mock time take a second or two of real time, so none
of them comes due, and nothing here checks them. The clock does not jump while a request to
Redis awaits its reply (or a subscription its acknowledgement, which coredis times out
after a second on the clock), as it does not while a worker thread works; but for at most
``STALLED`` real seconds on end, and freely while Redis is frozen: a frozen Redis costs the
runtime the time the rule says, as it would for real.

Not modelled: an outage longer than ``store_outage_limit``. The code then ends the jobs
whose writes failed that long ``failed``/``unavailable`` in their process (watchers there
see that end), but writes that end only if the store answers the one last attempt as the
job stops: otherwise the store keeps the job ``running`` at its last durable seq until its
lease lapses, then orphan recovery ends it ``interrupted`` in epoch 2 right after what was
durable (and notifies that). Which jobs fail depends on when each
first failed to write (a job waiting for a decision writes nothing), and what ``job.get``
says depends on the lease; the model keeps to outages within the limit.

Needs ``redis-server`` and ``redis-cli``: under ``CI=true`` the Redis variant fails without
them, elsewhere it is skipped saying what to install.

``BACKSTREAM_MODEL_EXAMPLES`` (default 10; a third as many over SQLite, whose steps wait
for its worker threads in real time, and half as many over Redis) and ``BACKSTREAM_MODEL_STEPS`` (default 30) set the run's size,
``BACKSTREAM_MODEL_SHRINK=1`` shrinks a failure to a minimal one; e.g.
``BACKSTREAM_MODEL_EXAMPLES=500 pytest tests/test_model_stateful.py``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from typing import Any, ClassVar, TypeVar

import attrs
import outcome
import pytest
import trio
import trio.testing
from coredis.patterns.pubsub import PubSub
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import backstream
from backstream import Config, Store, open_runtime
from backstream.actors.ports import ChatTurn, OutputSink, TurnResult
from backstream.protocol.events import TERMINAL_STATUSES, ApprovalEvent, Batch
from backstream.runtime.models.turns import TurnCollector
from backstream.runtime.stores.memory import MemoryStore
from backstream.runtime.stores.redis import RedisStore
from backstream.runtime.stores.sqlite import SqliteStore
from backstream.runtime.tools.registry import ToolRegistry
from bench.history import History
from tests import sample_tools
from tests.conftest import redis_url
from tests.node_tools import require
from tests.test_redis_faults import RedisServer, own_redis

EXAMPLES = int(os.environ.get("BACKSTREAM_MODEL_EXAMPLES", "10"))
STEPS = int(os.environ.get("BACKSTREAM_MODEL_STEPS", "30"))
SHRINK = os.environ.get("BACKSTREAM_MODEL_SHRINK") == "1"
REAL_TIMEOUT = 60.0

USERS = ("alice", "bob", "carol")
MESSAGE_IDS = ("m0", "m1", "m2", "m3")
CONFIG = Config(
    max_jobs=4,
    max_jobs_per_user=2,
    job_timeout=60.0,
    approval_timeout=100.0,
    retention=300.0,
    sweep_interval=5.0,
    drain_timeout=0,
    flush_ms=50,
)
# Plans keep clear of the job timeout (60 s): short ones end well before, long ones well after.
PLANS = st.one_of(
    st.builds(lambda n, r: {"words": n, "rate": r}, st.integers(0, 12), st.sampled_from([1.0, 4.0])),
    st.builds(lambda n: {"words": n, "rate": 1.0}, st.integers(90, 120)),
    st.builds(lambda n: {"words": n, "rate": 2.0, "tool": True}, st.integers(1, 6)),
)

T = TypeVar("T")


def words(count: int) -> str:
    return "".join(f"w{i} " for i in range(count))


class ScriptedModel:
    """An embedder's model that follows the plan in the last user message: ``words`` words
    at ``rate`` per second, after one call of the ``delete_files`` tool (which needs a
    person's approval) when ``tool`` is set."""

    async def run_turn(self, turn: ChatTurn, sink: OutputSink) -> TurnResult:
        plan = json.loads(next(m["content"] for m in reversed(turn.messages) if m["role"] == "user"))
        collector = TurnCollector(sink, max_argument_chars=1000)
        if plan.get("tool") and not any(m.get("role") == "tool" for m in turn.messages):
            call = {
                "index": 0,
                "id": "c1",
                "function": {"name": "delete_files", "arguments": '{"a": 2, "b": 3}'},
            }
            collector.feed_chunk({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
            collector.feed_chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
            await trio.lowlevel.checkpoint()
            return collector.result()
        for i in range(plan["words"]):
            await trio.sleep(1 / plan["rate"])
            collector.feed_chunk({"choices": [{"index": 0, "delta": {"content": f"w{i} "}}]})
        await trio.lowlevel.checkpoint()
        collector.feed_chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        return collector.result()


def thread_aware_clock(busy: Callable[[], bool] = lambda: False) -> trio.testing.MockClock:
    """A ``MockClock`` that never autojumps while one of trio's worker threads works, or
    while ``busy()`` says other real work is under way (a request to Redis).

    Autojump takes "every task is blocked" to mean "only time can move things on"; a task
    that waits for a worker thread (SQLite's reads and writes) or for a server's reply is
    blocked too, and a jump then could expire a deadline that real time never would. The
    busy workers are read from trio's thread cache, and the jump is wrapped on the instance
    (``MockClock`` is final): private details, a test harness's business only."""
    clock = trio.testing.MockClock(autojump_threshold=math.inf)
    autojump = clock._autojump

    def jump_unless_a_thread_works() -> None:
        if not busy_worker_threads() and not busy():  # else the loop comes back here until done
            autojump()

    clock._autojump = jump_unless_a_thread_works  # type: ignore[method-assign]
    return clock


def busy_worker_threads() -> int:
    from trio._core._thread_cache import THREAD_CACHE, WorkerThread

    idle = THREAD_CACHE._idle_workers
    busy = 0
    for thread in threading.enumerate():
        worker = getattr(getattr(thread, "_target", None), "__self__", None)
        if isinstance(worker, WorkerThread) and worker not in idle:
            busy += 1
    return busy


class TrioLoop:
    """A ``trio.run`` with a ``MockClock`` on a thread of its own; runs coroutines for the
    synchronous rules, one at a time."""

    def __init__(self, busy: Callable[[], bool] = lambda: False) -> None:
        self.clock = thread_aware_clock(busy)
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        if not self._ready.wait(REAL_TIMEOUT):
            raise AssertionError("the trio loop did not start")

    def _main(self) -> None:
        try:
            trio.run(self._serve, clock=self.clock)
        except BaseException as exc:
            self._failure = exc
        finally:
            self._stopped.set()

    async def _serve(self) -> None:
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self.token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def run(self, fn: Callable[[], Awaitable[T]], *, timed: bool) -> T:
        """Run ``fn()`` in the loop; with ``timed``, the mock clock jumps while it waits."""
        done = threading.Event()
        result: list[outcome.Outcome[T]] = []

        async def task() -> None:
            self.clock.autojump_threshold = 0 if timed else math.inf
            try:
                result.append(await outcome.acapture(fn))
            finally:
                self.clock.autojump_threshold = math.inf
                done.set()

        self.token.run_sync_soon(lambda: self.nursery.start_soon(task))
        if not done.wait(REAL_TIMEOUT):
            raise AssertionError(
                f"a rule hung for {REAL_TIMEOUT} real seconds (mock time {self.clock.current_time()})"
            )
        return result[0].unwrap()

    def close(self) -> None:
        if not self._stopped.is_set():
            self.token.run_sync_soon(self._stop.set)
        if not self._stopped.wait(REAL_TIMEOUT):
            raise AssertionError("the trio loop did not stop")
        self._thread.join()
        if self._failure is not None:
            raise self._failure


@attrs.define
class ModelJob:
    """What the reference model knows about one job."""

    job_id: str
    user: str
    message_id: str
    plan: dict[str, Any]
    created: float  # trio time
    status: str = "running"
    ended_seen_at: float | None = None  # trio time of the first observation of its end
    finished_wall: float | None = None  # finished_at, wall time
    aborted: bool = False  # our abort returned aborted=True
    decision: bool | None = None  # our approval decision, once accepted
    gone: bool = False  # not_found after its retention
    end_watch_starts: list[float] = attrs.Factory(list)  # trio times our watches that delivered its end began
    watching: list[tuple[float, float]] = attrs.Factory(list)  # trio-time intervals of our watches


class LogRecorder(logging.Handler):
    """The runtime's warnings and errors during one example, for failure messages."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


def wall(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class RuntimeModel(RuleBasedStateMachine):
    store_kind = "memory"
    exact_timing = True
    """Memory: no work leaves the trio thread, so mock time tells exactly when a sweep or a
    notification check runs. With a store on worker threads (``thread_aware_clock``) those
    can still run a step or two of mock time late; there the model only checks that they
    do not happen early."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = TrioLoop(busy=self.store_busy)
        self.directory = tempfile.mkdtemp(prefix="bsmodel-")
        self.jobs: dict[str, ModelJob] = {}
        self.by_message: dict[tuple[str, str], ModelJob] = {}
        self.history = History()
        self.rule_index = 0
        self.rt: backstream.Runtime | None = None
        self._rt_done = trio.Event()
        self._rt_stop: trio.Event | None = None
        self._rt_failure: BaseException | None = None
        self.wall_offset = 0.0  # wall time - trio time, fixed at the first start
        self.logged = LogRecorder()
        logging.getLogger("backstream").addHandler(self.logged)

    # -- the runtime's lifetime --------------------------------------------------------------

    def make_store(self) -> Store:
        if self.store_kind == "sqlite":
            return SqliteStore(f"{self.directory}/jobs.db")
        return MemoryStore()

    def store_busy(self) -> bool:
        """Whether the store waits for a server's reply (the clock must not jump then)."""
        return False

    @initialize()
    def open(self) -> None:
        tools = ToolRegistry.with_builtins()
        tools.register(sample_tools.delete_files)
        opened = threading.Event()

        async def hold() -> None:
            self._rt_stop = trio.Event()
            try:
                async with open_runtime(
                    CONFIG, store=self.make_store(), models={"scripted": ScriptedModel()}, tools=tools
                ) as rt:
                    self.rt = rt
                    opened.set()
                    await self._rt_stop.wait()
            except BaseException as exc:
                self._rt_failure = exc
                raise
            finally:
                opened.set()
                self._rt_done.set()

        self.loop.token.run_sync_soon(lambda: self.loop.nursery.start_soon(hold))
        assert opened.wait(REAL_TIMEOUT) and self.rt is not None, self._rt_failure

    @property
    def runtime(self) -> backstream.Runtime:
        assert self.rt is not None
        return self.rt

    def now(self) -> float:
        return self.loop.clock.current_time()

    def run(self, fn: Callable[[], Awaitable[T]], *, timed: bool = False) -> T:
        self.rule_index += 1
        return self.loop.run(fn, timed=timed)

    # -- observations ---------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Look at every job (frozen time): its status, and whether it is gone."""
        for job in self.jobs.values():
            if job.gone:
                continue
            try:
                info = await self.runtime.get_job(job.job_id, user=job.user)
            except backstream.NotFoundError:
                self.went_away(job)
                continue
            self.saw_status(job, info.job.status, info.job.finished_at)
            if job.finished_wall is not None and self.exact_timing:
                overdue = self.now() + self.wall_offset - (job.finished_wall + CONFIG.retention)
                assert overdue < CONFIG.sweep_interval + 1, (
                    f"{job.job_id} kept {overdue:.1f} s past retention"
                )

    def saw_status(self, job: ModelJob, status: str, finished_at: str | None) -> None:
        if job.status in TERMINAL_STATUSES:
            assert status == job.status, f"{job.job_id} was {job.status}, now {status}"
            return
        job.status = status
        if status in TERMINAL_STATUSES:
            job.ended_seen_at = self.now()
            assert finished_at is not None
            job.finished_wall = wall(finished_at)

    def went_away(self, job: ModelJob) -> None:
        """``not_found`` for the owner: only after the job ended and its retention passed."""
        now_wall = self.now() + self.wall_offset
        earliest_end = job.finished_wall if job.finished_wall is not None else job.created + self.wall_offset
        assert now_wall >= earliest_end + CONFIG.retention - 0.01, (
            f"{job.job_id} is not_found {now_wall - earliest_end:.1f} s after it could have ended"
        )
        job.gone = True

    def live(self, user: str | None = None) -> list[ModelJob]:
        return [
            j
            for j in self.jobs.values()
            if not j.gone and j.status not in TERMINAL_STATUSES and (user is None or j.user == user)
        ]

    def recently_ended(self, user: str | None, since: float) -> list[ModelJob]:
        return [
            j
            for j in self.jobs.values()
            if j.ended_seen_at is not None and j.ended_seen_at >= since and (user is None or j.user == user)
        ]

    # -- rules ----------------------------------------------------------------------------------

    @rule(user=st.sampled_from(USERS), message_id=st.sampled_from(MESSAGE_IDS), plan=PLANS)
    def start(self, user: str, message_id: str, plan: dict[str, Any]) -> None:
        async def go() -> tuple[backstream.StartedJob | None, Exception | None, int, int, float]:
            await self.refresh()
            before_user, before_all = len(self.live(user)), len(self.live())
            try:
                started = await self.runtime.start_job(
                    user=user,
                    thread_id="t",
                    message_id=message_id,
                    model="scripted",
                    messages=[{"role": "user", "content": json.dumps(plan)}],
                    tools=["delete_files"] if plan.get("tool") else None,
                )
            except backstream.CapacityError as exc:
                return None, exc, before_user, before_all, self.now()
            return started, None, before_user, before_all, self.now()

        previous = self.by_message.get((user, message_id))
        started, refused, before_user, before_all, at = self.run(go)
        if refused is not None:
            assert previous is None or previous.gone, f"a repeated message_id was refused: {refused}"
            # Refused only at a limit; a job that ended just now may still hold its slot.
            since = at - 1e-9
            per_user = before_user + len(self.recently_ended(user, since))
            overall = before_all + len(self.recently_ended(None, since))
            assert per_user >= CONFIG.max_jobs_per_user or overall >= CONFIG.max_jobs, (
                f"refused with {before_user} of {user}'s and {before_all} jobs running: {refused}"
            )
            return
        assert started is not None
        if started.existing:
            assert previous is not None and not previous.gone, "existing=True for a new message_id"
            assert started.job_id == previous.job_id
            return
        assert previous is None or previous.gone, f"message_id {message_id} started a second job"
        assert before_user < CONFIG.max_jobs_per_user and before_all < CONFIG.max_jobs, (
            f"admitted past a limit: {before_user} of {user}'s, {before_all} in all"
        )
        if not self.jobs:
            self.wall_offset = wall(started.job.created_at) - at
        job = ModelJob(started.job_id, user, message_id, plan, created=at)
        self.jobs[job.job_id] = job
        self.by_message[(user, message_id)] = job

    @rule(seconds=st.sampled_from([0.2, 1.0, 3.0, 20.0, 70.0, 400.0]))
    def tick(self, seconds: float) -> None:
        async def go() -> None:
            await trio.sleep(seconds)

        self.run(go, timed=True)

    @precondition(lambda self: bool(self.jobs))
    @rule(data=st.data(), batches=st.integers(1, 6), seconds=st.sampled_from([0.5, 5.0, 200.0]))
    def watch(self, data: st.DataObject, batches: int, seconds: float) -> None:
        job = data.draw(st.sampled_from(list(self.jobs.values())))
        known = max(self.history.job(job.job_id, 1).kinds, default=0)
        cursor = data.draw(st.sampled_from(sorted({0, known, known + 1, known // 2, known + 3})))

        async def go() -> tuple[list[Batch], Exception | None, float, float]:
            got, error, t0 = await watch_for_a_while()
            t1 = self.now()
            await self.refresh()
            return got, error, t0, t1

        async def watch_for_a_while() -> tuple[list[Batch], Exception | None, float]:
            got: list[Batch] = []
            started = self.now()
            try:
                with trio.move_on_after(seconds):
                    async with self.runtime.watch(job.job_id, user=job.user, after_seq=cursor) as watch:
                        async for batch in watch:
                            got.append(batch)
                            if len(got) >= batches:
                                break
            except (backstream.NotFoundError, backstream.BadRequestError) as exc:
                return got, exc, started
            return got, None, started

        got, error, t0, t1 = self.run(go, timed=True)
        self.check_watch(job, f"watch#{self.rule_index}", cursor, got, error, t0, t1)

    def check_watch(
        self,
        job: ModelJob,
        label: str,
        cursor: int,
        got: list[Batch],
        error: Exception | None,
        t0: float,
        t1: float,
    ) -> None:
        """Check one watch of ``job`` from ``cursor`` (open from ``t0`` to ``t1``) against
        every other, and what ended it."""
        job.watching.append((t0, t1))
        found = self.history.observe(job.job_id, label, cursor, got)
        assert not found, found
        history = self.history.job(job.job_id, 1)
        if isinstance(error, backstream.NotFoundError):
            assert job.gone, f"watch: not_found for a job get_job finds: {error}"
        elif isinstance(error, backstream.BadRequestError):
            assert history.terminal_seq is not None or job.status in TERMINAL_STATUSES, error
            assert history.terminal_seq is None or cursor > history.terminal_seq, error
        if got and got[-1].terminal is not None:
            job.end_watch_starts.append(t0)
            assert job.gone or job.status == got[-1].terminal.status, (job.status, got[-1].terminal)

    @precondition(lambda self: bool(self.jobs))
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        job = data.draw(st.sampled_from(list(self.jobs.values())))

        async def go() -> backstream.AbortResult | None:
            await self.refresh()
            if job.gone:
                return None
            return await self.runtime.abort(job.job_id, user=job.user)

        was = job.status
        result = self.run(go, timed=True)
        if result is not None:
            self.check_abort(job, was, result)

    def check_abort(self, job: ModelJob, was: str, result: backstream.AbortResult) -> None:
        """Our abort of ``job``, which we last saw ``was``."""
        assert result.job.status in TERMINAL_STATUSES, result
        if result.aborted:
            assert was not in TERMINAL_STATUSES, f"aborted=True for a job that had ended {was}"
            assert result.job.status == "aborted"
            job.aborted = True
        self.saw_status(job, result.job.status, result.job.finished_at)

    @precondition(lambda self: any(j.plan.get("tool") for j in self.jobs.values()))
    @rule(data=st.data(), approved=st.booleans())
    def approve(self, data: st.DataObject, approved: bool) -> None:
        tool_jobs = [j for j in self.jobs.values() if j.plan.get("tool")]
        job = data.draw(st.sampled_from(tool_jobs))

        async def go() -> tuple[str | None, backstream.JobSummary | Exception | None]:
            await self.refresh()
            if job.gone:
                return None, None
            status = job.status
            self.loop.clock.autojump_threshold = 0
            try:
                return status, await self.runtime.approve(job.job_id, "c1", approved, user=job.user)
            except backstream.ConflictError as exc:
                return status, exc

        status, result = self.run(go)
        if status is not None:
            self.check_approval(job, status, approved, result)

    def check_approval(
        self, job: ModelJob, status: str, approved: bool, result: backstream.JobSummary | Exception | None
    ) -> None:
        """Our decision on ``job``'s tool call, made when the job said ``status``."""
        if status == "awaiting_approval" and job.decision is None:
            assert isinstance(result, backstream.JobSummary), f"approval refused while waiting: {result}"
            job.decision = approved
        else:
            assert isinstance(result, backstream.ConflictError), f"{status}: approval accepted: {result}"

    @precondition(lambda self: bool(self.jobs))
    @rule(data=st.data(), other=st.sampled_from(USERS))
    def foreign_access(self, data: st.DataObject, other: str) -> None:
        """Another user's job: not_found, exactly as for a job that never existed."""
        job = data.draw(st.sampled_from(list(self.jobs.values())))
        if other == job.user:
            return
        foreign, missing = self.run(lambda: self.foreign_and_missing(job, other))
        assert foreign == missing, (foreign, missing)
        assert all(code == "not_found" for code, _ in foreign), foreign

    async def foreign_and_missing(
        self, job: ModelJob, other: str
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """What ``other`` gets asking for ``job``, and for a job id that does not exist (each
        request for the one right after the same request for the other)."""
        rt = self.runtime

        def calls(job_id: str) -> list[Callable[[], Awaitable[Any]]]:
            return [
                lambda: rt.get_job(job_id, user=other, include_content=True),
                lambda: rt.abort(job_id, user=other),
                lambda: rt.approve(job_id, "c1", True, user=other),
                lambda: self._watch_once(job_id, other),
            ]

        async def attempt(call: Callable[[], Awaitable[Any]]) -> tuple[str, str]:
            try:
                await call()
            except backstream.BackstreamError as exc:
                return exc.code, str(exc)
            return "ok", ""

        foreign, missing = [], []
        for of_job, of_none in zip(calls(job.job_id), calls("j_" + job.job_id[2:][::-1]), strict=True):
            foreign.append(await attempt(of_job))
            missing.append(await attempt(of_none))
        return foreign, missing

    async def _watch_once(self, job_id: str, user: str) -> None:
        async with self.runtime.watch(job_id, user=user):
            pass

    @precondition(lambda self: bool(self.jobs))
    @rule(data=st.data())
    def get_content(self, data: st.DataObject) -> None:
        """``job.get`` agrees with what the watches showed."""
        job = data.draw(st.sampled_from(list(self.jobs.values())))

        async def go() -> backstream.JobInfo | None:
            try:
                return await self.runtime.get_job(job.job_id, user=job.user, include_content=True)
            except backstream.NotFoundError:
                return None

        info = self.run(go)
        if info is None:
            self.went_away(job)
            return
        assert info.content is not None
        history = self.history.job(job.job_id, 1)
        known = max((s for s in history.prefix if s <= info.job.seq), default=0)
        assert info.content.startswith(history.prefix[known]), (
            "job.get content is not an extension of the log"
        )
        assert info.job.seq >= max(history.kinds, default=0), "job.get is behind what watches showed"
        self.saw_status(job, info.job.status, info.job.finished_at)

    @invariant()
    def within_capacity(self) -> None:
        if self.rt is None:
            return
        for user in USERS:
            assert len(self.live(user)) <= CONFIG.max_jobs_per_user
        assert len(self.live()) <= CONFIG.max_jobs

    # -- the end ----------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.rt is not None and self._rt_failure is None:
                self.finish_and_check()
        finally:
            try:
                if self._rt_stop is not None:
                    self.loop.token.run_sync_soon(self._rt_stop.set)
                    self.loop.run(self._rt_done.wait, timed=True)
            finally:
                logging.getLogger("backstream").removeHandler(self.logged)
                self.loop.close()
                shutil.rmtree(self.directory, ignore_errors=True)
        if self._rt_failure is not None:
            raise self._rt_failure

    def finish_and_check(self) -> None:
        """Let every job end, then check each one's whole log, status and notifications."""

        async def go() -> None:
            # Long enough for any job to end (approval wait, then the job timeout), not for a
            # job that ends now to be swept.
            await trio.sleep(CONFIG.approval_timeout + CONFIG.job_timeout + 10)
            await self.refresh()
            for job in self.jobs.values():
                if not job.gone:
                    await self.check_job(job)
            await self.check_notifications()

        self.run(go, timed=True)

    async def check_job(self, job: ModelJob) -> None:
        rt = self.runtime
        try:  # time moves on while we look: a job that ended long ago may go meanwhile
            info = await rt.get_job(job.job_id, user=job.user, include_content=True)
            assert info.job.status in TERMINAL_STATUSES, f"{job.job_id} still {info.job.status}"
            async with rt.watch(job.job_id, user=job.user) as watch:
                batches = [b async for b in watch]
        except backstream.NotFoundError:
            self.went_away(job)
            return
        assert batches and batches[-1].terminal is not None, "the log does not end with a terminal status"
        found = self.history.observe(job.job_id, "final", 0, batches)
        found += self.history.check_final(job.job_id, 1, info.job.status, info.content or "", info.job.seq)
        assert not found, found
        terminals = [e for b in batches for e in b.events if getattr(e, "is_terminal", False)]
        assert len(terminals) == 1
        assert info.job.status in self.expected_statuses(job), (job, info.job.status, info.job.error)
        if info.job.status == "completed":
            assert info.content == words(job.plan["words"])
        decisions = [e for b in batches for e in b.events if isinstance(e, ApprovalEvent)]
        if job.decision is not None:
            assert [d.approved for d in decisions] == [job.decision]
        if decisions and job.decision is None:
            assert [d.approved for d in decisions] == [False]  # the wait timed out: a denial

    def expected_statuses(self, job: ModelJob) -> set[str]:
        """Ours aborted it: aborted. Otherwise as its plan says (an abort that found it
        ended already does not count), or aborted by an abort that raced its end."""
        if job.aborted:
            return {"aborted"}
        long = not job.plan.get("tool") and job.plan["words"] / job.plan["rate"] > CONFIG.job_timeout
        return {"failed" if long else "completed"}

    async def check_notifications(self) -> None:
        rt = self.runtime
        for user in USERS:
            notes, _unread = await rt.notifications_list(user=user, limit=200)
            seen: set[tuple[str, str]] = set()
            for note in notes:
                assert (note.job_id, note.type) not in seen, f"two {note.type} for {note.job_id}"
                seen.add((note.job_id, note.type))
                job = self.jobs.get(note.job_id)
                assert job is not None and job.user == user, note
                if note.type == "ai.tool.approval_required":
                    assert job.plan.get("tool"), note
                    continue
                if job.status not in TERMINAL_STATUSES:
                    assert job.gone, (note, job)  # swept before we saw its end
                    continue
                expected = {
                    "completed": "ai.message.received",
                    "failed": "system.warning",
                    "aborted": "system.warning",
                }.get(job.status)
                assert note.type == expected, (note.type, job.status)
            for job in self.jobs.values():
                if job.user != user or job.gone or job.status == "aborted":
                    continue
                ended_types = {t for j, t in seen if j == job.job_id and t != "ai.tool.approval_required"}
                if self.watched_through_end(job):
                    assert not ended_types or self.presence_may_have_lapsed(job), (
                        f"{job.job_id}: notified though a watch delivered its end"
                    )
                elif not self.watched_near_end(job):
                    assert len(ended_types) == 1, (
                        f"{job.job_id} ended unwatched at {job.finished_wall - self.wall_offset:.3f}: "  # type: ignore[operator]
                        f"{ended_types} {job}; notifications {notes}; log {self.logged.lines}"
                    )

    def watched_through_end(self, job: ModelJob) -> bool:
        """One of our watches was open when the job ended, and delivered its end."""
        if job.finished_wall is None:
            return False
        end = job.finished_wall - self.wall_offset
        return any(t0 < end - 0.01 for t0 in job.end_watch_starts)

    def presence_may_have_lapsed(self, job: ModelJob) -> bool:
        """The store may have lost track of a watch of ``job`` when it ended (an outage)."""
        return False

    def watched_near_end(self, job: ModelJob) -> bool:
        if job.finished_wall is None:
            return True  # not known: make no claim
        end = job.finished_wall - self.wall_offset
        if not self.exact_timing:  # the check may run late: any later watch may count
            return any(t1 >= end - 1 for _t0, t1 in job.watching)
        return any(t0 - 1 <= end <= t1 + 1 for t0, t1 in job.watching)


MODEL_SETTINGS = settings(
    max_examples=EXAMPLES,
    # Shrinking a failure of this size can take minutes: on request only.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if SHRINK else [])],
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class SqliteRuntimeModel(RuntimeModel):
    store_kind = "sqlite"
    exact_timing = False


TestMemoryModel = RuntimeModel.TestCase
TestMemoryModel.settings = MODEL_SETTINGS
TestSqliteModel = SqliteRuntimeModel.TestCase
TestSqliteModel.settings = settings(MODEL_SETTINGS, max_examples=max(1, EXAMPLES // 3))


# -- Redis, and losing it ----------------------------------------------------------------------

OUTAGES = ("restart", "pause", "crash", "reset")
OUTAGE_SECONDS = (0.3, 2.0, 10.0, 25.0)  # each within CONFIG.store_outage_limit (30 s)
SETTLE = 3.0  # after the store is back: more than a write's longest backoff (2 s)
STALLED = 1.0  # real seconds a healthy Redis never takes to answer (see store_busy)
# An outage this long may outlast the presence of a watch in Redis (lease_ttl after the
# keeper last renewed it, up to lease_renew_interval before the outage), counting the
# backoff (2 s) before a job that ended meanwhile writes its end and decides to notify.
PRESENCE_MAY_LAPSE = CONFIG.lease_ttl - CONFIG.lease_renew_interval - 2.0


class AcksAwaited:
    """Subscriptions waiting for Redis to acknowledge them (coredis gives that a second on
    the clock; the command is not a request with a reply). Counted by ``count_acks``."""

    count = 0


def count_acks(wait: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """``PubSub._ensure_subscribed`` (or ``_ensure_unsubscribed``), counted in ``AcksAwaited``."""

    async def counted(pubsub: Any, waiters: Any) -> Any:
        AcksAwaited.count += 1
        try:
            return await wait(pubsub, waiters)
        finally:
            AcksAwaited.count -= 1

    return counted


def requests_in_flight(store: RedisStore) -> bool:
    """Whether one of the store's connections waits for Redis' reply (a request, or a
    subscription's acknowledgement), or a connection is being made (a task waits to write).
    coredis' private details: the harness's business."""
    client = store._redis
    if client is None:
        return False
    if AcksAwaited.count:
        return True
    pool: Any = client.connection_pool
    if any(connection._requests for connection in pool._online_connections):
        return True
    io = trio.lowlevel.current_statistics().io_statistics
    return bool(getattr(io, "tasks_waiting_write", 0))


def redis_cli(port: int, *command: str) -> str:
    done = subprocess.run(
        ["redis-cli", "-p", str(port), *command], capture_output=True, text=True, check=False
    )
    return done.stdout.strip()


def wait_until_ready(port: int, timeout: float = 30.0) -> None:
    """Until Redis answers PING: listening is not enough while it loads its data."""
    deadline = time.monotonic() + timeout
    while redis_cli(port, "ping") != "PONG":
        if time.monotonic() > deadline:
            raise AssertionError(f"redis on port {port} did not answer PING within {timeout} s")
        time.sleep(0.02)


def crash_on_waking(server: RedisServer, awake: float) -> None:
    """Wake a frozen Redis and kill it ``awake`` seconds later: it runs some of what was
    waiting (each write in its append-only file before its reply), and some replies never
    leave it (with a fraction of a millisecond, commits that landed are often retried)."""
    server.resume()
    time.sleep(awake)
    server.kill()


@attrs.define
class OutageWatch:
    """A watch that the outage rule keeps open while the store goes away and comes back."""

    job: ModelJob
    cursor: int
    seconds: float
    status: str | None = None  # the job's status when the watch opened
    got: list[Batch] = attrs.Factory(list)
    times: list[float] = attrs.Factory(list)  # when each batch came
    error: Exception | None = None
    t0: float = 0.0
    t1: float = 0.0


class RedisRuntimeModel(RuntimeModel):
    """Over ``RedisStore`` on a redis-server of the test's own, which the rule
    ``lose_and_regain_store`` takes away and gives back."""

    store_kind = "redis"
    exact_timing = False
    server: ClassVar[RedisServer | None] = None  # the model_redis fixture's

    def __init__(self) -> None:
        self.store_away = False
        self.busy_since: float | None = None  # monotonic time since when a request is under way
        self.stalls = 0
        self.redis_store: RedisStore | None = None
        # job id -> trio-time windows in which the store may have lost a watch's presence
        self.lapses: dict[str, list[tuple[float, float]]] = {}
        super().__init__()

    @property
    def redis(self) -> RedisServer:
        assert self.server is not None, "the model_redis fixture starts the server"
        return self.server

    def make_store(self) -> Store:
        self.server_up()
        self.redis_store = RedisStore(redis_url(self.redis.port), prefix=f"model:{uuid.uuid4().hex[:12]}")
        return self.redis_store

    def store_busy(self) -> bool:
        """A request to Redis is under way: the clock waits for its reply, but only for
        ``STALLED`` real seconds on end. While Redis is frozen (``store_away``), or when a
        reply will never come (an acknowledgement on a connection that died waits for its
        timeout), time passes as it would for real."""
        if self.store_away or self.redis_store is None or not requests_in_flight(self.redis_store):
            self.busy_since = None
            return False
        now = time.monotonic()
        if self.busy_since is None:
            self.busy_since = now
        if now - self.busy_since < STALLED:
            return True
        self.stalls += 1
        return False

    def server_up(self) -> None:
        """Redis running and answering (after a failed example too)."""
        server = self.redis
        if server.proc is None or server.proc.poll() is not None:
            server.start()
        else:
            server.resume()
        wait_until_ready(server.port)

    def teardown(self) -> None:
        self.store_away = False
        self.server_up()  # a rule that failed mid-outage may have left it down
        super().teardown()
        if self.stalls:
            event(f"the clock stopped waiting for a reply after {STALLED} real seconds")

    async def lose_store(self, how: str) -> None:
        if how == "reset":  # Redis stays up; every connection of ours is cut
            await trio.to_thread.run_sync(redis_cli, self.redis.port, "client", "kill", "type", "normal")
            await trio.to_thread.run_sync(redis_cli, self.redis.port, "client", "kill", "type", "pubsub")
            return
        if how == "restart":  # requests fail at once: the clock still waits for each
            self.redis.kill()
        else:  # pause, crash: requests hang, and the clock jumps meanwhile
            self.store_away = True
            self.redis.pause()

    async def regain_store(self, how: str, awake: float = 0.0) -> None:
        if how == "crash":  # blocks the loop: no reply is read before the kill
            crash_on_waking(self.redis, awake)
        if how in ("restart", "crash"):  # in a worker thread: the clock stands still meanwhile
            await trio.to_thread.run_sync(self.server_up)
        elif how == "pause":
            self.redis.resume()
        self.store_away = False

    @precondition(lambda self: bool(self.live()))  # jobs run (as far as the model knows)
    @rule(
        data=st.data(),
        how=st.sampled_from(OUTAGES),
        seconds=st.sampled_from(OUTAGE_SECONDS),
        lead=st.sampled_from([0.0, 1.0, 5.0]),
        action=st.sampled_from(["none", "abort", "approve", "foreign"]),
    )
    def lose_and_regain_store(
        self, data: st.DataObject, how: str, seconds: float, lead: float, action: str
    ) -> None:
        """Lose the store and regain it while jobs run and are watched: Redis killed and
        restarted with its data, frozen (SIGSTOP), frozen and killed as it wakes, or every
        connection of ours cut (CLIENT KILL), for ``seconds`` of the runtime's time, all
        within ``store_outage_limit``. Up to three watches (opened before) stay open
        through it, and an abort, a decision or another user's requests may come while it
        is away. Nothing may be lost: the watches stay contiguous and agree with every
        other, the jobs end as they would have, every write lands once the store is back."""
        jobs = list(self.jobs.values())
        watches: list[OutageWatch] = []
        target: ModelJob | None = None
        if jobs:
            for job in data.draw(st.lists(st.sampled_from(jobs), max_size=3)):
                known = max(self.history.job(job.job_id, 1).kinds, default=0)
                cursor = data.draw(st.sampled_from(sorted({0, known // 2, known, known + 1})))
                length = data.draw(st.sampled_from([lead + seconds / 2, lead + seconds + 1.0, 200.0]))
                watches.append(OutageWatch(job, cursor, length))
            if action != "none":
                target = data.draw(st.sampled_from(jobs))
        approved, other = data.draw(st.booleans()), data.draw(st.sampled_from(USERS))
        awake = data.draw(st.sampled_from([0.0, 0.0003, 0.003])) if how == "crash" else 0.0
        acted: dict[str, Any] = {}

        async def act(job: ModelJob) -> None:
            """Our request while the store is away: an abort or a decision (a running job
            needs no store for it), or another user's requests."""
            rt = self.runtime
            acted["at"], acted["was"], acted["approved"] = self.now(), job.status, approved
            if action == "foreign":
                if other != job.user:
                    acted["foreign"] = await self.foreign_and_missing(job, other)
                return
            try:
                if action == "abort":
                    acted["result"] = await rt.abort(job.job_id, user=job.user)
                    return
                acted["status"] = (await rt.get_job(job.job_id, user=job.user)).job.status
                acted["result"] = await rt.approve(job.job_id, "c1", approved, user=job.user)
            except (backstream.NotFoundError, backstream.UnavailableError, backstream.ConflictError) as exc:
                acted["result"] = exc

        async def go() -> tuple[float, float]:
            await self.refresh()
            async with trio.open_nursery() as nursery:
                for watch in watches:
                    if not watch.job.gone:
                        await nursery.start(self.watch_through_outage, watch)
                await trio.sleep(lead)
                lost = self.now()
                try:
                    await self.lose_store(how)
                    if target is not None and not target.gone:
                        nursery.start_soon(act, target)
                    await trio.sleep(seconds)
                finally:
                    with trio.CancelScope(shield=True):
                        await self.regain_store(how, awake)
                back = self.now()
            await trio.sleep(SETTLE)
            await self.refresh()
            return lost, back

        lost, back = self.run(go, timed=True)
        event(f"store lost: {how}")
        for watch in watches:
            if watch.t1 == 0.0:
                continue  # its job was gone already
            self.check_outage_watch(watch, lost, back, seconds)
            if any(lost <= t <= back for t in watch.times):
                event("a watch got batches while the store was away")
        if any(lost <= (self.ended_at(j) or -1.0) <= back for j in self.jobs.values()):
            event("a job ended while the store was away")
        if "result" in acted or "foreign" in acted:
            assert target is not None
            answer = type(acted["result"]).__name__ if "result" in acted else acted["foreign"][1][0][0]
            event(f"while the store was away: {action} -> {answer}")
            self.check_outage_request(target, acted, how)
        assert self.redis_store is not None
        if self.redis_store.statistics().commits_replanned:
            event("a commit was planned again (a retry that had landed)")

    async def watch_through_outage(
        self, watch: OutageWatch, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the watch (the store is there), report it started, follow it for its time."""
        job, opened = watch.job, False
        watch.t0 = self.now()
        try:
            with trio.move_on_after(watch.seconds):
                watch.status = (await self.runtime.get_job(job.job_id, user=job.user)).job.status
                async with self.runtime.watch(job.job_id, user=job.user, after_seq=watch.cursor) as batches:
                    task_status.started()
                    opened = True
                    async for batch in batches:
                        watch.got.append(batch)
                        watch.times.append(self.now())
        except (backstream.NotFoundError, backstream.BadRequestError, backstream.UnavailableError) as exc:
            watch.error = exc
        finally:
            watch.t1 = self.now()
            if not opened:
                task_status.started()

    def ended_at(self, job: ModelJob) -> float | None:
        """When ``job`` ended, in trio time (None: not seen ended)."""
        return None if job.finished_wall is None else job.finished_wall - self.wall_offset

    def check_outage_watch(self, watch: OutageWatch, lost: float, back: float, seconds: float) -> None:
        job, error = watch.job, watch.error
        if isinstance(error, backstream.UnavailableError):
            # Only a watch that reads the store meets the outage: the job had ended and left
            # before it opened. A running job's watchers read its log in memory.
            ended = self.ended_at(job)
            assert ended is not None and ended <= watch.t0 + 1e-6, (
                f"watch of {job.job_id} (running when it opened: {watch.status}) failed: {error}"
            )
            error = None
        t1 = watch.t1
        if lost - 1e-6 <= t1 <= back + 1e-6:
            # Closed while the store was away: the end of the watch was not recorded, and its
            # presence holds in Redis until it lapses (lease_ttl); it counts as watching.
            t1 += CONFIG.lease_ttl
        self.check_watch(job, f"outage-watch#{self.rule_index}", watch.cursor, watch.got, error, watch.t0, t1)
        if seconds >= PRESENCE_MAY_LAPSE and watch.t0 <= lost <= watch.t1:
            # Open through a long outage: its presence may have lapsed in Redis until the
            # keeper renews it, after the store is back (or renewed it with a lease that a
            # freeze made stale). A job that ended meanwhile may be notified though watched.
            self.lapses.setdefault(job.job_id, []).append((lost, back + CONFIG.lease_renew_interval + 2.0))

    def check_outage_request(self, job: ModelJob, acted: dict[str, Any], how: str) -> None:
        if "foreign" in acted:
            foreign, missing = acted["foreign"]

            # While the store is away, both may be unavailable; what differs is not the job's
            # existence but the wording of the store's error.
            def codes(answers: list[tuple[str, str]]) -> list[tuple[str, str]]:
                return [(code, text if code == "not_found" else "") for code, text in answers]

            assert codes(foreign) == codes(missing), (how, foreign, missing)
            assert all(code in ("not_found", "unavailable") for code, _ in foreign), foreign
            return
        result = acted["result"]
        if isinstance(result, backstream.UnavailableError | backstream.NotFoundError):
            # The job's actor had left (it had ended and written its end), so the request
            # went to the store: a running job's abort or decision needs none.
            ended = self.ended_at(job)
            assert ended is not None and ended <= acted["at"] + 1e-6, (
                f"a request on {job.job_id} (was {acted['was']}) failed while the store was away: {result}"
            )
            if isinstance(result, backstream.NotFoundError):
                self.went_away(job)
            return
        if isinstance(result, backstream.AbortResult):
            self.check_abort(job, acted["was"], result)
        else:
            self.check_approval(job, acted["status"], acted["approved"], result)

    def presence_may_have_lapsed(self, job: ModelJob) -> bool:
        ended = self.ended_at(job)
        return ended is not None and any(a <= ended <= b for a, b in self.lapses.get(job.job_id, []))


@pytest.fixture(scope="class")
def model_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The Redis model's own redis-server (it is stopped and restarted): not the one on 6379.
    A sync fixture, so that a skip keeps its message."""
    for program in ("redis-server", "redis-cli"):
        require(program, shutil.which(program) is not None, "apt-get install redis-server")
    with pytest.MonkeyPatch.context() as patch, own_redis(tmp_path_factory.mktemp("model-redis")) as server:
        for name in ("_ensure_subscribed", "_ensure_unsubscribed"):
            patch.setattr(PubSub, name, count_acks(getattr(PubSub, name)))
        RedisRuntimeModel.server = server
        try:
            yield server
        finally:
            RedisRuntimeModel.server = None


TestRedisModel = pytest.mark.usefixtures("model_redis")(RedisRuntimeModel.TestCase)
TestRedisModel.settings = settings(MODEL_SETTINGS, max_examples=max(1, EXAMPLES // 2))
