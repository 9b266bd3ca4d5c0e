"""The registry actor: admission of new jobs.

Starts go through its mailbox. The actor takes every start waiting there at once and
admits them concurrently, so that a burst of starts costs one store round trip, not one
each. The capacity check reserves a slot before the store is asked, so concurrent
admissions never overshoot a limit; starts with the same ``(user, message_id)`` are
admitted one after the other, so a repeat always finds the first. It owns the
per-user running counts; the jobs themselves are children of the "jobs"
supervisor, which is where a running job's actor is looked up. Housekeeping
(retention, leases, orphans) is the keeper's; the flush ticker is its own actor.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from functools import partial

import attrs
import outcome
import trio

from backstream.actors.clock import WallClock
from backstream.actors.config import Config
from backstream.actors.job import JobActor
from backstream.actors.notifier import Notifier
from backstream.actors.ports import Model, Store, Tools
from backstream.actors.supervisor import ChildSpec, Restart, Supervisor
from backstream.protocol.errors import CapacityError, UnavailableError
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
    user: str
    thread_id: str
    message_id: str
    request: JobRequest


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


@attrs.define
class _Start:
    request: StartRequest
    done: trio.Event = attrs.Factory(trio.Event)
    result: outcome.Outcome[tuple[JobRecord, bool]] | None = None


class Registry:
    """Start with ``await nursery.start(registry.run)``."""

    def __init__(
        self,
        config: Config,
        store: Store,
        clock: WallClock,
        jobs: Supervisor[JobActor],
        resolve_model: Callable[[JobRequest], Model],
        *,
        instance_id: str,
        tools: Tools,
        notifier: Notifier | None = None,
    ) -> None:
        self._instance_id = instance_id
        self._tools = tools
        self._notifier = notifier
        self._config = config
        self._store = store
        self._clock = clock
        self._jobs = jobs
        self._resolve_model = resolve_model
        self._mailbox_send, self._mailbox_receive = trio.open_memory_channel[_Start](MAILBOX_SIZE)
        self._running_by_user: Counter[str] = Counter()
        self._reserved_by_user: Counter[str] = Counter()  # slots of admissions under way
        self._reserved = 0  # their total, kept as they change: asked for at every admission
        self._admitting = trio.Semaphore(MAX_ADMITTING)
        self._in_flight: dict[tuple[str, str], trio.Event] = {}  # (user, message_id) being admitted
        self._running_by_key: dict[tuple[str, str], JobRecord] = {}  # jobs running here, by the same
        self._reservations_released = trio.Event()
        self._accepting = True
        self._started_total = 0
        self._finished_total: Counter[str] = Counter()
        self._endings_total: Counter[tuple[str, str]] = Counter()

    # -- the actor ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve starts until cancelled. Cancellation: starts being admitted fail with
        ``UnavailableError`` for their callers (who may retry with the same ``message_id``)."""
        task_status.started()
        async with trio.open_nursery() as nursery:
            async for start in self._mailbox_receive:
                await self._admitting.acquire()
                nursery.start_soon(self._serve, start)
                self._take_waiting_starts(nursery)

    def _take_waiting_starts(self, nursery: trio.Nursery) -> None:
        """Start admitting every start already in the mailbox, without a checkpoint each."""
        while True:
            try:
                self._admitting.acquire_nowait()
            except trio.WouldBlock:
                return
            try:
                start = self._mailbox_receive.receive_nowait()
            except trio.WouldBlock:
                self._admitting.release()
                return
            nursery.start_soon(self._serve, start)

    async def _serve(self, start: _Start) -> None:
        try:
            start.result = await outcome.acapture(self._admit_in_turn, start.request)
        finally:
            if start.result is None:  # cancelled mid-admission: the caller must not hang
                start.result = outcome.Error(UnavailableError("the registry restarted; try again"))
            start.done.set()
            self._admitting.release()

    async def _admit_in_turn(self, req: StartRequest) -> tuple[JobRecord, bool]:
        """Admit ``req`` after any admission of the same ``(user, message_id)`` under way."""
        key = (req.user, req.message_id)
        while (earlier := self._in_flight.get(key)) is not None:
            await earlier.wait()
        running = self._running_by_key.get(key)
        if running is not None:  # a repeat of a job running here: no store round trip
            return running, True
        done = self._in_flight[key] = trio.Event()
        try:
            return await self._admit(req)
        finally:
            del self._in_flight[key]
            done.set()

    async def _admit(self, req: StartRequest) -> tuple[JobRecord, bool]:
        # A slot reserved by an admission under way may turn out unused (a repeat): wait
        # for those rather than refuse a start that only they stand in the way of.
        while self._accepting and self._only_reservations_in_the_way(req.user):
            await self._reservations_released.wait()
        if not self._accepting or self._at_capacity(req.user) is not None:
            # Slow path: a start that repeats a message_id needs no slot.
            existing = await self._store.find_job(req.user, req.message_id)
            if existing is not None:
                return existing, True
            if not self._accepting:
                raise UnavailableError("the server is shutting down; start the job elsewhere or later")
            error = self._at_capacity(req.user)
            if error is not None:
                raise error
        model = self._resolve_model(req.request)
        self._reserved_by_user[req.user] += 1  # held while the store is asked
        self._reserved += 1
        try:
            return await self._create(req, model)
        finally:
            self._reserved -= 1
            self._reserved_by_user[req.user] -= 1
            if self._reserved_by_user[req.user] <= 0:
                del self._reserved_by_user[req.user]
            self._reservations_released.set()
            self._reservations_released = trio.Event()

    async def _create(self, req: StartRequest, model: Model) -> tuple[JobRecord, bool]:
        now = self._clock.now()
        record = self._new_record(req, now)
        # Insert-if-absent in one round trip; a shared store also takes a cluster-wide slot.
        capacity = SharedCapacity(
            now=now,
            lease_until=now + self._config.lease_ttl,
            max_jobs=self._config.max_jobs,
            max_jobs_per_user=self._config.max_jobs_per_user,
        )
        record, created = await self._store.create_job(record, capacity)
        if not created:
            return record, True
        actor = JobActor(
            record,
            config=self._config,
            store=self._store,
            model=model,
            clock=self._clock,
            tools=self._tools,
            notifier=self._notifier,
        )
        # Not waiting for the actor to run keeps admission fast under load; an abort that
        # comes first still counts (the actor's cancel scope exists already).
        self._jobs.start_child_soon(
            ChildSpec(
                name=record.job_id,
                run=partial(self._run_job, actor),
                restart=Restart.TEMPORARY,
                shutdown=self._config.drain_timeout,
                address=actor,
            )
        )
        self._running_by_user[record.user] += 1
        self._running_by_key[record.user, record.message_id] = record
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

    def _at_capacity(self, user: str, *, reserved: bool = True) -> CapacityError | None:
        """The limit ``user`` is at, counting admissions under way unless ``reserved`` is false."""
        retry = self._config.capacity_retry_after_ms
        pending = self._reserved if reserved else 0
        if self._jobs.count_children() + pending >= self._config.max_jobs:
            return CapacityError(
                f"the server is at its limit of {self._config.max_jobs} running jobs", retry_after_ms=retry
            )
        pending = self._reserved_by_user[user] if reserved else 0
        if self._running_by_user[user] + pending >= self._config.max_jobs_per_user:
            return CapacityError(
                f"you have {self._config.max_jobs_per_user} jobs running, the most allowed",
                retry_after_ms=retry,
            )
        return None

    def _only_reservations_in_the_way(self, user: str) -> bool:
        return self._at_capacity(user) is not None and self._at_capacity(user, reserved=False) is None

    async def _run_job(self, actor: JobActor, *, task_status: trio.TaskStatus[None]) -> None:
        """The job's supervised child: the actor, then its release from the counts."""
        try:
            await actor.run(task_status=task_status)
        finally:
            terminal = actor.log.terminal
            status = terminal.status if terminal else "failed"
            code = (terminal.error.code if terminal.error else "") if terminal else "internal"
            self._finished_total[status] += 1
            self._endings_total[status, code] += 1
            user = actor.record.user
            self._running_by_key.pop((user, actor.record.message_id), None)
            self._running_by_user[user] -= 1
            if self._running_by_user[user] <= 0:
                del self._running_by_user[user]

    # -- the address ------------------------------------------------------------------

    async def start_job(self, req: StartRequest) -> tuple[JobRecord, bool]:
        """Admit and start a job; return its record and whether it already existed.

        Raises ``CapacityError`` at a limit, ``UnavailableError`` when shutting down,
        ``BadRequestError`` for a model that cannot be resolved. Cancellation: the start
        may still happen; a retry with the same ``message_id`` finds it.
        """
        start = _Start(req)
        await self._mailbox_send.send(start)
        await start.done.wait()
        assert start.result is not None
        return start.result.unwrap()

    def live(self, job_id: str) -> JobActor | None:
        """The actor of a job running in this process, if any (a read; never blocks)."""
        return self._jobs.lookup(job_id)

    def stop_accepting(self) -> None:
        """Refuse new jobs from now on (``UnavailableError``); repeats still find theirs."""
        self._accepting = False

    def statistics(self) -> RegistryStatistics:
        finished: dict[str, int] = dict(self._finished_total)
        return RegistryStatistics(
            running=self._jobs.count_children(),
            users_running=len(self._running_by_user),
            started_total=self._started_total,
            finished_total=finished,
            endings_total=dict(self._endings_total),
            mailbox_waiting=self._mailbox_send.statistics().current_buffer_used,
            admitting=MAX_ADMITTING - self._admitting.value,
            accepting=self._accepting,
        )
