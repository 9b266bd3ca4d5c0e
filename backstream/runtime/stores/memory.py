"""``MemoryStore``: the store for tests and embedding, all in this process.

Bounded by what it holds: jobs within retention. Log entries are the same
frozen objects the job log holds, so storing them costs a list slot each; once
a job has ended its entries are kept compact (``protocol.compact``).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

import attrs
import trio

from backstream.actors.ports import Handover, NotificationListener, OutboxEntry
from backstream.actors.signals import OUTBOX_BELL
from backstream.protocol.compact import CompactEntries
from backstream.protocol.events import LogEvent, StatusEvent
from backstream.protocol.lifecycle import is_terminal
from backstream.protocol.records import JobProgress, JobRecord, SharedCapacity, log_bytes, request_bytes
from backstream.runtime.stores.local import LocalStore
from backstream.runtime.stores.local_notifications import MemoryShelf
from backstream.runtime.stores.memory_webhooks import MemoryWebhookQueue
from backstream.runtime.stores.shared import outbox_entry, plan_commit, quota_exceeded

__all__ = ["MemoryStore", "MemoryStoreStatistics"]


@attrs.define
class _StoredJob:
    record: JobRecord
    entries: list[LogEvent] | CompactEntries = attrs.Factory(list)
    log_bytes: int = 0
    """``log_bytes`` of the batches appended, summed."""
    charged: int = 0
    """What its user's stored bytes count of it (its request; at its end, its log too)."""


