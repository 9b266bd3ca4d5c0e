"""What every store does the same way: which entries a commit appends, what a terminal
commit leaves in the outbox, and where approval decisions wait in a single process."""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AbstractContextManager

import attrs
import cattrs
import trio

from backstream.actors.ports import Inbox, LogBehindError, OutboxEntry, SeatKey, Seats
from backstream.actors.signals import SignalHub
from backstream.protocol.errors import QuotaExceededError
from backstream.protocol.events import LogEvent
from backstream.protocol.lifecycle import is_terminal
from backstream.protocol.records import JobProgress, JobRecord, NotificationRecord

__all__ = [
    "CommitPlan",
    "InboxForwarding",
    "LocalDecisions",
    "LocalSeats",
    "SeatsForwarding",
    "outbox_entry",
    "outbox_from_json",
    "outbox_to_json",
    "plan_commit",
    "quota_exceeded",
]

_converter = cattrs.Converter()


@attrs.frozen
class CommitPlan:
    """What a commit changes in a log that holds ``stored_seq`` entries."""

    entries: list[LogEvent]
    """The entries to append: those the store does not hold yet (a retried commit adds
    nothing twice)."""
    apply_progress: bool
    """Whether the progress is as new as the stored record (a late retry is not)."""


def plan_commit(
    job_id: str, entries: Sequence[LogEvent], progress: JobProgress, stored_seq: int
) -> CommitPlan:
    """Raises ``LogBehindError`` if the commit would leave a gap: its first new entry (or,
    without entries, its progress) is beyond ``stored_seq + 1``. ``progress.seq`` is the
    last entry's (``ValueError`` otherwise), so a record never says more than its log."""
    if entries and entries[-1].seq != progress.seq:
        raise ValueError(f"{job_id}: progress at seq {progress.seq}, entries up to {entries[-1].seq}")
    fresh = [event for event in entries if event.seq > stored_seq]
    if (fresh and fresh[0].seq != stored_seq + 1) or (not fresh and progress.seq > stored_seq):
        raise LogBehindError(job_id, stored_seq)
    return CommitPlan(fresh, progress.seq >= stored_seq)


def outbox_entry(record: JobRecord, progress: JobProgress) -> OutboxEntry | None:
    """The outbox entry a commit of ``progress`` onto ``record`` writes: one when it ends
    a live job (a retried terminal commit writes none)."""
    if is_terminal(record.status) or not is_terminal(progress.status):
        return None
    return OutboxEntry(
        record.job_id, record.user, record.thread_id, progress.status, progress.error, progress.preview
    )


def quota_exceeded(stored: int, cost: int, limit: int) -> QuotaExceededError:
    """The refusal of a job whose request (``cost`` bytes) would take its user's stored
    bytes (``stored``) past ``limit``."""
    return QuotaExceededError(
        f"your jobs hold {stored} bytes in the store and this request takes {cost} more, past your "
        f"quota of {limit} bytes; finished jobs free theirs once their retention expires"
    )


def outbox_to_json(entry: OutboxEntry) -> str:
    return json.dumps(_converter.unstructure(entry), separators=(",", ":"), ensure_ascii=False)


def outbox_from_json(text: str) -> OutboxEntry:
    return _converter.structure(json.loads(text), OutboxEntry)


