"""Presence, mutes and notifications for stores that one process owns (memory, SQLite).

Who watches lives in this process (``LocalPresence``). The check "nobody watches,
nobody saw the end" runs without an await before the store keeps the notification,
and keeping it (muted? never twice? the user's newest ``max_per_user``) is one
step of the store's shelf: ``MemoryShelf`` here, one transaction in SQLite.
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from collections.abc import Sequence

import attrs
import trio

from backstream.actors.ports import Inbox, NotificationListener, seen_end_counts
from backstream.protocol.records import NotificationRecord

__all__ = ["LocalInbox", "MemoryShelf", "NotificationShelf"]

_TYPES = ("ai.message.received", "system.warning", "ai.tool.approval_required")


class NotificationShelf(abc.ABC):
    """Where a single-process store keeps notifications and mutes."""

    @abc.abstractmethod
    async def keep(self, n: NotificationRecord, max_per_user: int) -> bool:
        """Unless muted or already made for this job and type: keep ``n`` and drop the
        user's oldest beyond ``max_per_user``, in one step. Returns whether it was kept.
        Cancellation: kept or not, never twice."""

    @abc.abstractmethod
    async def list(self, user: str, *, unread_only: bool, limit: int) -> tuple[list[NotificationRecord], int]:
        """Newest first, and the unread count. Cancellation: safe."""

    @abc.abstractmethod
    async def mark_read(self, user: str, ids: Sequence[str], *, everything: bool) -> int:
        """Returns how many stay unread. Cancellation: marking again is harmless."""

    @abc.abstractmethod
    async def set_muted(self, user: str, thread_id: str, muted: bool) -> None:
        """Cancellation: repeating it is harmless."""

    def forget_job(self, job_id: str) -> None:  # noqa: B027 - a shelf may keep nothing per job
        """A swept job's never-twice marks may go (its notifications stay in the inbox)."""


class MemoryShelf(NotificationShelf):
    """Notifications and mutes in this process."""

    def __init__(self) -> None:
        self._muted: set[tuple[str, str]] = set()
        self._notified: set[tuple[str, str]] = set()  # (job_id, type): never twice
        self._inbox: dict[str, OrderedDict[str, NotificationRecord]] = {}

    async def keep(self, n: NotificationRecord, max_per_user: int) -> bool:
        await trio.lowlevel.checkpoint()
        key = (n.job_id, n.type)
        if (n.user, n.thread_id) in self._muted or key in self._notified:
            return False
        self._notified.add(key)
        inbox = self._inbox.setdefault(n.user, OrderedDict())
        inbox[n.notification_id] = n
        while len(inbox) > max_per_user:
            inbox.popitem(last=False)  # the oldest go first
        return True

    async def list(self, user: str, *, unread_only: bool, limit: int) -> tuple[list[NotificationRecord], int]:
        await trio.lowlevel.checkpoint()
        inbox = self._inbox.get(user, OrderedDict())
        items = [n for n in reversed(inbox.values()) if not (unread_only and n.read)]
        return items[:limit], sum(1 for n in inbox.values() if not n.read)

    async def mark_read(self, user: str, ids: Sequence[str], *, everything: bool) -> int:
        await trio.lowlevel.checkpoint()
        inbox = self._inbox.get(user, OrderedDict())
        for notification_id in list(inbox) if everything else ids:
            if notification_id in inbox:
                inbox[notification_id] = attrs.evolve(inbox[notification_id], read=True)
        return sum(1 for n in inbox.values() if not n.read)

    async def set_muted(self, user: str, thread_id: str, muted: bool) -> None:
        await trio.lowlevel.checkpoint()
        if muted:
            self._muted.add((user, thread_id))
        else:
            self._muted.discard((user, thread_id))

    def forget_job(self, job_id: str) -> None:
        for kind in _TYPES:
            self._notified.discard((job_id, kind))

    def marks(self) -> int:
        return len(self._notified)


class LocalInbox(Inbox):
    """The ``Inbox`` port of a single-process store: presence here, the rest on ``shelf``.
    A store includes it (by composition) and forwards its inbox methods to it."""

    def __init__(self, shelf: NotificationShelf) -> None:
        self.shelf = shelf
        self.on_notification: NotificationListener | None = None
        self._watchers_by_job: dict[str, set[str]] = {}
        self._seen_ending: set[str] = set()  # jobs whose end a watcher saw

    async def watch_started(self, job_id: str, watch_id: str, until: float) -> None:
        """Cancellation: the watch may or may not be recorded."""
        await trio.lowlevel.checkpoint()
        self._watchers_by_job.setdefault(job_id, set()).add(watch_id)

    async def watch_ended(self, job_id: str, watch_id: str, *, saw_end: bool) -> None:
        """Cancellation: the watch may stay recorded until the job is swept."""
        await trio.lowlevel.checkpoint()
        if saw_end:
            self._seen_ending.add(job_id)
        watchers = self._watchers_by_job.get(job_id)
        if watchers is not None:
            watchers.discard(watch_id)
            if not watchers:
                del self._watchers_by_job[job_id]

    async def renew_watches(self, watches: Sequence[tuple[str, str]], until: float) -> None:
        """Presence lives in this process: nothing lapses. Cancellation: safe."""
        await trio.lowlevel.checkpoint()

    async def notify_unwatched(self, notification: NotificationRecord, now: float, max_per_user: int) -> bool:
        """Cancellation: it may or may not be created, never twice."""
        n = notification
        if self._watchers_by_job.get(n.job_id) or (seen_end_counts(n.type) and n.job_id in self._seen_ending):
            await trio.lowlevel.checkpoint()
            return False
        created = await self.shelf.keep(n, max_per_user)
        if created and self.on_notification is not None:
            self.on_notification(n)
        return created

    async def list_notifications(
        self, user: str, *, unread_only: bool, limit: int
    ) -> tuple[list[NotificationRecord], int]:
        return await self.shelf.list(user, unread_only=unread_only, limit=limit)

    async def mark_notifications_read(self, user: str, ids: Sequence[str], *, everything: bool) -> int:
        return await self.shelf.mark_read(user, ids, everything=everything)

    async def set_thread_muted(self, user: str, thread_id: str, muted: bool) -> None:
        await self.shelf.set_muted(user, thread_id, muted)

    def forget_job(self, job_id: str) -> None:
        """Drop what is kept of a swept job (its notifications stay in the inbox)."""
        self.shelf.forget_job(job_id)
        self._seen_ending.discard(job_id)

    def marks(self) -> int:
        return len(self._seen_ending)
