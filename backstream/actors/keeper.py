"""The keeper: housekeeping that keeps a runtime's share of the store true.

Three periodic duties, each its own loop, so a slow one never delays another:

- the retention sweep deletes finished jobs past their ``expires_at``;
- lease renewal tells a shared store that this instance (so a stopping one knows
  whom it can hand its jobs to) and its running jobs (and its open watches, and the
  seats it holds) are alive;
- orphan recovery takes over the jobs of instances that died, once their leases
  lapse (at start-up too, before new jobs are admitted), and applies the recovery
  policy (the runtime's: continue them here, or end them ``interrupted``).

A store outage skips a round; the next one catches up. Leases lapse only after
``lease_ttl``, so an outage shorter than that costs nothing.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import trio

from backstream.actors.clock import WallClock
from backstream.actors.config import Config
from backstream.actors.ports import Housekeeping, JobEndedElsewhereError
from backstream.actors.presence import WatchPresence
from backstream.actors.recovery import RecoveryPolicy
from backstream.actors.seats import HeldSeats
from backstream.actors.supervisor import Supervisor
from backstream.protocol.errors import UnavailableError
from backstream.protocol.lifecycle import is_terminal
from backstream.protocol.records import JobRecord

__all__ = ["Keeper", "KeeperStatistics"]

log = logging.getLogger("backstream.keeper")


@attrs.frozen
class KeeperStatistics:
    swept_total: int
    recovered_total: int
    continued_total: int
    """Of the jobs recovered, those taken over to run on here (the rest ended)."""
    skipped_rounds_total: int


class Keeper:
    """Run ``keeper.run`` as a supervised child (after ``recover_orphans`` once). A restart
    re-enters ``run`` safely: its loops keep nothing between rounds, and the totals of
    ``statistics`` are meant to outlive a restart. ``recovery`` says what to do with an
    orphan taken over (the runtime's: ``InterruptOrphans``)."""

    def __init__(
        self,
        config: Config,
        store: Housekeeping,
        clock: WallClock,
        jobs: Supervisor[Any],
        presence: WatchPresence,
        *,
        instance_id: str,
        recovery: RecoveryPolicy,
        seats: HeldSeats | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._jobs = jobs
        self._presence = presence
        self._instance_id = instance_id
        self._recovery = recovery
        self._seats = seats
        self._swept_total = 0
        self._recovered_total = 0
        self._continued_total = 0
        self._skipped_rounds_total = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sweep, renew and recover until cancelled. Cancellation: each loop stops at its
        next await; nothing is left half-written (each step is one store call)."""
        try:
            await self._announce()
        except UnavailableError as exc:
            log.warning("could not announce this instance: %s", exc)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sweep_loop)
            nursery.start_soon(self._lease_loop)
            nursery.start_soon(self._recover_loop)
            task_status.started()

    async def _announce(self) -> None:
        await self._store.announce(self._instance_id, self._clock.now() + self._config.lease_ttl)

    async def _sweep_loop(self) -> None:
        while True:
            await trio.sleep(self._config.sweep_interval)
            try:
                swept = await self._store.delete_expired(self._clock.now())
            except UnavailableError as exc:
                self._skipped_rounds_total += 1
                log.warning("retention sweep skipped: %s", exc)
                continue
            if swept:
                self._swept_total += len(swept)
                log.debug("swept %d expired jobs", len(swept))

    async def _lease_loop(self) -> None:
        while True:
            await trio.sleep(self._config.lease_renew_interval)
            until = self._clock.now() + self._config.lease_ttl
            try:
                await self._announce()
                running = [child.name for child in self._jobs.which_children()]
                if running:
                    await self._store.renew_leases(self._instance_id, running, until)
                watches = self._presence.snapshot()
                if watches:
                    await self._store.renew_watches(watches, until)
                seats = self._seats.snapshot() if self._seats is not None else ()
                if seats:
                    await self._store.renew_seats(seats, self._config.lease_ttl)
            except UnavailableError as exc:
                self._skipped_rounds_total += 1
                log.warning("lease renewal skipped: %s", exc)

    async def _recover_loop(self) -> None:
        """Apart from renewal: taking over many orphans (reading their logs) must never
        delay this instance's own renewals past ``lease_ttl``."""
        while True:
            await trio.sleep(self._config.lease_renew_interval)
            try:
                await self.recover_orphans()
            except UnavailableError as exc:
                self._skipped_rounds_total += 1
                log.warning("orphan recovery skipped: %s", exc)

    async def recover_orphans(self) -> list[JobRecord]:
        """Take over the running jobs that no live instance owns and apply the recovery
        policy to each (by default: end it ``interrupted``; its user is told through the
        outbox). Raises ``UnavailableError``. Cancellation: a job taken over but not yet
        ended is an orphan again once its new lease lapses."""
        now = self._clock.now()
        recovered = []
        for handover in await self._store.take_orphans(self._instance_id, now, now + self._config.lease_ttl):
            try:
                record = await self._recovery.recover(handover)
            except JobEndedElsewhereError:
                # Our lease on it lapsed meanwhile (this instance stalled) and another took
                # it: that one carries it on.
                job_id = handover.record.job_id
                log.warning("job %s: taken over by another instance while recovered here", job_id)
                continue
            log.warning(
                "job %s: its instance is gone; recovered (%s at seq %d)",
                record.job_id,
                record.status,
                record.seq,
            )
            self._recovered_total += 1
            if not is_terminal(record.status):
                self._continued_total += 1
            recovered.append(record)
        return recovered

    def statistics(self) -> KeeperStatistics:
        return KeeperStatistics(
            swept_total=self._swept_total,
            recovered_total=self._recovered_total,
            continued_total=self._continued_total,
            skipped_rounds_total=self._skipped_rounds_total,
        )
