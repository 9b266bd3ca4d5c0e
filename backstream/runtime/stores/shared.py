"""What every store does the same way: which entries a commit appends, how an orphan
ends, and where approval decisions wait in a single process."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import trio

from backstream.actors.ports import LogBehindError, StoreClosedError
from backstream.protocol.events import LogEvent, StatusEvent
from backstream.protocol.lifecycle import interruption
from backstream.protocol.records import JobProgress, JobRecord

__all__ = ["CommitPlan", "DecisionBox", "interrupted", "plan_commit"]


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


def interrupted(record: JobRecord, now: float, retention: float) -> tuple[JobRecord, StatusEvent]:
    """The record of an orphan ended by ``lifecycle.interruption()``, and the entry to append."""
    step = interruption(record.seq, record.epoch)
    final = attrs.evolve(
        record,
        status=step.status_event.status,
        seq=step.seq,
        epoch=step.epoch,
        updated_at=now,
        finished_at=now,
        expires_at=now + retention,
        lease_until=None,
    )
    return final, step.status_event


@attrs.define
class _Slot:
    event: trio.Event = attrs.Factory(trio.Event)
    approved: bool = False
    decided: bool = False


class DecisionBox:
    """Decisions on tool calls, from ``send_decision`` to ``wait_decision``, within one
    process. Owned by one store; the first decision on a call stands."""

    def __init__(self) -> None:
        self._slots: dict[tuple[str, str], _Slot] = {}
        self._closed = False

    def put(self, job_id: str, call_id: str, approved: bool) -> None:
        slot = self._slots.setdefault((job_id, call_id), _Slot())
        if not slot.event.is_set():
            slot.approved = approved
            slot.decided = True
            slot.event.set()

    def close(self) -> None:
        """Wake every waiter with ``StoreClosedError``."""
        self._closed = True
        for slot in self._slots.values():
            slot.event.set()

    async def wait(self, job_id: str, call_id: str) -> bool:
        """Cancellation: safe; a decision put meanwhile stays for the next wait. Close:
        raises ``StoreClosedError``."""
        key = (job_id, call_id)
        slot = self._slots.setdefault(key, _Slot())
        if not slot.event.is_set() and self._closed:
            raise StoreClosedError("the store is closed")
        await slot.event.wait()
        if self._closed and self._slots.get(key) is slot and not slot.decided:
            raise StoreClosedError("the store is closed")
        if self._slots.get(key) is slot:
            del self._slots[key]
        return slot.approved

    def forget_job(self, job_id: str) -> None:
        """Drop the decisions nobody waits for of a job that is gone."""
        for key in [key for key in self._slots if key[0] == job_id]:
            del self._slots[key]

    def __len__(self) -> int:
        return len(self._slots)
