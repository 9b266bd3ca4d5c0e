"""Watch presence, mutes and notifications of ``RedisStore``, shared by every instance.

Keys (``{p}`` is the store's prefix tag): ``{p}:watching:{job}`` (a sorted set of
watch ids scored by presence expiry), ``{p}:seen:{job}`` (a watch delivered the
job's end), ``{p}:muted:{len}:{user}``, ``{p}:notified:{job}:{type}`` (never
twice), ``{p}:notif:{len}:{user}`` and ``{p}:notifs:{len}:{user}`` (the inbox:
a hash by id and a sorted set by time), and the channel ``{p}:notifications``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs
import coredis
from coredis.tokens import PureToken

from backstream.actors.ports import seen_end_counts
from backstream.protocol.records import NotificationRecord

__all__ = ["SAFETY_TTL_S", "RedisNotifications", "ms"]

SAFETY_TTL_S = 3600
"""Keys outlive retention by this, in case no sweep runs."""


def ms(seconds: float) -> int:
    return int(seconds * 1000)


class RedisNotifications:
    """Mixed into ``RedisStore``, which provides the connection, the keys and the scripts."""

    _scripts: dict[str, Any]

    def _k(self, *parts: str) -> str:
        raise NotImplementedError

    @property
    def redis(self) -> coredis.Redis[str] | coredis.RedisCluster[str]:
        raise NotImplementedError

    async def _call(self, coro: Any) -> Any:
        raise NotImplementedError

    def _inbox(self, user: str) -> tuple[str, str]:
        return self._k("notif", str(len(user)), user), self._k("notifs", str(len(user)), user)

    async def watch_started(self, job_id: str, watch_id: str, until: float) -> None:
        """Cancellation: the watch may or may not be recorded; it lapses at ``until``."""
        await self._call(self.redis.zadd(self._k("watching", job_id), {watch_id: until}))

    async def watch_ended(self, job_id: str, watch_id: str, *, saw_end: bool) -> None:
        """Cancellation: the presence lapses by itself at its ``until``."""
        if saw_end:
            await self._call(self.redis.set(self._k("seen", job_id), "1", px=ms(SAFETY_TTL_S)))
        await self._call(self.redis.zrem(self._k("watching", job_id), [watch_id]))

    async def renew_watches(self, watches: Sequence[tuple[str, str]], until: float) -> None:
        """One pipeline. Cancellation: some may be renewed; the next renewal catches up."""

        async def renew() -> None:
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id, watch_id in watches:
                    pipe.zadd(self._k("watching", job_id), {watch_id: until}, condition=PureToken.XX)

        await self._call(renew())

    async def notify_unwatched(self, notification: NotificationRecord, now: float, max_per_user: int) -> bool:
        """One Lua script (``NOTIFY``): check and create are atomic across instances.
        Cancellation: the script ran entirely or not at all; never twice."""
        n = notification
        hash_key, order_key = self._inbox(n.user)
        keys = [
            self._k("watching", n.job_id),
            self._k("muted", str(len(n.user)), n.user),
            self._k("notified", n.job_id, n.type),
            hash_key,
            order_key,
            self._k("seen", n.job_id),
        ]
        payload = json.dumps(attrs.asdict(n), separators=(",", ":"))
        args = [
            repr(now),
            n.thread_id,
            payload,
            n.notification_id,
            repr(n.created_at),
            str(max_per_user),
            self._k("notifications"),
            str(ms(SAFETY_TTL_S * 24)),
            "1" if seen_end_counts(n.type) else "0",
        ]
        return bool(await self._call(self._scripts["notify"](keys=keys, args=args)))

    async def list_notifications(
        self, user: str, *, unread_only: bool, limit: int
    ) -> tuple[list[NotificationRecord], int]:
        """Cancellation: safe (a read)."""
        hash_key, order_key = self._inbox(user)
        ids = [str(i) for i in await self._call(self.redis.zrange(order_key, 0, -1, rev=True))]
        values = await self._call(self.redis.hmget(hash_key, ids)) if ids else []
        items = [NotificationRecord(**json.loads(v)) for v in values if v]
        unread = sum(1 for n in items if not n.read)
        if unread_only:
            items = [n for n in items if not n.read]
        return items[:limit], unread

    async def mark_notifications_read(self, user: str, ids: Sequence[str], *, everything: bool) -> int:
        """Cancellation: they may or may not be marked; marking again is harmless."""
        hash_key, _ = self._inbox(user)
        current = await self._call(self.redis.hgetall(hash_key))
        changed = {}
        for notification_id, value in current.items():
            if everything or notification_id in ids:
                data = json.loads(value)
                if not data["read"]:
                    data["read"] = True
                    changed[notification_id] = json.dumps(data, separators=(",", ":"))
        if changed:
            await self._call(self.redis.hset(hash_key, changed))
        return sum(1 for k, v in current.items() if k not in changed and not json.loads(v)["read"])

    async def set_thread_muted(self, user: str, thread_id: str, muted: bool) -> None:
        """Cancellation: it may or may not be applied; repeating it is harmless."""
        key = self._k("muted", str(len(user)), user)
        if muted:
            await self._call(self.redis.sadd(key, [thread_id]))
        else:
            await self._call(self.redis.srem(key, [thread_id]))
