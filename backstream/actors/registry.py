"""The registry actor: admission of new jobs.

Starts go through its mailbox. The actor takes every start waiting there at once and
admits them concurrently, so that a burst of starts costs one store round trip, not one
each. The capacity check reserves a slot before the store is asked, so concurrent
admissions never overshoot a limit; starts with the same ``(user, message_id)`` are
admitted one after the other, so a repeat always finds the first.

It alone owns the running and reserved counts (in all and per user): they change only
in its own tasks. A job, a child of the "jobs" supervisor, tells the registry that it
ended through a bounded channel; the registry applies those before every admission
decision (so a slot freed before a start is free for it) and as they come. Each
(re)start of the registry (``fresh_child``) builds its state afresh from the jobs
supervisor's children, the only truth about what runs here. A running job's actor is
looked up in that supervisor too. Housekeeping (retention, leases, orphans) is the
keeper's; the flush ticker is its own actor.
"""

from __future__ import annotations

import logging
from collections import Counter
from functools import partial

import attrs
import outcome
import trio

from backstream.actors.clock import WallClock
from backstream.actors.config import Config
from backstream.actors.job import JobActor
from backstream.actors.joblog import JobLog
from backstream.actors.notifier import Notifier
from backstream.actors.ports import JobAccess, Model, Tools
from backstream.actors.supervisor import ChildFn, ChildSpec, Incarnation, Restart, Supervisor
from backstream.protocol.continuation import Continuation
from backstream.protocol.errors import CapacityError, QuotaExceededError, UnavailableError
from backstream.protocol.ids import new_id
from backstream.protocol.lifecycle import INITIAL_STATUS
from backstream.protocol.records import JobRecord, JobRequest, SharedCapacity

__all__ = ["Registry", "RegistryStatistics", "StartRequest"]

log = logging.getLogger("backstream.registry")

MAILBOX_SIZE = 256
"""Starts waiting for the registry; when full, callers of ``start_job`` wait (backpressure)."""
MAX_ADMITTING = 256
"""Admissions under way at once (store round trips in flight); the rest wait in the mailbox."""


@attrs.frozen
class StartRequest:
    """A start as the registry admits it: ``model`` is already resolved by the caller
    (the runtime's model router), once per start."""

    user: str
    thread_id: str
    message_id: str
    request: JobRequest
    model: Model
    continuation: Continuation = Continuation.INTERRUPT
    """How the job goes on if its instance dies (the router's policy for its model)."""


@attrs.frozen
class _Adoption:
    """A job taken over from a dead instance, to run here from its rebuilt log."""

    record: JobRecord
    model: Model
    log: JobLog
    continuation: Continuation
    job_timeout: float
    started: trio.Event = attrs.field(factory=trio.Event, eq=False)


@attrs.frozen
class RegistryStatistics:
    running: int
    users_running: int
    started_total: int
    finished_total: dict[str, int]
    endings_total: dict[tuple[str, str], int]
    """Jobs ended here, by (status, error code); the code is "" for an ending without error."""
    mailbox_waiting: int
    admitting: int
    accepting: bool
    quota_refusals_total: int
    """Starts refused here because their user's stored bytes would pass the quota."""
    continuations_total: dict[str, int]
    """Jobs taken over and continued here that ended, by how their cut-short turn went on:
    ``prefill``, ``restart``, or ``none`` (nothing was cut short: between turns, or among
    the calls of a turn)."""
    regenerated_chars_total: int
    """Characters of output withdrawn and produced again by continued jobs (``restart``)."""


@attrs.define
class _Start:
    request: StartRequest
    done: trio.Event = attrs.Factory(trio.Event)
    result: outcome.Outcome[tuple[JobRecord, bool]] | None = None


@attrs.frozen
class _Running:
    user: str
    message_id: str
    record: JobRecord


class _Counts:
    """What one run of the registry holds: the jobs running here and the slots reserved by
    admissions under way, in all and per user. Changed only by the registry's own tasks."""

    def __init__(self, running: dict[str, _Running]) -> None:
        self.running = running  # by job_id
        self.running_by_user = Counter(job.user for job in running.values())
        self.running_by_key = {(job.user, job.message_id): job.record for job in running.values()}
        self.reserved_by_user: Counter[str] = Counter()
        self.reserved = 0  # their total, kept as they change: asked for at every admission
        self.admitting = trio.Semaphore(MAX_ADMITTING)
        self.in_flight: dict[tuple[str, str], trio.Event] = {}  # (user, message_id) being admitted
        self.reservations_released = trio.Event()

    def add(self, record: JobRecord) -> None:
        self.running[record.job_id] = _Running(record.user, record.message_id, record)
        self.running_by_user[record.user] += 1
        self.running_by_key[record.user, record.message_id] = record

    def remove(self, job_id: str) -> None:
        """Forget an ended job; a job unknown here (ended before a restart) is no error."""
        job = self.running.pop(job_id, None)
        if job is None:
            return
        self.running_by_key.pop((job.user, job.message_id), None)
        self.running_by_user[job.user] -= 1
        if self.running_by_user[job.user] <= 0:
            del self.running_by_user[job.user]

    def reserve(self, user: str) -> None:
        self.reserved_by_user[user] += 1
        self.reserved += 1

    def release(self, user: str) -> None:
        self.reserved -= 1
        self.reserved_by_user[user] -= 1
        if self.reserved_by_user[user] <= 0:
            del self.reserved_by_user[user]
        self.reservations_released.set()
        self.reservations_released = trio.Event()


