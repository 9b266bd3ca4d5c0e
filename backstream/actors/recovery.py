"""What a new owner does with an orphan handed to it (``Leases.take_orphans``).

The hand-over is the store's (new owner, new lease, epoch + 1, the old writer fenced
off); the policy is the runtime's. ``InterruptOrphans``, the default, ends the job
``interrupted`` after its durable entries, through the normal commit path, so its
outbox entry (and with it the user's notification) comes as for any job's end.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from backstream.actors.clock import WallClock
from backstream.actors.ports import Handover, LogStore
from backstream.protocol.lifecycle import interruption
from backstream.protocol.records import JobProgress, JobRecord

__all__ = ["InterruptOrphans", "RecoveryPolicy"]


class RecoveryPolicy(Protocol):
    async def recover(self, handover: Handover) -> JobRecord:
        """Carry on (or end) a job taken over from a dead instance; return its record.
        Raises ``UnavailableError``. Cancellation: the job stays this instance's until
        its lease lapses, then it is an orphan again."""
        ...


class InterruptOrphans:
    """End every orphan ``interrupted``, content kept (``lifecycle.interruption``)."""

    def __init__(self, log_store: LogStore, clock: WallClock, retention: float) -> None:
        self._log_store = log_store
        self._clock = clock
        self._retention = retention

    async def recover(self, handover: Handover) -> JobRecord:
        """Commit the ``interrupted`` terminal entry after the durable ones (epoch as handed
        over). Raises ``UnavailableError``. Cancellation: the commit happened or not; a job
        left running is an orphan again once its new lease lapses."""
        record = handover.record
        now = self._clock.now()
        step = interruption(record.seq, record.epoch)  # its epoch: the hand-over counted it
        progress = JobProgress(
            status=step.status_event.status,
            seq=step.seq,
            content_length=record.content_length,
            updated_at=now,
            finished_at=now,
            error=None,
            usage=record.usage,
            expires_at=now + self._retention,
        )
        await self._log_store.commit(record.job_id, [step.status_event], progress)
        return attrs.evolve(record.advanced(progress), lease_until=None)
