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

``BACKSTREAM_MODEL_EXAMPLES`` (default 10; half as many over SQLite, whose steps are slower) and ``BACKSTREAM_MODEL_STEPS`` (default 30)
set the run's size, ``BACKSTREAM_MODEL_SHRINK=1`` shrinks a failure to a minimal one; e.g. ``BACKSTREAM_MODEL_EXAMPLES=500 pytest tests/test_model_stateful.py``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import attrs
import outcome
import trio
import trio.testing
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import backstream
from backstream import Config, Store, open_runtime
from backstream.actors.ports import ChatTurn, OutputSink, TurnResult
from backstream.protocol.events import TERMINAL_STATUSES, ApprovalEvent, Batch
from backstream.runtime.models.turns import TurnCollector
from backstream.runtime.stores.memory import MemoryStore
from backstream.runtime.stores.sqlite import SqliteStore
from backstream.runtime.tools.registry import ToolRegistry
from bench.history import History
from tests import sample_tools

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
            call = {"index": 0, "id": "c1", "function": {"name": "delete_files", "arguments": '{"a": 2, "b": 3}'}}
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


def thread_aware_clock() -> trio.testing.MockClock:
    """A ``MockClock`` that never autojumps while one of trio's worker threads works.

    Autojump takes "every task is blocked" to mean "only time can move things on"; a task
    that waits for a worker thread (SQLite's reads and writes) is blocked too, and a jump
    then could expire a deadline that real time never would. The busy workers are read
    from trio's thread cache, and the jump is wrapped on the instance (``MockClock`` is
    final): private details, a test harness's business only."""
    clock = trio.testing.MockClock(autojump_threshold=math.inf)
    autojump = clock._autojump

    def jump_unless_a_thread_works() -> None:
        if not busy_worker_threads():  # else the loop comes back here until it is done
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

    def __init__(self) -> None:
        self.clock = thread_aware_clock()
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
            raise AssertionError(f"a rule hung for {REAL_TIMEOUT} real seconds (mock time {self.clock.current_time()})")
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
        self.loop = TrioLoop()
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
                assert overdue < CONFIG.sweep_interval + 1, f"{job.job_id} kept {overdue:.1f} s past retention"

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
        job.watching.append((t0, t1))
        found = self.history.observe(job.job_id, f"watch#{self.rule_index}", cursor, got)
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
        if result is None:
            return
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
        if status is None:
            return
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
        rt = self.runtime

        async def attempts(job_id: str) -> list[tuple[str, str]]:
            calls: list[Callable[[], Awaitable[Any]]] = [
                lambda: rt.get_job(job_id, user=other, include_content=True),
                lambda: rt.abort(job_id, user=other),
                lambda: rt.approve(job_id, "c1", True, user=other),
                lambda: self._watch_once(job_id, other),
            ]
            out = []
            for call in calls:
                try:
                    await call()
                except backstream.BackstreamError as exc:
                    out.append((exc.code, str(exc)))
                else:
                    out.append(("ok", ""))
            return out

        async def go() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
            return await attempts(job.job_id), await attempts("j_" + job.job_id[2:][::-1])

        foreign, missing = self.run(go)
        assert foreign == missing, (foreign, missing)
        assert all(code == "not_found" for code, _ in foreign), foreign

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
        assert info.content.startswith(history.prefix[known]), "job.get content is not an extension of the log"
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
                expected = {"completed": "ai.message.received", "failed": "system.warning"}.get(job.status)
                assert note.type == expected, (note.type, job.status)
            for job in self.jobs.values():
                if job.user != user or job.gone or job.status == "aborted":
                    continue
                ended_types = {t for j, t in seen if j == job.job_id and t != "ai.tool.approval_required"}
                if self.watched_through_end(job):
                    assert not ended_types, f"{job.job_id}: notified though a watch delivered its end"
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
TestSqliteModel.settings = settings(MODEL_SETTINGS, max_examples=max(1, EXAMPLES // 2))

