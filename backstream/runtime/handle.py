"""One handle on a job, wherever it runs.

A job is either running here, with its actor (``LiveJob``: always the freshest view, and
its operations go straight to the actor), or not: ended, or running on another instance
that shares the store (``StoredJob``: its stored record, and its operations go through the
store: an abort is requested there, a decision sent there, and the wait for their effect
is bounded by ``config.remote_abort_wait``). ``JobHandles.lookup`` picks one, once per
call of the runtime, and checks that the job is the user's; the runtime then only calls
the ``JobHandle``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from backstream.actors.job import JobActor
from backstream.actors.joblog import summarize_events
from backstream.actors.ports import JobAccess
from backstream.actors.remote_tail import RemoteTails
from backstream.actors.watcher import LiveSource, LogSource, StoredSource
from backstream.protocol.errors import ConflictError, NotFoundError
from backstream.protocol.events import (
    AWAITING_APPROVAL,
    TERMINAL_STATUSES,
    ApprovalEvent,
    ApprovalRequiredEvent,
    JobInfo,
    JobSummary,
    LogEvent,
)
from backstream.protocol.records import JobRecord, job_summary
from backstream.protocol.workflow import current_step, workflow_name_of

__all__ = ["AbortResult", "JobHandle", "JobHandles", "LiveJob", "LogView", "StoredJob"]


@attrs.frozen
class AbortResult:
    aborted: bool
    job: JobSummary


@attrs.frozen
class LogView:
    """Where a watch of the job reads from, and where the log stands as it opens."""

    source: LogSource
    epoch: int
    last_seq: int
    finished: bool
    record: JobRecord
    """The job's record as the view opened (``kept_through`` tells what readers of an
    earlier epoch may keep)."""


class JobHandle(Protocol):
    """What the runtime does with a job, wherever it runs. Every method is the user's
    (the handle was looked up for them)."""

    @property
    def job_id(self) -> str: ...

    def summary(self) -> JobSummary:
        """The job's wire summary, with the watches open here."""
        ...

    def log_view(self) -> LogView:
        """The log to watch, its epoch, its last seq and whether the job had ended. The
        caller closes the view's source when it is done with it."""
        ...

    async def info(self, *, include_content: bool, offset: int) -> JobInfo:
        """The summary and, with ``include_content``, the text from character ``offset``
        and the tool calls. Cancellation: nothing changes."""
        ...

    async def log(self) -> tuple[JobRecord, tuple[LogEvent, ...]]:
        """The record and every log entry so far, as stored. Cancellation: nothing changes."""
        ...

    async def wait_until_ended(self) -> JobSummary:
        """Wait for the job's end and return its summary. Cancellation: only the wait
        stops. A job of another instance is waited for ``remote_abort_wait`` at most (its
        summary may then still show it running)."""
        ...

    async def abort(self) -> AbortResult:
        """Stop the job (it ends ``aborted``), then ``wait_until_ended``. ``aborted`` is
        False if it had already ended. Cancellation: the abort, once requested, stands."""
        ...

    async def approve(self, call_id: str, approved: bool) -> JobSummary:
        """Decide on a call waiting for approval and wait until the job has logged it.
        Raises ``ConflictError`` when that call is not waiting. Cancellation: the decision,
        once handed over, stands; only the wait is abandoned."""
        ...