class Registry:
    """The registry's address: what the runtime calls. Run it as a supervised child with
    ``ChildSpec("registry", registry.fresh_child, ...)``: each (re)start builds its
    counts afresh from the jobs that run here."""

    def __init__(
        self,
        config: Config,
        store: JobAccess,
        clock: WallClock,
        jobs: Supervisor[JobActor],
        *,
        instance_id: str,
        tools: Tools,
        notifier: Notifier | None = None,
        hand_off: bool = False,
    ) -> None:
        self._instance_id = instance_id
        # A store whose jobs outlive this process: a job whose model continues is left
        # running in it when the runtime stops, for the next owner to continue.
        self._hand_off = hand_off
        self._tools = tools
        self._notifier = notifier
        self._config = config
        self._store = store
        self._clock = clock
        self._jobs = jobs
        # The channels outlive a restart of the registry: starts and endings sent while
        # it restarts wait for the fresh one.
        self._mailbox_send, self._mailbox_receive = trio.open_memory_channel[_Start](MAILBOX_SIZE)
        # Never full: each job sends one ending, and holds its slot (at most max_jobs of
        # them) until the registry has taken that ending from here.
        self._ended_send, self._ended_receive = trio.open_memory_channel[str](config.max_jobs)
        # Jobs taken over; when full, the keeper's recovery waits (one adoption at a time).
        self._adopt_send, self._adopt_receive = trio.open_memory_channel[_Adoption](0)
        self._counts = _Counts({})
        self._accepting = True
        # Totals for metrics (they survive restarts); counted where the job ends.
        self._started_total = 0
        self._finished_total: Counter[str] = Counter()
        self._endings_total: Counter[tuple[str, str]] = Counter()
        self._quota_refusals_total = 0
        self._continuations_total: Counter[str] = Counter()
        self._regenerated_chars_total = 0
        self._left_running: list[str] = []  # jobs left running in the store at shutdown

    # -- the actor ------------------------------------------------------------------

    def fresh_child(self) -> ChildFn:
        """The registry's child factory: fresh counts, rebuilt from the jobs running here
        (endings already sent are applied to them), and the function that serves starts."""
        running = {}
        for child in self._jobs.which_children():
            if child.address is not None:
                record = child.address.record
                running[child.name] = _Running(record.user, record.message_id, record)
        counts = self._counts = _Counts(running)
        self._apply_endings(counts)
        return partial(self._run, counts)

    async def _run(self, counts: _Counts, *, task_status: trio.TaskStatus[None]) -> None:
        """Serve starts until cancelled. Cancellation: starts being admitted fail with
        ``UnavailableError`` for their callers (who may retry with the same ``message_id``)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._apply_endings_as_they_come, counts)
            nursery.start_soon(self._adopt_as_they_come, counts)
            task_status.started()
            while True:
                await counts.admitting.acquire()
                try:
                    start = await self._mailbox_receive.receive()
                except BaseException:
                    counts.admitting.release()
                    raise
                nursery.start_soon(self._serve, counts, start)
                self._take_waiting_starts(counts, nursery)

    async def _apply_endings_as_they_come(self, counts: _Counts) -> None:
        async for job_id in self._ended_receive:
            counts.remove(job_id)

    async def _adopt_as_they_come(self, counts: _Counts) -> None:
        async for adoption in self._adopt_receive:
            self._apply_endings(counts)
            record = adoption.record
            self._jobs.start_child_soon(
                ChildSpec(
                    name=record.job_id,
                    factory=partial(self._continued_job, adoption),
                    restart=Restart.TEMPORARY,
                    shutdown=self._config.drain_timeout,
                )
            )
            counts.add(record)
            adoption.started.set()

    def _apply_endings(self, counts: _Counts) -> None:
        """Take every ending waiting in the channel, without a checkpoint: called before
        each admission decision, so that a slot freed before a start is free for it."""
        while True:
            try:
                job_id = self._ended_receive.receive_nowait()
            except trio.WouldBlock:
                return
            counts.remove(job_id)

    def _take_waiting_starts(self, counts: _Counts, nursery: trio.Nursery) -> None:
        """Start admitting every start already in the mailbox, without a checkpoint each."""
        while True:
            try:
                counts.admitting.acquire_nowait()
            except trio.WouldBlock:
                return
            try:
                start = self._mailbox_receive.receive_nowait()
            except trio.WouldBlock:
                counts.admitting.release()
                return
            nursery.start_soon(self._serve, counts, start)

    async def _serve(self, counts: _Counts, start: _Start) -> None:
        try:
            start.result = outcome.Value(await self._admit_in_turn(counts, start.request))
        except Exception as exc:
            start.result = outcome.Error(exc)
        finally:
            if start.result is None:  # cancelled mid-admission: the caller must not hang
                start.result = outcome.Error(UnavailableError("the registry restarted; try again"))
            start.done.set()
            counts.admitting.release()

    async def _admit_in_turn(self, counts: _Counts, req: StartRequest) -> tuple[JobRecord, bool]:
        """Admit ``req`` after any admission of the same ``(user, message_id)`` under way."""
        key = (req.user, req.message_id)
        while (earlier := counts.in_flight.get(key)) is not None:
            await earlier.wait()
        self._apply_endings(counts)
        running = counts.running_by_key.get(key)
        if running is not None:  # a repeat of a job running here: no store round trip
            return running, True
        done = counts.in_flight[key] = trio.Event()
        try:
            return await self._admit(counts, req)
        finally:
            del counts.in_flight[key]
            done.set()

    async def _admit(self, counts: _Counts, req: StartRequest) -> tuple[JobRecord, bool]:
        # A slot reserved by an admission under way may turn out unused (a repeat): wait
        # for those rather than refuse a start that only they stand in the way of.
        while self._accepting and self._only_reservations_in_the_way(counts, req.user):
            await counts.reservations_released.wait()
            self._apply_endings(counts)
        if not self._accepting or self._at_capacity(counts, req.user) is not None:
            # Slow path: a start that repeats a message_id needs no slot.
            existing = await self._store.find_job(req.user, req.message_id)
            if existing is not None:
                return existing, True
            if not self._accepting:
                raise UnavailableError("the server is shutting down; start the job elsewhere or later")
            self._apply_endings(counts)
            error = self._at_capacity(counts, req.user)
            if error is not None:
                raise error
        counts.reserve(req.user)  # held while the store is asked
        try:
            return await self._create(counts, req)
        finally:
            counts.release(req.user)

    async def _create(self, counts: _Counts, req: StartRequest) -> tuple[JobRecord, bool]:
        now = self._clock.now()
        record = self._new_record(req, now)
        # Insert-if-absent in one round trip; a shared store also takes a cluster-wide slot.
        # Every store checks and charges the user's quota of stored bytes in the same step.
        capacity = SharedCapacity(
            now=now,
            lease_until=now + self._config.lease_ttl,
            max_jobs=self._config.max_jobs,
            max_jobs_per_user=self._config.max_jobs_per_user,
        )
        try:
            record, created = await self._store.create_job(
                record, capacity, max_stored_bytes=self._config.max_stored_bytes_per_user
            )
        except QuotaExceededError:
            self._quota_refusals_total += 1
            raise
        if not created:
            return record, True
        # Not waiting for the actor to run keeps admission fast under load; an abort that
        # comes first still counts (the actor exists, with its cancel scope, at once).
        self._jobs.start_child_soon(
            ChildSpec(
                name=record.job_id,
                factory=partial(self._new_job, record, req.model, req.continuation),
                restart=Restart.TEMPORARY,
                shutdown=self._config.drain_timeout,
            )
        )
        counts.add(record)
        self._started_total += 1
        return record, False

    def _new_record(self, req: StartRequest, now: float) -> JobRecord:
        return JobRecord(
            job_id=new_id("j_", now),
            user=req.user,
            thread_id=req.thread_id,
            message_id=req.message_id,
            request=req.request,
            status=INITIAL_STATUS,
            seq=0,
            epoch=1,
            content_length=0,
            created_at=now,
            updated_at=now,
            owner=self._instance_id,
            lease_until=now + self._config.lease_ttl,
        )

    def _at_capacity(self, counts: _Counts, user: str, *, reserved: bool = True) -> CapacityError | None:
        """The limit ``user`` is at, counting admissions under way unless ``reserved`` is false."""
        retry = self._config.capacity_retry_after_ms
        pending = counts.reserved if reserved else 0
        if len(counts.running) + pending >= self._config.max_jobs:
            return CapacityError(
                f"the server is at its limit of {self._config.max_jobs} running jobs", retry_after_ms=retry
            )
        pending = counts.reserved_by_user[user] if reserved else 0
        if counts.running_by_user[user] + pending >= self._config.max_jobs_per_user:
            return CapacityError(
                f"you have {self._config.max_jobs_per_user} jobs running, the most allowed",
                retry_after_ms=retry,
            )
        return None

    def _only_reservations_in_the_way(self, counts: _Counts, user: str) -> bool:
        return (
            self._at_capacity(counts, user) is not None
            and self._at_capacity(counts, user, reserved=False) is None
        )

    # -- the jobs -------------------------------------------------------------------

    def _new_job(self, record: JobRecord, model: Model, continuation: Continuation) -> Incarnation[JobActor]:
        """A job's child factory: its actor (the address), run until it tells its end."""
        actor = JobActor(
            record,
            config=self._config,
            store=self._store,
            model=model,
            clock=self._clock,
            tools=self._tools,
            notifier=self._notifier,
            leave_running_on_stop=self._hand_off and continuation is not Continuation.INTERRUPT,
        )
        return Incarnation(partial(self._run_job, actor), address=actor)

    def _continued_job(self, adoption: _Adoption) -> Incarnation[JobActor]:
        """A job taken over: its actor continues from the rebuilt log."""
        actor = JobActor(
            adoption.record,
            config=self._config,
            store=self._store,
            model=adoption.model,
            clock=self._clock,
            tools=self._tools,
            notifier=self._notifier,
            log=adoption.log,
            continuation=adoption.continuation,
            job_timeout=adoption.job_timeout,
            leave_running_on_stop=self._hand_off,
            taken_over=True,
        )
        return Incarnation(partial(self._run_job, actor, continued=True), address=actor)

    async def _run_job(
        self, actor: JobActor, *, continued: bool = False, task_status: trio.TaskStatus[None]
    ) -> None:
        """The job's supervised child: the actor, then its ending sent to the registry."""
        try:
            await actor.run(task_status=task_status)
        finally:
            terminal = actor.log.terminal
            status = terminal.status if terminal else ("left_running" if actor.left_running else "failed")
            code = (terminal.error.code if terminal.error else "") if terminal else ""
            code = code if terminal or actor.left_running else "internal"
            self._finished_total[status] += 1
            self._endings_total[status, code] += 1
            if actor.left_running:
                self._left_running.append(actor.job_id)
            if continued:
                used = actor.continuation.used
                self._continuations_total[used.value if used else "none"] += 1
                self._regenerated_chars_total += actor.continuation.regenerated
            try:
                self._ended_send.send_nowait(actor.job_id)
            except trio.WouldBlock:  # cannot happen (see the channel); the next restart heals it
                log.error("job %s: the registry's channel of endings is full", actor.job_id)

    # -- the address ------------------------------------------------------------------

    async def start_job(self, req: StartRequest) -> tuple[JobRecord, bool]:
        """Admit and start a job; return its record and whether it already existed.

        Raises ``CapacityError`` at a limit, ``QuotaExceededError`` past the user's quota of
        stored bytes, ``UnavailableError`` when shutting down (or
        when the registry restarted meanwhile). Cancellation: the start may still happen;
        a retry with the same ``message_id`` finds it.
        """
        start = _Start(req)
        await self._mailbox_send.send(start)
        await start.done.wait()
        assert start.result is not None
        return start.result.unwrap()

    async def adopt(
        self, record: JobRecord, model: Model, log: JobLog, continuation: Continuation, job_timeout: float
    ) -> None:
        """Run a job taken over from a dead instance here, continued from ``log`` (under
        ``continuation``, within ``job_timeout`` seconds), counted as running here. Admission
        limits do not apply: the job was admitted when it started. Waits for the registry
        to run. Cancellation: the job may or may not have been started."""
        adoption = _Adoption(record, model, log, continuation, job_timeout)
        await self._adopt_send.send(adoption)
        await adoption.started.wait()

    def left_running(self) -> list[str]:
        """The jobs this runtime stopped and left running in the store, for another owner."""
        return list(self._left_running)

    def live(self, job_id: str) -> JobActor | None:
        """The actor of a job running in this process, if any (a read; never blocks)."""
        return self._jobs.lookup(job_id)

    def stop_accepting(self) -> None:
        """Refuse new jobs from now on (``UnavailableError``); repeats still find theirs."""
        self._accepting = False

    def statistics(self) -> RegistryStatistics:
        return RegistryStatistics(
            running=self._jobs.count_children(),
            users_running=len(self._counts.running_by_user),
            started_total=self._started_total,
            finished_total=dict(self._finished_total),
            endings_total=dict(self._endings_total),
            mailbox_waiting=self._mailbox_send.statistics().current_buffer_used,
            admitting=MAX_ADMITTING - self._counts.admitting.value,
            accepting=self._accepting,
            quota_refusals_total=self._quota_refusals_total,
            continuations_total=dict(self._continuations_total),
            regenerated_chars_total=self._regenerated_chars_total,
        )
