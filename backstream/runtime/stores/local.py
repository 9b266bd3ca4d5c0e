"""``LocalStore``: what the stores that one process owns (memory, SQLite) share.

Wake-ups go through one ``SignalHub``, fed directly by the store's own writes;
presence and notifications through a ``LocalInbox``; decisions through
``LocalDecisions``; seats through ``LocalSeats``. No leases: one process owns the data.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from backstream.actors.ports import Store
from backstream.actors.signals import OUTBOX_BELL, SignalHub
from backstream.runtime.stores.local_notifications import LocalInbox, NotificationShelf
from backstream.runtime.stores.shared import InboxForwarding, LocalDecisions, LocalSeats, SeatsForwarding

__all__ = ["LocalStore"]


class LocalStore(InboxForwarding, SeatsForwarding, Store):
    """Base of a single-process store: subclasses call ``__init__`` with their shelf and
    implement jobs, logs, aborts, orphans and the outbox."""

    inbox: LocalInbox

    def __init__(self, shelf: NotificationShelf) -> None:
        self.hub = SignalHub()
        self.inbox = LocalInbox(shelf)
        self.decisions = LocalDecisions(self.hub)
        self.seats = LocalSeats()

    def forget_job(self, job_id: str) -> None:
        """A job was swept: drop what this process kept of it and wake its readers."""
        self.inbox.forget_job(job_id)
        self.decisions.forget_job(job_id)
        self.hub.signal_job(job_id)

    # -- decisions: within this process ----------------------------------------------

    async def send_decision(self, job_id: str, call_id: str, approved: bool) -> None:
        await trio.lowlevel.checkpoint()
        self.decisions.put(job_id, call_id, approved)

    async def wait_decision(self, job_id: str, call_id: str) -> bool:
        return await self.decisions.wait(job_id, call_id)

    # -- one process: no leases --------------------------------------------------------

    async def renew_leases(self, owner: str, job_ids: Sequence[str], until: float) -> None:
        await trio.lowlevel.checkpoint()

    async def hand_off(self, owner: str, job_ids: Sequence[str], now: float) -> None:
        """One process: the next run takes every live job (SQLite marks them as it closes).
        Cancellation: nothing was to be done."""
        await trio.lowlevel.checkpoint()

    async def announce(self, owner: str, until: float) -> None:
        """One process: no other instance to tell. Cancellation: safe."""
        await trio.lowlevel.checkpoint()

    async def withdraw(self, owner: str) -> None:
        await trio.lowlevel.checkpoint()

    async def others_alive(self, owner: str, now: float) -> bool:
        """One process owns the store: nobody else could take its jobs. Cancellation: safe."""
        await trio.lowlevel.checkpoint()
        return False

    async def wait_outbox(self, timeout: float) -> None:
        """Woken by this store's terminal commits. Cancellation: safe."""
        await self.hub.wait_bell(OUTBOX_BELL, timeout)