class MemoryStore(LocalStore, MemoryWebhookQueue):
    """Everything in this process. Nothing here waits on I/O: each method is atomic, and
    cancelling one before it returns changes nothing. ``aclose`` changes nothing either
    (the data stays until the object goes). Capabilities: none (one process, no leases)."""

    def __init__(self) -> None:
        self._shelf = MemoryShelf()
        super().__init__(self._shelf)
        self._outbox: dict[str, OutboxEntry] = {}  # in write order
        self._jobs: dict[str, _StoredJob] = {}
        self._by_message: dict[tuple[str, str], str] = {}
        # Per user, job ids in creation order (a dict as an ordered set).
        self._by_user: dict[str, dict[str, None]] = {}
        self._expiry: list[tuple[float, str]] = []  # heap; stale rows are skipped
        self._stored_bytes: dict[str, int] = {}  # per user: the jobs' charges, summed
        self._init_webhooks()

    async def open(self, *, on_notification: NotificationListener | None = None) -> None:
        await trio.lowlevel.checkpoint()
        self.inbox.on_notification = on_notification

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    async def ping(self) -> None:
        await trio.lowlevel.checkpoint()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Nothing runs in the background. Cancellation: returns."""
        task_status.started()
        await trio.sleep_forever()

    async def create_job(
        self,
        record: JobRecord,
        capacity: SharedCapacity | None = None,
        *,
        max_stored_bytes: int | None = None,
    ) -> tuple[JobRecord, bool]:
        await trio.lowlevel.checkpoint()
        key = (record.user, record.message_id)
        existing = self._by_message.get(key)
        if existing is not None:
            return self._jobs[existing].record, False
        cost = request_bytes(record.request)
        stored = self._stored_bytes.get(record.user, 0)
        if max_stored_bytes is not None and stored + cost > max_stored_bytes:
            raise quota_exceeded(stored, cost, max_stored_bytes)
        self._jobs[record.job_id] = _StoredJob(record, charged=cost)
        self._stored_bytes[record.user] = stored + cost
        self._by_message[key] = record.job_id
        self._by_user.setdefault(record.user, {})[record.job_id] = None
        return record, True

    async def get_job(self, job_id: str) -> JobRecord | None:
        await trio.lowlevel.checkpoint()
        job = self._jobs.get(job_id)
        return job.record if job else None

    async def stored_bytes(self, user: str) -> int:
        await trio.lowlevel.checkpoint()
        return self._stored_bytes.get(user, 0)

    def _charge(self, job: _StoredJob, charge: int) -> None:
        """Set what ``job`` counts against its user's stored bytes (the total follows)."""
        user = job.record.user
        total = self._stored_bytes.get(user, 0) + charge - job.charged
        job.charged = charge
        if total:
            self._stored_bytes[user] = total
        else:
            self._stored_bytes.pop(user, None)

    async def find_job(self, user: str, message_id: str) -> JobRecord | None:
        await trio.lowlevel.checkpoint()
        job_id = self._by_message.get((user, message_id))
        return self._jobs[job_id].record if job_id else None

    async def commit(self, job_id: str, entries: Sequence[LogEvent], progress: JobProgress) -> None:
        await trio.lowlevel.checkpoint()
        job = self._jobs.get(job_id)
        if job is None:
            return  # swept while its last write was under way: nothing to keep
        plan = plan_commit(job_id, entries, progress, len(job.entries))
        if plan.entries and isinstance(job.entries, CompactEntries):
            job.entries = list(job.entries)  # an ended job written again (a recovery): expand
        job.entries.extend(plan.entries)
        job.log_bytes += log_bytes(plan.entries)
        if plan.apply_progress:
            if is_terminal(progress.status):  # its log counts from its end on (again: the same)
                self._charge(job, request_bytes(job.record.request) + job.log_bytes)
            outgoing = outbox_entry(job.record, progress)
            if outgoing is not None:
                self._outbox[job_id] = outgoing
                self.hub.ring(OUTBOX_BELL)
            job.record = job.record.advanced(progress)
            if progress.expires_at is not None:
                heapq.heappush(self._expiry, (progress.expires_at, job_id))
        if isinstance(job.entries, list) and _ends_log(job.entries):
            job.entries = CompactEntries(job.entries)  # read-only from now on: kept small
        self.hub.signal_job(job_id)

    async def read(self, job_id: str, after_seq: int, limit: int) -> list[LogEvent]:
        await trio.lowlevel.checkpoint()
        job = self._jobs.get(job_id)
        if job is None:
            return []
        return job.entries[after_seq : after_seq + limit]

    async def wait_for_entries(self, job_id: str, after_seq: int) -> None:
        job = self._jobs.get(job_id)
        if job is None or len(job.entries) > after_seq or is_terminal(job.record.status):
            await trio.lowlevel.checkpoint()
            return
        await self.hub.wait(("entries", job_id))  # no await since the check: nothing is missed

    async def list_jobs(
        self,
        user: str,
        *,
        thread_id: str | None = None,
        statuses: frozenset[str] | None = None,
        limit: int = 50,
    ) -> list[JobRecord]:
        await trio.lowlevel.checkpoint()
        out: list[JobRecord] = []
        for job_id in reversed(self._by_user.get(user, {})):
            record = self._jobs[job_id].record
            if thread_id is not None and record.thread_id != thread_id:
                continue
            if statuses is not None and record.status not in statuses:
                continue
            out.append(record)
            if len(out) >= limit:
                break
        return out

    async def delete_job(self, job_id: str) -> bool:
        await trio.lowlevel.checkpoint()
        job = self._jobs.get(job_id)
        if job is None or not is_terminal(job.record.status):
            return False
        self._delete(job)  # its entry in the expiry heap is skipped when it comes up
        return True

    async def delete_expired(self, now: float) -> list[str]:
        await trio.lowlevel.checkpoint()
        deleted: list[str] = []
        while self._expiry and self._expiry[0][0] <= now:
            expires_at, job_id = heapq.heappop(self._expiry)
            job = self._jobs.get(job_id)
            if job is None or job.record.expires_at != expires_at:
                continue
            if not is_terminal(job.record.status):
                continue
            self._delete(job)
            deleted.append(job_id)
        return deleted

    def _delete(self, job: _StoredJob) -> None:
        record = job.record
        self._charge(job, 0)  # released with the job: it is gone, never released twice
        del self._jobs[record.job_id]
        self._by_message.pop((record.user, record.message_id), None)
        user_jobs = self._by_user.get(record.user)
        if user_jobs is not None:
            user_jobs.pop(record.job_id, None)
            if not user_jobs:
                del self._by_user[record.user]
        self._outbox.pop(record.job_id, None)  # undelivered by now: dropped with its job
        self.forget_job(record.job_id)  # waiting readers find the job gone

    async def request_abort(self, job_id: str) -> None:
        await trio.lowlevel.checkpoint()
        job = self._jobs.get(job_id)
        if job is not None:
            job.record = attrs.evolve(job.record, abort_requested=True)
            self.hub.signal(("abort", job_id))

    async def wait_abort_requested(self, job_id: str) -> None:
        """Without such a job, no abort ever comes: it waits until cancelled.
        Cancellation: safe; nothing is consumed."""
        while True:
            with self.hub.listen(("abort", job_id)) as listener:
                job = self._jobs.get(job_id)
                if job is not None and job.record.abort_requested:
                    await trio.lowlevel.checkpoint()
                    return
                await listener.wait()

    async def take_orphans(self, owner: str, now: float, lease_until: float) -> list[Handover]:
        """One process, nothing outlives it: no orphans. Cancellation: safe."""
        await trio.lowlevel.checkpoint()
        return []

    async def claim_outbox(self, owner: str, now: float, until: float, limit: int) -> list[OutboxEntry]:
        """One process, one dispatcher: every entry is the caller's. Cancellation: safe."""
        await trio.lowlevel.checkpoint()
        return list(itertools.islice(self._outbox.values(), limit))

    async def delete_outbox(self, job_ids: Sequence[str]) -> None:
        await trio.lowlevel.checkpoint()
        for job_id in job_ids:
            self._outbox.pop(job_id, None)

    def job_count(self) -> int:
        """Jobs held."""
        return len(self._jobs)

    def statistics(self) -> MemoryStoreStatistics:
        return MemoryStoreStatistics(
            jobs=len(self._jobs),
            entries=sum(len(job.entries) for job in self._jobs.values()),
            message_keys=len(self._by_message),
            users=len(self._by_user),
            expiry_rows=len(self._expiry),
            notification_marks=self._shelf.marks() + self.inbox.marks(),
            decisions_waiting=len(self.decisions),
            outbox=len(self._outbox),
        )


@attrs.frozen
class MemoryStoreStatistics:
    jobs: int
    entries: int
    message_keys: int
    users: int
    expiry_rows: int
    notification_marks: int
    decisions_waiting: int
    outbox: int


def _ends_log(entries: list[LogEvent]) -> bool:
    """The log holds its terminal status: nothing more will be appended."""
    return bool(entries) and isinstance(entries[-1], StatusEvent) and entries[-1].is_terminal