class LiveJob:
    """A job running here: its actor."""

    def __init__(self, actor: JobActor, watchers: Callable[[str], int]) -> None:
        self._actor = actor
        self._watchers = watchers

    @property
    def job_id(self) -> str:
        return self._actor.job_id

    def summary(self) -> JobSummary:
        return self._actor.summary(self._watchers(self.job_id))

    def log_view(self) -> LogView:
        log = self._actor.log
        return LogView(LiveSource(log), log.epoch, log.last_seq, log.terminal is not None, self._actor.record)

    async def info(self, *, include_content: bool, offset: int) -> JobInfo:
        await trio.lowlevel.checkpoint()
        if not include_content:
            return JobInfo(job=self.summary())
        log = self._actor.log
        step = current_step(log.entries()) if workflow_name_of(self._actor.record.model) else None
        return JobInfo(
            job=self.summary(), content=log.content(offset), tool_calls=log.tool_calls(), step=step
        )

    async def log(self) -> tuple[JobRecord, tuple[LogEvent, ...]]:
        await trio.lowlevel.checkpoint()
        # The snapshot, not the record it started with: its status agrees with the entries
        # (a job whose log just ended reads as ended, before its actor is gone).
        return self._actor.snapshot(), tuple(self._actor.log.entries())

    async def wait_until_ended(self) -> JobSummary:
        await self._actor.finished.wait()
        return self.summary()

    async def abort(self) -> AbortResult:
        was_running = self._actor.log.terminal is None
        self._actor.abort()
        summary = await self.wait_until_ended()
        return AbortResult(aborted=was_running and summary.status == "aborted", job=summary)

    async def approve(self, call_id: str, approved: bool) -> JobSummary:
        pending = self._actor.decide(call_id, approved)
        if pending is None:
            raise ConflictError(f"call {call_id!r} is not waiting for approval")
        async with trio.open_nursery() as nursery:

            async def until(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(until, pending.applied)
            nursery.start_soon(until, self._actor.finished)
        return self.summary()


class StoredJob:
    """A job not running here (ended, or running on another instance): its stored record,
    and the store to act through."""

    def __init__(
        self,
        record: JobRecord,
        store: JobAccess,
        watchers: Callable[[str], int],
        *,
        remote_wait: float,
        tails: RemoteTails | None = None,
    ) -> None:
        self._record = record
        self._store = store
        self._watchers = watchers
        self._remote_wait = remote_wait
        self._tails = tails

    @property
    def job_id(self) -> str:
        return self._record.job_id

    def summary(self) -> JobSummary:
        return job_summary(self._record, self._watchers(self.job_id))

    def log_view(self) -> LogView:
        """A running job's log is read through this instance's tail of it (shared by its
        watchers here: close the source when the watch ends); a finished one's straight."""
        record = self._record
        finished = record.status in TERMINAL_STATUSES
        source: LogSource
        if finished or self._tails is None:
            source = StoredSource(self._store, record.job_id, record.epoch, durable_seq=record.seq)
        else:
            source = self._tails.open(record.job_id, record.epoch, record.seq)
        return LogView(source, record.epoch, record.seq, finished, record)

    async def info(self, *, include_content: bool, offset: int) -> JobInfo:
        if not include_content:
            await trio.lowlevel.checkpoint()
            return JobInfo(job=self.summary())
        entries = await self._store.read(self.job_id, 0, self._record.seq)
        content, calls = summarize_events(entries)
        step = current_step(entries) if workflow_name_of(self._record.model) else None
        return JobInfo(job=self.summary(), content=content[offset:], tool_calls=calls, step=step)

    async def log(self) -> tuple[JobRecord, tuple[LogEvent, ...]]:
        entries = await self._store.read(self.job_id, 0, self._record.seq) if self._record.seq else []
        return self._record, tuple(entries)

    async def wait_until_ended(self) -> JobSummary:
        await self._wait_while(lambda record: record.status not in TERMINAL_STATUSES)
        return self.summary()

    async def abort(self) -> AbortResult:
        if self._record.status in TERMINAL_STATUSES:
            await trio.lowlevel.checkpoint()
            return AbortResult(aborted=False, job=self.summary())
        # It runs on another instance: ask it through the store, then wait (bounded) for its end.
        await self._store.request_abort(self.job_id)
        summary = await self.wait_until_ended()
        return AbortResult(aborted=summary.status == "aborted", job=summary)

    async def approve(self, call_id: str, approved: bool) -> JobSummary:
        record = self._record
        waiting = record.status == AWAITING_APPROVAL
        entries = await self._store.read(self.job_id, 0, record.seq) if waiting else []
        asked = {e.call_id for e in entries if isinstance(e, ApprovalRequiredEvent)}
        answered = {e.call_id for e in entries if isinstance(e, ApprovalEvent)}
        if call_id not in asked - answered:
            raise ConflictError(f"call {call_id!r} is not waiting for approval")
        await self._store.send_decision(self.job_id, call_id, approved)
        await self._wait_while(lambda record: record.status == AWAITING_APPROVAL)
        return self.summary()

    async def _wait_while(self, waiting: Callable[[JobRecord], bool]) -> None:
        """Follow the record while ``waiting`` holds, for ``remote_wait`` at most, then read
        it once more (what happened meanwhile). The job's commits are followed for the
        whole wait (one subscription, not one per round)."""
        with trio.move_on_after(self._remote_wait), self._store.follow_job(self.job_id):
            while waiting(self._record):
                await self._store.wait_for_entries(self.job_id, self._record.seq)
                await self._reload()
        await self._reload()

    async def _reload(self) -> None:
        record = await self._store.get_job(self.job_id)
        if record is None or record.user != self._record.user:  # swept meanwhile
            raise NotFoundError()
        self._record = record


class JobHandles:
    """Looks jobs up for the runtime: the live actor if the job runs here, else its record."""

    def __init__(
        self,
        store: JobAccess,
        live: Callable[[str], JobActor | None],
        watchers: Callable[[str], int],
        *,
        remote_wait: float,
        tails: RemoteTails | None = None,
    ) -> None:
        self._store = store
        self._live = live
        self._watchers = watchers
        self._remote_wait = remote_wait
        self.tails = tails

    async def lookup(self, job_id: str, user: str) -> JobHandle:
        """The user's job ``job_id``: ``LiveJob`` if it runs here (always the freshest view),
        else ``StoredJob``. Raises ``NotFoundError``; ``UnavailableError`` while the store is
        away (for a job not running here).

        An actor leaves the registry only after its final write, so when none is found the
        store's record is final for jobs of this process. Another user's running job is
        looked up in the store like any job not found here, so that it answers exactly as a
        missing one does (``UnavailableError`` while the store is away, not an immediate
        ``NotFoundError`` that would tell it exists). Cancellation: nothing changes.
        """
        actor = self._live(job_id) if isinstance(job_id, str) else None
        if actor is not None and actor.record.user == user:
            await trio.lowlevel.checkpoint()
            return LiveJob(actor, self._watchers)
        if not isinstance(job_id, str) or not job_id:
            raise NotFoundError()
        record = await self._store.get_job(job_id)
        if record is None or record.user != user:
            raise NotFoundError()
        return self.of(record)

    def of(self, record: JobRecord) -> JobHandle:
        """The handle of a job whose record the caller has read (and checked is the user's):
        its actor's if it runs here, else the record's."""
        actor = self._live(record.job_id)
        if actor is not None:
            return LiveJob(actor, self._watchers)
        return StoredJob(record, self._store, self._watchers, remote_wait=self._remote_wait, tails=self.tails)
