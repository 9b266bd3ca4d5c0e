"""What a new owner does with an orphan handed to it (``Leases.take_orphans``).

The hand-over is the store's (new owner, new lease, epoch + 1, the old writer fenced
off); the policy is the runtime's. ``InterruptOrphans`` ends the job ``interrupted``
after its durable entries, through the normal commit path, so its outbox entry (and with
it the user's notification) comes as for any job's end. ``ContinueOrphans`` rebuilds the
job's actor from the durable entries and runs it here, with the same job id, under the
continuation policy of its model (``protocol/continuation.py``); a job it may not
continue it ends as ``InterruptOrphans`` does.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Protocol

import attrs

from backstream.actors.clock import WallClock
from backstream.actors.config import Config
from backstream.actors.joblog import JobLog
from backstream.actors.ports import Handover, LogStore, Model
from backstream.protocol.continuation import Continuation
from backstream.protocol.lifecycle import IllegalOrder, LogState, interruption
from backstream.protocol.records import JobProgress, JobRecord

__all__ = [
    "Adopter",
    "ContinueOrphans",
    "ContinueStatistics",
    "InterruptOrphans",
    "ModelOf",
    "RecoveryPolicy",
]

log = logging.getLogger("backstream.recovery")


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


ModelOf = Callable[[JobRecord], tuple[Model, Continuation] | None]
"""The model that serves a job taken over, and its continuation policy; None if this
instance cannot serve it (its model is no longer allowed, or needs an upstream it lacks)."""


class Adopter(Protocol):
    async def adopt(
        self, record: JobRecord, model: Model, log: JobLog, continuation: Continuation, job_timeout: float
    ) -> None:
        """Run the job taken over here, continued from ``log`` (the registry counts it).
        Cancellation: the job may or may not have been started."""
        ...


@attrs.frozen
class ContinueStatistics:
    taken_over_total: int
    """Orphans continued here (each counted once per hand-over)."""
    interrupted_total: dict[str, int]
    """Orphans ended ``interrupted`` instead, by why: policy, limit, timeout, model, log."""


class ContinueOrphans:
    """Continue each orphan here, unless its model's policy is ``interrupt``, it was taken
    over ``max_continuations`` times already after a crash (its epoch counts the
    hand-overs, less the hand-offs of instances that stopped cleanly), its
    ``job_timeout`` has passed (counted from its creation, the time it was away included),
    this instance cannot serve its model, or its log cannot be continued: then it ends
    ``interrupted`` (``InterruptOrphans``)."""

    def __init__(
        self, config: Config, log_store: LogStore, clock: WallClock, adopter: Adopter, model_of: ModelOf
    ) -> None:
        self._config = config
        self._clock = clock
        self._adopter = adopter
        self._model_of = model_of
        self._interrupt = InterruptOrphans(log_store, clock, config.retention)
        self._taken_over_total = 0
        self._interrupted_total: Counter[str] = Counter()

    async def recover(self, handover: Handover) -> JobRecord:
        """Start the job's actor here, or end it ``interrupted``. Raises ``UnavailableError``
        (interrupting). Cancellation: see ``RecoveryPolicy``."""
        record = handover.record
        left = self._config.job_timeout - max(0.0, self._clock.now() - record.created_at)
        resolved = self._model_of(record)
        why = None
        if resolved is None:
            why = "model"
        elif resolved[1] is Continuation.INTERRUPT:
            why = "policy"
        elif record.epoch - 1 - record.handoffs > self._config.max_continuations:
            why = "limit"
        elif left <= 0:
            why = "timeout"
        rebuilt = self._rebuild(handover) if why is None else None
        if why is None and rebuilt is None:
            why = "log"
        if why is not None or resolved is None or rebuilt is None:
            self._interrupted_total[why or "log"] += 1
            return await self._interrupt.recover(handover)
        model, policy = resolved
        await self._adopter.adopt(record, model, rebuilt, policy, left)
        self._taken_over_total += 1
        return record

    def _rebuild(self, handover: Handover) -> JobLog | None:
        record = handover.record
        try:
            rebuilt = JobLog.from_entries(
                record.job_id, record.epoch, handover.entries, max_output_chars=self._config.max_output_chars
            )
        except (ValueError, IllegalOrder) as exc:
            log.error("job %s: its stored log cannot be continued (%s)", record.job_id, exc)
            return None
        return None if rebuilt.state is LogState.ENDED else rebuilt

    def statistics(self) -> ContinueStatistics:
        return ContinueStatistics(
            taken_over_total=self._taken_over_total, interrupted_total=dict(self._interrupted_total)
        )
