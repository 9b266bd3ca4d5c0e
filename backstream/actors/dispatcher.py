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
import os
import signal
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import attrs
import trio

from backstream.actors.clock import WallClock
from backstream.actors.joblog import read_content
from backstream.actors.notifier import Notifier
from backstream.actors.ports import OUTBOX_CLAIM_S, LogStore, Outbox, OutboxEntry, StoreClosedError
from backstream.actors.signals import through_outage
from backstream.actors.webhooks import WebhookEvents
from backstream.protocol.records import PREVIEW_CHARS

__all__ = ["BATCH", "POLL_S", "PREVIEW_CHARS", "START_DRAIN_S", "Dispatcher", "DispatcherStatistics"]

log = logging.getLogger("backstream.dispatcher")

T = TypeVar("T")

CRASH_BEFORE_OUTBOX = "BACKSTREAM_TEST_CRASH_BEFORE_OUTBOX"
"""Set to 1 (by tests only), the process kills itself (SIGKILL) once it has claimed an
outbox entry and before it carries any out: right after a job's terminal commit."""
BATCH = 64
"""Entries claimed at once; the rest wait for the next round."""
POLL_S = 5.0
"""Between looks for entries another (dead) instance left, when nothing rings."""
START_DRAIN_S = 5.0
"""How long the first drain (the entries left by a dead instance) may delay the start."""


@attrs.frozen
class DispatcherStatistics:
    carried_out_total: int
    """Entries carried out and deleted (a notification made, or none due: e.g. aborted)."""
    delivered_total: int
    """Job-end notifications asked of the notifier (it makes each at most once)."""
    failed_total: int
    """Entries whose effect raised: logged and dropped, so that the others go on."""
    retries_total: int
    """Store calls asked again after an outage (claims, previews, deletions)."""
    rounds_total: int
    """Claims made (one per batch, and the last that found nothing)."""
    in_hand: int
    """Entries claimed and not yet deleted (at most ``BATCH``). The outbox may hold more,
    uncounted here: the store is not asked for its size."""
    previews_read_total: int = 0
    """Notifications whose text was read from the job's log (its entry carried none)."""


class Dispatcher:
    """Start with ``await nursery.start(dispatcher.run)``: it carries out what is in the
    outbox already before it reports started. Build it once and run it again after a
    failure: ``run`` keeps nothing between runs but the totals of ``statistics``."""

    def __init__(
        self,
        outbox: Outbox,
        log_store: LogStore,
        notifier: Notifier,
        clock: WallClock,
        *,
        instance_id: str,
        webhooks: WebhookEvents | None = None,
    ) -> None:
        self._outbox = outbox
        self._log_store = log_store
        self._notifier = notifier
        self._clock = clock
        self._instance_id = instance_id
        self._webhooks = webhooks
        self._carried_out_total = 0
        self._delivered_total = 0
        self._failed_total = 0
        self._retries_total = 0
        self._rounds_total = 0
        self._previews_read_total = 0
        self._in_hand = 0

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
            entries = await self._through_outage("claiming the outbox", self._claim, level=logging.WARNING)
            if not entries:
                return
            if os.environ.get(CRASH_BEFORE_OUTBOX) == "1":  # tests only: the crash it survives
                os.kill(os.getpid(), signal.SIGKILL)
            self._in_hand = len(entries)
            try:
                await self._carry_out(entries)
            finally:
                self._in_hand = 0

    async def _carry_out(self, entries: list[OutboxEntry]) -> None:
        for entry in entries:
            if self._webhooks is not None:
                await self._record_webhooks(self._webhooks, entry)
            try:
                await self._deliver(entry)
            except StoreClosedError:
                raise
            except Exception:  # a bad entry must not stop the others: dropped
                self._failed_total += 1
                log.exception("job %s: its outbox entry could not be carried out", entry.job_id)
            self._notifier.end_delivered(entry.job_id)  # its notification exists now
        done = [entry.job_id for entry in entries]
        await self._through_outage("deleting carried-out entries", partial(self._outbox.delete_outbox, done))
        self._carried_out_total += len(done)

    async def _record_webhooks(self, webhooks: WebhookEvents, entry: OutboxEntry) -> None:
        """Record the job's webhook events before its entry is deleted (a crash between
        records them again: the same deliveries, nothing twice)."""
        try:
            await self._through_outage(
                f"job {entry.job_id}: recording its webhooks", partial(webhooks.job_ended, entry)
            )
        except StoreClosedError:
            raise
        except Exception:  # a bad entry must not stop the others: its events are dropped
            self._failed_total += 1
            log.exception("job %s: its webhook events could not be recorded", entry.job_id)

    async def _through_outage(
        self, what: str, attempt: Callable[[], Awaitable[T]], *, level: int = logging.DEBUG
    ) -> T:
        return await through_outage(what, attempt, on_retry=self._count_retry, level=level)

    def _count_retry(self, _exc: Exception) -> None:
        self._retries_total += 1

    async def _claim(self) -> list[OutboxEntry]:
        now = self._clock.now()
        return await self._outbox.claim_outbox(self._instance_id, now, now + OUTBOX_CLAIM_S, BATCH)

    async def _deliver(self, entry: OutboxEntry) -> None:
        if not Notifier.notifies_end(entry.status):
            return  # e.g. aborted: the user asked for it
        preview = ""
        if Notifier.shows_content(entry.status, entry.error):  # else it shows the error
            preview = await self._through_outage(
                f"job {entry.job_id}: reading its text", lambda: self._preview(entry)
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

    async def _preview(self, entry: OutboxEntry) -> str:
        """The first ``PREVIEW_CHARS`` characters of the job's content: the entry's, or read
        from the log for an entry written without one (a recovered job's end, an older
        entry)."""
        if entry.preview is not None:
            return entry.preview
        self._previews_read_total += 1
        return await read_content(self._log_store, entry.job_id, PREVIEW_CHARS)

    def statistics(self) -> DispatcherStatistics:
        return DispatcherStatistics(
            carried_out_total=self._carried_out_total,
            delivered_total=self._delivered_total,
            failed_total=self._failed_total,
            retries_total=self._retries_total,
            rounds_total=self._rounds_total,
            in_hand=self._in_hand,
            previews_read_total=self._previews_read_total,
        )
