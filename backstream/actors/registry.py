"""The registry actor: admission, the jobs running here, and retention.

It owns the set of jobs running in this runtime. Starts go through its
mailbox, one at a time, so that the capacity check, the idempotency check and
the creation of the job are one step. The retention sweep is its second task.
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
from backstream.protocol.events import ErrorInfo, TextEvent
from backstream.protocol.ids import new_id
from backstream.protocol.records import JobProgress, JobRecord, JobRequest, SharedCapacity

__all__ = ["Registry", "RegistryStatistics", "StartRequest"]

log = logging.getLogger("backstream.registry")

MAILBOX_SIZE = 256
"""Starts waiting for the registry; when full, callers of ``start_job`` wait (backpressure)."""


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
    """Jobs ended, by (status, error code); the code is "" for an ending without error."""
    swept_total: int
    mailbox_waiting: int
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
        jobs: Supervisor,
        resolve_model: Callable[[JobRequest], Model],
        *,
        instance_id: str = "local",
        tools: Tools,
        notifier: Notifier | None = None,
    ) -> None:
        self.instance_id = instance_id
        self._tools = tools
        self._notifier = notifier
        self.local_watches: Callable[[], list[tuple[str, str]]] = list
        self._config = config
        self._store = store
        self._clock = clock
        self._jobs = jobs
        self._resolve_model = resolve_model
        self._mailbox_send, self._mailbox_receive = trio.open_memory_channel[_Start](MAILBOX_SIZE)
        self._live: dict[str, JobActor] = {}
        self._running_by_user: Counter[str] = Counter()
        self._accepting = True
        self._started_total = 0
        self._finished_total: Counter[str] = Counter()
        self._endings_total: Counter[tuple[str, str]] = Counter()
        self._swept_total = 0
        self._idle = trio.Event()
        self._idle.set()

    # -- the actor ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve starts and sweep expired jobs until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sweep_loop)
            nursery.start_soon(self._flush_ticker)
            task_status.started()
            async for start in self._mailbox_receive:
                try:
                    start.result = await outcome.acapture(self._admit, start.request)
                finally:
                    if start.result is None:  # cancelled mid-admission: the caller must not hang
                        start.result = outcome.Error(UnavailableError("the registry restarted; try again"))
                    start.done.set()

    async def _admit(self, req: StartRequest) -> tuple[JobRecord, bool]:
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
        now = self._clock.now()
        record = JobRecord(
            job_id=new_id("j_", now),
            user=req.user,
            thread_id=req.thread_id,
            message_id=req.message_id,
            request=req.request,
            status="running",
            seq=0,
            epoch=1,
            content_length=0,
            created_at=now,
            updated_at=now,
            owner=self.instance_id,
            lease_until=now + self._config.lease_ttl,
        )
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
        self._live[record.job_id] = actor
        self._running_by_user[record.user] += 1
        self._started_total += 1
        self._idle = trio.Event() if len(self._live) == 1 else self._idle
        try:
            # Not waiting for the actor to run keeps admission fast under load; an abort
            # that comes first still counts (the actor's cancel scope exists already).
            self._jobs.start_child_soon(
                ChildSpec(name=record.job_id, run=partial(self._run_job, actor), restart=Restart.TEMPORARY)
            )
        except BaseException:
            self._forget(actor)
            raise
        return record, False

    def _at_capacity(self, user: str) -> CapacityError | None:
        retry = self._config.capacity_retry_after_ms
        if len(self._live) >= self._config.max_jobs:
            return CapacityError(
                f"the server is at its limit of {self._config.max_jobs} running jobs", retry_after_ms=retry
            )
        if self._running_by_user[user] >= self._config.max_jobs_per_user:
            return CapacityError(
                f"you have {self._config.max_jobs_per_user} jobs running, the most allowed",
                retry_after_ms=retry,
            )
        return None

    async def _run_job(self, actor: JobActor, *, task_status: trio.TaskStatus[None]) -> None:
        """The job's supervised child: the actor, then its release from the registry."""
        try:
            await actor.run(task_status=task_status)
        finally:
            try:
                if not actor.closed_in_store:
                    # The actor died outside its own guards: record the job as failed.
                    with trio.CancelScope(shield=True) as scope:
                        scope.deadline = trio.current_time() + self._config.finalize_timeout
                        await self._record_crash(actor)
            finally:
                terminal = actor.log.terminal
                self._count_ending(
                    terminal.status if terminal else "failed",
                    (terminal.error.code if terminal.error else "") if terminal else "internal",
                )
                self._forget(actor)

    async def _record_crash(self, actor: JobActor) -> None:
        now = self._clock.now()
        progress = JobProgress(
            status="failed",
            seq=actor.flushed_seq,
            content_length=actor.flushed_content_length,
            updated_at=now,
            finished_at=now,
            error=ErrorInfo("internal", "the job failed on an internal error"),
            expires_at=now + self._config.retention,
        )
        try:
            await self._store.commit(actor.job_id, (), progress)
        except Exception:
            log.exception("job %s: could not record its failure in the store", actor.job_id)

    def _forget(self, actor: JobActor) -> None:
        if self._live.pop(actor.job_id, None) is None:
            return
        user = actor.record.user
        self._running_by_user[user] -= 1
        if self._running_by_user[user] <= 0:
            del self._running_by_user[user]
        if not self._live:
            self._idle.set()

    async def _flush_ticker(self) -> None:
        """Every flush_ms, wake the flushers of the jobs with new entries: one timer for all
        jobs instead of one per job."""
        while True:
            await trio.sleep(self._config.flush_seconds)
            for actor in self._live.values():
                if actor.has_unflushed:
                    actor.request_flush()

    async def _sweep_loop(self) -> None:
        while True:
            await trio.sleep(self._config.sweep_interval)
            try:
                swept = await self._store.delete_expired(self._clock.now())
            except UnavailableError as exc:
                log.warning("retention sweep skipped: %s", exc)  # the next one catches up
                continue
            if swept:
                self._swept_total += len(swept)
                log.debug("swept %d expired jobs", len(swept))

    # -- the address ------------------------------------------------------------------

    async def start_job(self, req: StartRequest) -> tuple[JobRecord, bool]:
        """Admit and start a job; return its record and whether it already existed.

        Raises ``CapacityError`` at a limit, ``UnavailableError`` when shutting
        down. Cancellation: the start may still happen; a retry with the same
        ``message_id`` finds it.
        """
        start = _Start(req)
        await self._mailbox_send.send(start)
        await start.done.wait()
        assert start.result is not None
        return start.result.unwrap()

    def live(self, job_id: str) -> JobActor | None:
        """The actor of a job running in this process, if any (a read; never blocks)."""
        return self._live.get(job_id)

    def stop_accepting(self) -> None:
        self._accepting = False

    async def wait_idle(self) -> None:
        """Wait until no job runs here."""
        await self._idle.wait()

    async def keep_leases(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew this instance's leases and recover the jobs of dead instances, periodically."""
        task_status.started()
        while True:
            await trio.sleep(self._config.lease_renew_interval)
            now = self._clock.now()
            try:
                until = now + self._config.lease_ttl
                if self._live:
                    await self._store.renew_leases(self.instance_id, list(self._live), until)
                watches = self.local_watches()
                if watches:
                    await self._store.renew_watches(watches, until)
                await self.recover_orphans()
            except UnavailableError as exc:
                # Leases lapse only after lease_ttl: an outage shorter than that costs nothing.
                log.warning("lease renewal skipped: %s", exc)

    async def recover_orphans(self) -> list[JobRecord]:
        """End ``interrupted`` the running jobs that no live instance owns."""
        recovered = await self._store.recover_orphans(
            self.instance_id, self._clock.now(), self._config.retention
        )
        for record in recovered:
            log.warning(
                "job %s: its instance is gone; ended interrupted at seq %d", record.job_id, record.seq
            )
            self._count_ending("interrupted", "")
            if self._notifier is not None:
                entries = await self._store.read(record.job_id, 0, record.seq)
                content = "".join(e.text for e in entries if isinstance(e, TextEvent))
                await self._notifier.job_ended(
                    job_id=record.job_id,
                    user=record.user,
                    thread_id=record.thread_id,
                    status="interrupted",
                    content=content,
                    error=None,
                )
        return recovered

    def _count_ending(self, status: str, error_code: str) -> None:
        self._finished_total[status] += 1
        self._endings_total[status, error_code] += 1

    def statistics(self) -> RegistryStatistics:
        finished: dict[str, int] = dict(self._finished_total)
        return RegistryStatistics(
            running=len(self._live),
            users_running=len(self._running_by_user),
            started_total=self._started_total,
            finished_total=finished,
            endings_total=dict(self._endings_total),
            swept_total=self._swept_total,
            mailbox_waiting=self._mailbox_send.statistics().current_buffer_used,
            accepting=self._accepting,
        )
