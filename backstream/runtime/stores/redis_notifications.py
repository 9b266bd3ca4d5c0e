"""Watch presence, mutes and notifications of ``RedisStore``, shared by every instance.

Keys and channel are named by ``RedisKeyspace`` (``watching``, ``seen``, ``muted``,
``notified``, ``inbox`` and the user's ``notifications`` channel). Watch presence is on
Redis's clock, as leases are (``RedisFrame``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import attrs

from backstream.actors.ports import Inbox, seen_end_counts
from backstream.protocol.records import NotificationRecord
from backstream.runtime.stores.redis_client import SAFETY_TTL_S, RedisConnection, ms
from backstream.runtime.stores.redis_clock import RedisFrame

__all__ = ["RedisInbox"]


class RedisInbox(Inbox):
    """The ``Inbox`` port on a ``RedisConnection`` (``RedisStore`` forwards to it)."""

    def __init__(self, conn: RedisConnection, frame: RedisFrame) -> None:
        self._conn = conn
        self._keys = conn.keys
        self._frame = frame

    async def watch_started(self, job_id: str, watch_id: str, until: float) -> None:
        """Cancellation: the watch may or may not be recorded; it lapses at ``until``."""
        args = [watch_id, self._frame.ahead(until), ""]
        await self._conn.script("watch", [self._keys.watching(job_id)], args)

    async def watch_ended(self, job_id: str, watch_id: str, *, saw_end: bool) -> None:
        """Cancellation: the presence lapses by itself at its ``until``."""
        if saw_end:
            await self._conn.call(self._conn.client.set(self._keys.seen(job_id), "1", px=ms(SAFETY_TTL_S)))
        await self._conn.call(self._conn.client.zrem(self._keys.watching(job_id), [watch_id]))

    async def renew_watches(self, watches: Sequence[tuple[str, str]], until: float) -> None:
        """One pipeline. Cancellation: some may be renewed; the next renewal catches up."""

        ahead, script = self._frame.ahead(until), self._conn.scripts["watch"]

        async def renew() -> None:
            async with self._conn.client.pipeline(transaction=False) as pipe:
                for job_id, watch_id in watches:
                    script(keys=[self._keys.watching(job_id)], args=[watch_id, ahead, "XX"], client=pipe)

        await self._conn.call(renew())

    async def notify_unwatched(self, notification: NotificationRecord, now: float, max_per_user: int) -> bool:
        """The thread's mute is read (user slot); one script in the job's slot checks that
        nobody watches and marks the job notified, atomically across instances; one in the
        user's slot adds it to the inbox. Cancellation: it may or may not be created,
        never twice (the mark comes first: a step lost after it loses the notification)."""
        n, k = notification, self._keys
        if await self._conn.call(self._conn.client.sismember(k.muted(n.user), n.thread_id)):
            return False
        claim_keys = [k.watching(n.job_id), k.notified(n.job_id, n.type), k.seen(n.job_id)]
        claim_args = [
            self._frame.at(now),
            "1" if seen_end_counts(n.type) else "0",
            str(ms(SAFETY_TTL_S * 24)),
        ]
        if not await self._conn.script("notify_claim", claim_keys, claim_args):
            return False
        payload = json.dumps(attrs.asdict(n), separators=(",", ":"))
        hash_key, order_key = k.inbox(n.user)
        args = [n.notification_id, payload, repr(n.created_at), str(max_per_user), k.user_channel(n.user)]
        await self._conn.script("notify_insert", [hash_key, order_key], args)
        return True

    async def list_notifications(
        self, user: str, *, unread_only: bool, limit: int
    ) -> tuple[list[NotificationRecord], int]:
        """Cancellation: safe (a read)."""
        hash_key, order_key = self._keys.inbox(user)
        ids = [str(i) for i in await self._conn.call(self._conn.client.zrange(order_key, 0, -1, rev=True))]
        values = await self._conn.call(self._conn.client.hmget(hash_key, ids)) if ids else []
        items = [NotificationRecord(**json.loads(v)) for v in values if v]
        unread = sum(1 for n in items if not n.read)
        if unread_only:
            items = [n for n in items if not n.read]
        return items[:limit], unread

    async def mark_notifications_read(self, user: str, ids: Sequence[str], *, everything: bool) -> int:
        """Cancellation: they may or may not be marked; marking again is harmless."""
        hash_key, _ = self._keys.inbox(user)
        current = await self._conn.call(self._conn.client.hgetall(hash_key))
        changed = {}
        for notification_id, value in current.items():
            if everything or notification_id in ids:
                data = json.loads(value)
                if not data["read"]:
                    data["read"] = True
                    changed[notification_id] = json.dumps(data, separators=(",", ":"))
        if changed:
            await self._conn.call(self._conn.client.hset(hash_key, changed))
        return sum(1 for k, v in current.items() if k not in changed and not json.loads(v)["read"])

    async def set_thread_muted(self, user: str, thread_id: str, muted: bool) -> None:
        """Cancellation: it may or may not be applied; repeating it is harmless."""
        key = self._keys.muted(user)
        if muted:
            await self._conn.call(self._conn.client.sadd(key, [thread_id]))
        else:
            await self._conn.call(self._conn.client.srem(key, [thread_id]))
