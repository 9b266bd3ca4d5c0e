"""The dispatcher: carries out the outbox, the effects that terminal commits left.

A job's terminal commit writes an outbox entry in the same atomic step (see
``LogStore.commit``), so a process that dies right after the commit loses nothing:
the entry waits in the store. The dispatcher (a permanent child of the system
supervisor) claims entries with a lease (``Outbox.claim_outbox``: with several
instances, each entry is carried out by one at a time), tells the user through the
notifier (``Notifier.job_ended``, never twice per job and type), and deletes them.
A store outage is waited through; a claim left by a crash lapses and is taken again.
"""

from __future__ import annotations

import logging
from functools import partial

import attrs
import trio

from backstream.actors.clock import WallClock
from backstream.actors.notifier import Notifier
from backstream.actors.ports import OUTBOX_CLAIM_S, LogStore, Outbox, OutboxEntry, StoreClosedError
from backstream.actors.signals import through_outage
from backstream.protocol.events import TextEvent

__all__ = ["BATCH", "POLL_S", "PREVIEW_CHARS", "START_DRAIN_S", "Dispatcher", "DispatcherStatistics"]

log = logging.getLogger("backstream.dispatcher")

BATCH = 64
"""Entries claimed at once; the rest wait for the next round."""
POLL_S = 5.0
"""Between looks for entries another (dead) instance left, when nothing rings."""
START_DRAIN_S = 5.0
"""How long the first drain (the entries left by a dead instance) may delay the start."""
PREVIEW_CHARS = 200
"""Text of the job's log read for a notification's body."""


@attrs.frozen
class DispatcherStatistics:
    delivered_total: int
    rounds_total: int


class Dispatcher:
    """Start with ``await nursery.start(dispatcher.run)``: it carries out what is in the
    outbox already before it reports started."""

    def __init__(
        self, outbox: Outbox, log_store: LogStore, notifier: Notifier, clock: WallClock, *, instance_id: str
    ) -> None:
        self._outbox = outbox
        self._log_store = log_store
        self._notifier = notifier
        self._clock = clock
        self._instance_id = instance_id
        self._delivered_total = 0
        self._rounds_total = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled. Cancellation: stops at once; a claimed entry not yet deleted is
        carried out again once its claim lapses (its notification is never made twice)."""
        with trio.move_on_after(START_DRAIN_S):  # a store that is away: start anyway
            await self._drain()
        task_status.started()
        while True:
            await self._outbox.wait_outbox(POLL_S)
            await self._drain()

    async def _drain(self) -> None:
        """Carry out claimed entries until none is left. Waits through an outage."""
        while True:
            self._rounds_total += 1
            entries = await through_outage("claiming the outbox", self._claim, level=logging.WARNING)
            if not entries:
                return
            for entry in entries:
                try:
                    await self._deliver(entry)
                except StoreClosedError:
                    raise
                except Exception:  # a bad entry must not stop the others: dropped
                    log.exception("job %s: its outbox entry could not be carried out", entry.job_id)
                self._notifier.end_delivered(entry.job_id)  # its notification exists now
            done = [entry.job_id for entry in entries]
            await through_outage("deleting carried-out entries", partial(self._outbox.delete_outbox, done))

    async def _claim(self) -> list[OutboxEntry]:
        now = self._clock.now()
        return await self._outbox.claim_outbox(self._instance_id, now, now + OUTBOX_CLAIM_S, BATCH)

    async def _deliver(self, entry: OutboxEntry) -> None:
        if not Notifier.notifies_end(entry.status):
            return  # e.g. aborted: the user asked for it
        preview = await through_outage(
            f"job {entry.job_id}: reading its text", lambda: self._preview(entry.job_id)
        )
        await self._notifier.job_ended(
            job_id=entry.job_id,
            user=entry.user,
            thread_id=entry.thread_id,
            status=entry.status,
            content=preview,
            error=entry.error,
        )
        self._delivered_total += 1

    async def _preview(self, job_id: str) -> str:
        """The first ``PREVIEW_CHARS`` characters of the job's text."""
        text, after = "", 0
        while len(text) < PREVIEW_CHARS:
            entries = await self._log_store.read(job_id, after, 256)
            if not entries:
                break
            text += "".join(e.text for e in entries if isinstance(e, TextEvent))
            after = entries[-1].seq
        return text[:PREVIEW_CHARS]

    def statistics(self) -> DispatcherStatistics:
        return DispatcherStatistics(delivered_total=self._delivered_total, rounds_total=self._rounds_total)
