"""Notifications: when a job ends (or waits for approval) with nobody watching, tell its user.

The decision and the creation are one atomic step in the store
(``Inbox.notify_unwatched``): nobody watches the job on any instance, the thread
is not muted, and the job has no notification of that type yet. Every instance that
holds a connection of that user (and only those) then pushes the new notification to it.

A job's end reaches ``job_ended`` through the outbox: its terminal commit leaves an
entry that the ``Dispatcher`` carries out (so a crash right after the commit loses
nothing); a job actor that wants its notification made before it finishes waits
for it through ``expecting_end``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import attrs
import trio

from backstream.actors.clock import WallClock
from backstream.actors.ports import Inbox, StoreClosedError
from backstream.actors.signals import through_outage
from backstream.actors.webhooks import WebhookEvents
from backstream.protocol.backoff import Backoff
from backstream.protocol.events import ErrorInfo, JobStatus
from backstream.protocol.ids import new_id
from backstream.protocol.records import NotificationRecord

__all__ = ["SUBSCRIBER_BUFFER", "NotificationSink", "Notifier", "NotifierStatistics"]

log = logging.getLogger("backstream.notifier")

SUBSCRIBER_BUFFER = 64
"""Pushes waiting per connection; when full, that connection misses the push (the
notification is stored and listed all the same)."""

_BY_STATUS: dict[str, tuple[str, str]] = {
    "completed": ("ai.message.received", "Response ready"),
    "failed": ("system.warning", "Response failed"),
    "interrupted": ("system.warning", "Response interrupted"),
    # Stopped on purpose, but maybe from another device: the user's others learn of it.
    "aborted": ("system.warning", "Response stopped"),
}


@attrs.frozen
class NotifierStatistics:
    subscribers: int
    pushes_dropped: int
    ends_expected: int


class NotificationSink(Protocol):
    """Where ``Notifier.follow`` hands notifications (a ``trio.MemorySendChannel`` is one)."""

    def send_nowait(self, value: NotificationRecord) -> None: ...


class Notifier:
    def __init__(self, inbox: Inbox, clock: WallClock, max_per_user: int) -> None:
        self._inbox = inbox
        self._clock = clock
        self._max_per_user = max_per_user
        self._subscribers: dict[str, set[NotificationSink]] = {}
        self._pushes_dropped = 0
        # Job actors of this process waiting for their end's notification (one each).
        self._ends_expected: dict[str, trio.Event] = {}
        self.webhooks: WebhookEvents | None = None
        """Where ``approval_needed`` records its webhook event (set by the runtime)."""

    @contextmanager
    def expecting_end(self, job_id: str) -> Iterator[trio.Event]:
        """For the block, an event set once ``end_delivered(job_id)`` is called. Enter it
        before the terminal commit, so that a delivery right after it is not missed."""
        event = self._ends_expected[job_id] = trio.Event()
        try:
            yield event
        finally:
            if self._ends_expected.get(job_id) is event:
                del self._ends_expected[job_id]

    @staticmethod
    def notifies_end(status: JobStatus) -> bool:
        """Whether a job's end with ``status`` calls for a notification (every end does)."""
        return status in _BY_STATUS

    @staticmethod
    def shows_content(status: JobStatus, error: ErrorInfo | None) -> bool:
        """Whether the notification of a job's end shows the start of its content (else
        its error's message)."""
        return status == "completed" or error is None

    def end_delivered(self, job_id: str) -> None:
        """The outbox entry of the job's end was carried out (the dispatcher calls it)."""
        event = self._ends_expected.get(job_id)
        if event is not None:
            event.set()

    async def job_ended(
        self,
        *,
        job_id: str,
        user: str,
        thread_id: str,
        status: JobStatus,
        content: str,
        error: ErrorInfo | None,
    ) -> bool:
        """The notification a job's end calls for, if nobody watched (the one who stopped
        a job while watching it gets none for it).

        While the store is away (``UnavailableError``) it asks again with backoff, for as
        long as the caller lets it. Cancellation: the notification may or may not have been
        created (the store's step is atomic either way).
        """
        kind = _BY_STATUS.get(status)
        if kind is None:
            return False
        body = content[:200] if self.shows_content(status, error) or error is None else error.message[:200]
        return await self._notify(job_id, user, thread_id, kind[0], kind[1], body)

    async def approval_needed(
        self, *, job_id: str, user: str, thread_id: str, tool: str, call_id: str = ""
    ) -> bool:
        """Also records the ``job.approval_required`` webhook event (if any endpoint wants
        it; a store away is waited through). Cancellation: as for ``job_ended``."""
        if self.webhooks is not None:
            await self._record_approval(self.webhooks, job_id, user, thread_id, tool, call_id)
        body = f"The assistant wants to run {tool!r} and waits for your decision."
        return await self._notify(
            job_id, user, thread_id, "ai.tool.approval_required", "Approval needed", body
        )

    async def approval_webhook(
        self, *, job_id: str, user: str, thread_id: str, tool: str, call_id: str
    ) -> None:
        """Only the ``job.approval_required`` webhook event of ``approval_needed`` (a wait
        the log shows already; recorded once per call). Cancellation: recorded or not."""
        if self.webhooks is not None:
            await self._record_approval(self.webhooks, job_id, user, thread_id, tool, call_id)

    @staticmethod
    async def _record_approval(
        webhooks: WebhookEvents, job_id: str, user: str, thread_id: str, tool: str, call_id: str
    ) -> None:
        try:
            await through_outage(
                f"job {job_id}: recording its approval webhook",
                lambda: webhooks.approval_required(
                    job_id=job_id, user=user, thread_id=thread_id, call_id=call_id, tool=tool
                ),
            )
        except StoreClosedError:
            raise
        except Exception:  # the notification still goes out
            log.exception("job %s: its approval webhook could not be recorded", job_id)

    async def _notify(self, job_id: str, user: str, thread_id: str, kind: str, title: str, body: str) -> bool:
        now = self._clock.now()
        record = NotificationRecord(
            notification_id=new_id("n_", now),
            user=user,
            type=kind,
            job_id=job_id,
            thread_id=thread_id,
            title=title,
            body=body,
            created_at=now,
        )
        try:  # while the store is away, ask again; the caller bounds it
            return await through_outage(
                f"job {job_id}: notification not created yet",
                lambda: self._inbox.notify_unwatched(record, now, self._max_per_user),
                backoff=Backoff(0.1, 2.0),
            )
        except StoreClosedError:
            log.warning("job %s: the store closed before its notification was created", job_id)
            return False
        except Exception:
            log.exception("job %s: could not create a notification", job_id)
            return False

    def deliver_local(self, notification: NotificationRecord) -> None:
        """Push to this instance's connections of the user (never blocks). The store calls
        it for every notification created on any instance for a user of a connection here
        (``subscribe`` follows the user: ``Inbox.notifications_of``):
        ``store.open(on_notification=...)``."""
        for channel in list(self._subscribers.get(notification.user, ())):
            try:
                channel.send_nowait(notification)
            except trio.WouldBlock:
                self._pushes_dropped += 1
            except trio.BrokenResourceError:
                pass

    @contextmanager
    def subscribe(self, user: str) -> Iterator[trio.MemoryReceiveChannel[NotificationRecord]]:
        """Receive the user's new notifications while the block runs (at most
        ``SUBSCRIBER_BUFFER`` unread; past it, new ones are dropped and counted)."""
        send, receive = trio.open_memory_channel[NotificationRecord](SUBSCRIBER_BUFFER)
        try:
            with self.follow(user, send):
                yield receive
        finally:
            send.close()

    @contextmanager
    def follow(self, user: str, sink: NotificationSink) -> Iterator[None]:
        """Hand the user's new notifications to ``sink`` while the block runs, as they come
        (``sink.send_nowait`` must not block; it raises ``trio.WouldBlock`` when full: the
        notification is dropped and counted). Without a channel or a task of its own."""
        self._subscribers.setdefault(user, set()).add(sink)
        try:
            with self._inbox.notifications_of(user):  # a shared store follows the user meanwhile
                yield
        finally:
            subscribers = self._subscribers.get(user)
            if subscribers is not None:
                subscribers.discard(sink)
                if not subscribers:
                    del self._subscribers[user]

    def statistics(self) -> NotifierStatistics:
        return NotifierStatistics(
            subscribers=sum(len(channels) for channels in self._subscribers.values()),
            pushes_dropped=self._pushes_dropped,
            ends_expected=len(self._ends_expected),
        )