class LocalDecisions:
    """Decisions on tool calls, from ``send_decision`` to ``wait_decision``, within one
    process (memory, SQLite). The first decision on a call stands; bounded by the jobs
    held (a swept job's decisions go with it)."""

    def __init__(self, hub: SignalHub) -> None:
        self._hub = hub
        self._decided: dict[tuple[str, str], bool] = {}

    def put(self, job_id: str, call_id: str, approved: bool) -> None:
        self._decided.setdefault((job_id, call_id), approved)
        self._hub.signal(("decision", f"{job_id} {call_id}"))

    async def wait(self, job_id: str, call_id: str) -> bool:
        """Cancellation: safe; a decision put meanwhile stays for the next wait. Close:
        raises ``StoreClosedError``."""
        key = (job_id, call_id)
        while True:
            with self._hub.listen(("decision", f"{job_id} {call_id}")) as listener:
                if key in self._decided:
                    await trio.lowlevel.checkpoint()
                    return self._decided.pop(key)
                await listener.wait()

    def forget_job(self, job_id: str) -> None:
        """Drop the decisions nobody waits for of a job that is gone."""
        for key in [key for key in self._decided if key[0] == job_id]:
            del self._decided[key]

    def __len__(self) -> int:
        return len(self._decided)


class InboxForwarding(Inbox):
    """An ``Inbox`` whose every method is that of ``self.inbox``: a store that keeps its
    watches and notifications in a part of its own (``LocalInbox``, ``RedisInbox``)
    lists this base first, so that the part answers for the store."""

    inbox: Inbox

    async def watch_started(self, job_id: str, watch_id: str, until: float) -> None:
        await self.inbox.watch_started(job_id, watch_id, until)

    async def watch_ended(self, job_id: str, watch_id: str, *, saw_end: bool) -> None:
        await self.inbox.watch_ended(job_id, watch_id, saw_end=saw_end)

    async def renew_watches(self, watches: Sequence[tuple[str, str]], until: float) -> None:
        await self.inbox.renew_watches(watches, until)

    async def notify_unwatched(self, notification: NotificationRecord, now: float, max_per_user: int) -> bool:
        return await self.inbox.notify_unwatched(notification, now, max_per_user)

    def notifications_of(self, user: str) -> AbstractContextManager[None]:
        return self.inbox.notifications_of(user)

    async def list_notifications(
        self, user: str, *, unread_only: bool, limit: int
    ) -> tuple[list[NotificationRecord], int]:
        return await self.inbox.list_notifications(user, unread_only=unread_only, limit=limit)

    async def mark_notifications_read(self, user: str, ids: Sequence[str], *, everything: bool) -> int:
        return await self.inbox.mark_notifications_read(user, ids, everything=everything)

    async def set_thread_muted(self, user: str, thread_id: str, muted: bool) -> None:
        await self.inbox.set_thread_muted(user, thread_id, muted)


class LocalSeats(Seats):
    """Seats in a store one process owns (memory, SQLite): a count per user and kind, no
    leases (the seats go with the process). Bounded by the seats held: each is released."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], set[str]] = {}

    async def take_seat(self, user: str, kind: str, seat_id: str, limit: int, lease: float) -> bool:
        await trio.lowlevel.checkpoint()
        held = self._held.setdefault((user, kind), set())
        if seat_id not in held and len(held) >= limit:
            if not held:
                del self._held[(user, kind)]
            return False
        held.add(seat_id)
        return True

    async def release_seat(self, user: str, kind: str, seat_id: str) -> None:
        await trio.lowlevel.checkpoint()
        held = self._held.get((user, kind))
        if held is not None:
            held.discard(seat_id)
            if not held:
                del self._held[(user, kind)]

    async def renew_seats(self, seats: Sequence[SeatKey], lease: float) -> None:
        await trio.lowlevel.checkpoint()


class SeatsForwarding(Seats):
    """A ``Seats`` whose every method is that of ``self.seats`` (``LocalSeats``,
    ``RedisSeats``): a store lists this base first, so that the part answers for it."""

    seats: Seats

    async def take_seat(self, user: str, kind: str, seat_id: str, limit: int, lease: float) -> bool:
        return await self.seats.take_seat(user, kind, seat_id, limit, lease)

    async def release_seat(self, user: str, kind: str, seat_id: str) -> None:
        await self.seats.release_seat(user, kind, seat_id)

    async def renew_seats(self, seats: Sequence[SeatKey], lease: float) -> None:
        await self.seats.renew_seats(seats, lease)
