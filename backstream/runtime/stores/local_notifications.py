"""Presence, mutes and notifications for stores that one process owns (memory, SQLite).

Everything lives in this process; every check-and-create runs without an await in
between, so it is atomic with respect to watchers arriving or leaving.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import attrs
import trio

from backstream.actors.ports import NotificationListener
from backstream.protocol.records import NotificationRecord

__all__ = ["LocalNotifications"]


class LocalNotifications:
    """Mixed into single-process stores."""

    notification_listener: NotificationListener | None

    def _init_local_notifications(self) -> None:
        self._watchers_by_job: dict[str, set[str]] = {}
        self._muted: set[tuple[str, str]] = set()
        self._notified: set[tuple[str, str]] = set()  # (job_id, type): never twice
        self._seen_ending: set[str] = set()  # jobs whose end a watcher saw
        self._inbox: dict[str, OrderedDict[str, NotificationRecord]] = {}

    async def watch_started(self, job_id: str, watch_id: str, until: float) -> None:
        await trio.lowlevel.checkpoint()
        self._watchers_by_job.setdefault(job_id, set()).add(watch_id)

    async def watch_ended(self, job_id: str, watch_id: str, *, saw_end: bool) -> None:
        await trio.lowlevel.checkpoint()
        if saw_end:
            self._seen_ending.add(job_id)
        watchers = self._watchers_by_job.get(job_id)
        if watchers is not None:
            watchers.discard(watch_id)
            if not watchers:
                del self._watchers_by_job[job_id]

    async def notify_unwatched(self, notification: NotificationRecord, now: float, max_per_user: int) -> bool:
        await trio.lowlevel.checkpoint()
        key = (notification.job_id, notification.type)
        if (
            self._watchers_by_job.get(notification.job_id)
            or (notification.type != "ai.tool.approval_required" and notification.job_id in self._seen_ending)
            or (notification.user, notification.thread_id) in self._muted
            or key in self._notified
        ):
            return False
        self._notified.add(key)
        inbox = self._inbox.setdefault(notification.user, OrderedDict())
        inbox[notification.notification_id] = notification
        while len(inbox) > max_per_user:
            inbox.popitem(last=False)  # the oldest go first
        if self.notification_listener is not None:
            self.notification_listener(notification)
        return True

    async def list_notifications(
        self, user: str, *, unread_only: bool, limit: int
    ) -> tuple[list[NotificationRecord], int]:
        await trio.lowlevel.checkpoint()
        inbox = self._inbox.get(user, OrderedDict())
        items = [n for n in reversed(inbox.values()) if not (unread_only and n.read)]
        return items[:limit], sum(1 for n in inbox.values() if not n.read)

    async def mark_notifications_read(self, user: str, ids: Sequence[str], *, everything: bool) -> int:
        await trio.lowlevel.checkpoint()
        inbox = self._inbox.get(user, OrderedDict())
        for notification_id in list(inbox) if everything else ids:
            if notification_id in inbox:
                inbox[notification_id] = attrs.evolve(inbox[notification_id], read=True)
        return sum(1 for n in inbox.values() if not n.read)

    async def set_thread_muted(self, user: str, thread_id: str, muted: bool) -> None:
        await trio.lowlevel.checkpoint()
        if muted:
            self._muted.add((user, thread_id))
        else:
            self._muted.discard((user, thread_id))

    def forget_job_notifications(self, job_id: str) -> None:
        """Drop the never-twice marks of a swept job (its notifications stay in the inbox)."""
        for kind in ("ai.message.received", "system.warning", "ai.tool.approval_required"):
            self._notified.discard((job_id, kind))
        self._seen_ending.discard(job_id)
