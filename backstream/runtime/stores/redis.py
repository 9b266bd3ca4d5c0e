"""``RedisStore``: jobs shared by many server processes and machines, through Redis (coredis).

Keys (all under ``prefix``; user-chosen ids are length-prefixed so they cannot collide):

- ``{p}:job:{id}``: the job record, a hash of JSON-encoded fields;
- ``{p}:log:{id}``: the log, a stream with one entry per flush batch, whose id is
  the batch's last seq (``"{seq}-0"``);
- ``{p}:msg:{len}:{user}:{message_id}``: the idempotency key → job id;
- ``{p}:user:{len}:{user}`` and ``{p}:thread:{len}:{user}:{thread}``: sorted sets
  by creation time, for listing; ``{p}:expiry``: finished jobs by expiry time;
- ``{p}:running`` and ``{p}:running:{len}:{user}``: running jobs scored by lease
  expiry: the cluster-wide capacity count, and where orphans are found.

Creating, committing, recovering and taking a slot are Lua scripts: each is
atomic, and a retried commit adds nothing twice. One pub/sub subscriber per
instance (``{p}:commits``, ``{p}:aborts``) wakes local watchers and delivers
aborts from other instances. Finished jobs' keys also expire in Redis, an hour
after retention, should no sweep ever run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import urllib.parse
from collections.abc import Sequence
from typing import Any

import attrs
import coredis
import coredis.exceptions
import trio
from coredis.connection import TCPLocation
from coredis.tokens import PureToken

from backstream.actors.ports import Store
from backstream.protocol.backoff import Backoff
from backstream.protocol.errors import CapacityError, UnavailableError
from backstream.protocol.events import TERMINAL_STATUSES, ErrorInfo, LogEvent
from backstream.protocol.records import (
    JobProgress,
    JobRecord,
    NotificationRecord,
    SharedCapacity,
    events_from_json,
    events_to_json,
    record_from_dict,
    record_to_dict,
)
from backstream.runtime.stores import redis_scripts as scripts

__all__ = ["RedisStore"]

log = logging.getLogger("backstream.redis")

_SAFETY_TTL_S = 3600  # keys outlive retention by this, in case no sweep runs
_WAIT_POLL_S = 1.0  # a missed pub/sub message delays a remote watcher by this at most


def _error_dict(error: ErrorInfo) -> dict[str, Any]:
    out: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.http_status is not None:
        out["http_status"] = error.http_status
    return out


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class RedisStore(Store):
    def __init__(self, url: str, *, prefix: str = "backstream") -> None:
        """``redis://HOST:PORT/DB`` or ``rediss://...``; ``redis+cluster://HOST:PORT`` (or
        ``rediss+cluster://``) for Redis Cluster through coredis' cluster client."""
        self.cluster = "+cluster://" in url
        self.url = url.replace("+cluster://", "://")
        self.prefix = prefix
        # A hash tag: every key of this store lands in one cluster slot, so each Lua script's
        # keys are on one node (on a single server it changes nothing).
        self._tag = "{" + prefix + "}"
        self._stack: contextlib.AsyncExitStack | None = None
        self._redis: coredis.Redis[str] | coredis.RedisCluster[str] | None = None
        self._changed: dict[str, trio.lowlevel.ParkingLot] = {}
        self._aborts: dict[str, trio.Event] = {}
        # user and message_id of jobs being written, so a commit takes one round trip
        self._names: dict[str, tuple[str, str]] = {}
        self.subscribed = trio.Event()

    # -- keys -------------------------------------------------------------------------

    def _k(self, *parts: str) -> str:
        return ":".join((self._tag, *parts))

    def _job(self, job_id: str) -> str:
        return self._k("job", job_id)

    def _log(self, job_id: str) -> str:
        return self._k("log", job_id)

    def _msg(self, user: str, message_id: str) -> str:
        return self._k("msg", str(len(user)), user, message_id)

    def _user_index(self, user: str) -> str:
        return self._k("user", str(len(user)), user)

    def _thread_index(self, user: str, thread_id: str) -> str:
        return self._k("thread", str(len(user)), user, thread_id)

    def _user_running(self, user: str) -> str:
        return self._k("running", str(len(user)), user)

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        stack = contextlib.AsyncExitStack()
        try:
            client: coredis.Redis[str] | coredis.RedisCluster[str]
            if self.cluster:
                client = _cluster_client(self.url)
            else:
                client = coredis.Redis.from_url(self.url, decode_responses=True)
            await stack.enter_async_context(client)
            self._redis = client
            self._scripts = {
                name: client.register_script(body)
                for name, body in (
                    ("create", scripts.CREATE),
                    ("commit", scripts.COMMIT),
                    ("recover", scripts.RECOVER),
                    ("renew", scripts.RENEW),
                    ("notify", scripts.NOTIFY),
                )
            }
            await self.ping()
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack

    async def aclose(self) -> None:
        stack, self._stack = self._stack, None
        self._redis = None
        if stack is not None:
            await stack.aclose()

    @property
    def redis(self) -> coredis.Redis[str] | coredis.RedisCluster[str]:
        if self._redis is None:
            raise UnavailableError("the store is closed")
        return self._redis

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen for commits and aborts from every instance; resubscribe after outages."""
        task_status.started()
        backoff = Backoff(0.1, 5.0, jitter="none")
        while True:
            try:
                channels = [self._k("commits"), self._k("aborts"), self._k("notifications")]
                async with self.redis.pubsub(channels=channels, ignore_subscribe_messages=True) as pubsub:
                    self.subscribed.set()
                    backoff.reset()
                    self._wake_all()  # anything missed while unsubscribed
                    async for message in pubsub:
                        self._dispatch(str(message["channel"]), str(message["data"]))
            except (coredis.exceptions.RedisError, OSError) as exc:
                self.subscribed = trio.Event()
                delay = backoff.next_delay()
                log.warning("redis subscription lost (%s); retrying in %.1fs", exc, delay)
                await trio.sleep(delay)

    def _dispatch(self, channel: str, data: str) -> None:
        if channel.endswith(":commits"):
            lot = self._changed.get(data.split(" ", 1)[0])
            if lot is not None:
                lot.unpark_all()
        elif channel.endswith(":notifications"):
            if self.notification_listener is not None:
                self.notification_listener(NotificationRecord(**json.loads(data)))
        elif channel.endswith(":aborts"):
            event = self._aborts.get(data)
            if event is not None:
                event.set()

    def _wake_all(self) -> None:
        for lot in self._changed.values():
            lot.unpark_all()

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (coredis.exceptions.ConnectionError, TimeoutError, OSError) as exc:
            raise UnavailableError(f"redis unavailable: {exc}") from None

    async def ping(self) -> None:
        await self._call(self.redis.ping())

    # -- jobs ---------------------------------------------------------------------------

    @staticmethod
    def _fields(data: dict[str, Any]) -> list[str]:
        flat: list[str] = []
        for name, value in data.items():
            flat += [name, json.dumps(value, separators=(",", ":"))]
        return flat

    @staticmethod
    def _decode(raw: dict[str, str]) -> JobRecord | None:
        if not raw or "job_id" not in raw:
            return None
        return record_from_dict({name: json.loads(value) for name, value in raw.items()})

    async def create_job(
        self, record: JobRecord, capacity: SharedCapacity | None = None
    ) -> tuple[JobRecord, bool]:
        keys = [
            self._msg(record.user, record.message_id),
            self._job(record.job_id),
            self._user_index(record.user),
            self._thread_index(record.user, record.thread_id),
            self._k("running"),
            self._user_running(record.user),
        ]
        limits = ["", "", "", ""]
        if capacity is not None:
            limits = [
                repr(capacity.now),
                str(capacity.max_jobs),
                str(capacity.max_jobs_per_user),
                repr(capacity.lease_until),
            ]
        args = [record.job_id, repr(record.created_at), *limits, *self._fields(record_to_dict(record))]
        existing = await self._call(self._scripts["create"](keys=keys, args=args))
        if existing in ("!server", "!user"):
            scope = "the cluster" if existing == "!server" else "you"
            raise CapacityError(f"{scope} reached the limit of running jobs", retry_after_ms=1000)
        if not existing:
            self._names[record.job_id] = (record.user, record.message_id)
        if existing:
            found = await self.get_job(str(existing))
            if found is not None:
                return found, False
        return record, True

    async def get_job(self, job_id: str) -> JobRecord | None:
        return self._decode(await self._call(self.redis.hgetall(self._job(job_id))))

    async def find_job(self, user: str, message_id: str) -> JobRecord | None:
        job_id = await self._call(self.redis.get(self._msg(user, message_id)))
        return await self.get_job(str(job_id)) if job_id else None

    async def commit(self, job_id: str, entries: Sequence[LogEvent], progress: JobProgress) -> None:
        names = self._names.get(job_id)
        if names is None:
            record = await self.get_job(job_id)
            if record is None:
                return  # the store no longer holds it (swept, or Redis lost it): watchers get gone
            names = (record.user, record.message_id)
        user, message_id = names
        terminal = progress.status in TERMINAL_STATUSES
        ttl_s = (progress.expires_at or 0) - progress.updated_at + _SAFETY_TTL_S
        fields = {
            "status": progress.status,
            "seq": progress.seq,
            "content_length": progress.content_length,
            "updated_at": progress.updated_at,
            "finished_at": progress.finished_at,
            "error": None if progress.error is None else _error_dict(progress.error),
            "usage": progress.usage,
            "expires_at": progress.expires_at,
        }
        if terminal:
            fields["lease_until"] = None
        keys = [
            self._job(job_id),
            self._log(job_id),
            self._msg(user, message_id),
            self._k("expiry"),
            self._k("running"),
            self._user_running(user),
        ]
        args = [
            job_id,
            str(entries[0].seq if entries else progress.seq + 1),
            str(entries[-1].seq if entries else progress.seq),
            events_to_json(entries) if entries else "",
            "1" if terminal else "0",
            str(_ms(max(ttl_s, 1.0))),
            repr(progress.expires_at or 0.0),
            self._k("commits"),
            *self._fields(fields),
        ]
        try:
            await self._call(self._scripts["commit"](keys=keys, args=args))
        finally:
            if terminal:  # the job's last write here, whether it landed or not
                self._names.pop(job_id, None)

    async def read(self, job_id: str, after_seq: int, limit: int) -> list[LogEvent]:
        out: list[LogEvent] = []
        start = f"{after_seq + 1}-0"
        while len(out) < limit:
            batch = await self._call(self.redis.xrange(self._log(job_id), start, "+", count=64))
            if not batch:
                break
            for entry in batch:
                for event in events_from_json(entry.field_values["e"]):
                    # A retried commit can repeat entries in a later batch: keep each seq once.
                    if event.seq > after_seq and (not out or event.seq > out[-1].seq):
                        out.append(event)
            last_seq = int(str(batch[-1].identifier).split("-", 1)[0])
            start = f"{last_seq + 1}-0"
        return out[:limit]

    async def wait_for_entries(self, job_id: str, after_seq: int) -> None:
        lot = self._changed.setdefault(job_id, trio.lowlevel.ParkingLot())
        try:
            seq = await self._call(self.redis.hget(self._job(job_id), "seq"))
            if seq is None or int(seq) > after_seq:
                return
            with trio.move_on_after(_WAIT_POLL_S):
                await lot.park()
        finally:
            if not lot.statistics().tasks_waiting and self._changed.get(job_id) is lot:
                del self._changed[job_id]

    async def list_jobs(
        self,
        user: str,
        *,
        thread_id: str | None = None,
        statuses: frozenset[str] | None = None,
        limit: int = 50,
    ) -> list[JobRecord]:
        index = self._thread_index(user, thread_id) if thread_id is not None else self._user_index(user)
        out: list[JobRecord] = []
        offset, page = 0, max(limit * 2, 50)
        while len(out) < limit and offset < 5000:
            ids = await self._call(self.redis.zrange(index, offset, offset + page - 1, rev=True))
            if not ids:
                break
            offset += page
            async with self.redis.pipeline(transaction=False) as pipe:
                replies = [pipe.hgetall(self._job(str(job_id))) for job_id in ids]
            for reply in replies:
                record = self._decode(await reply)
                if record is None or (statuses is not None and record.status not in statuses):
                    continue
                out.append(record)
                if len(out) >= limit:
                    break
        return out

    async def delete_expired(self, now: float) -> list[str]:
        expired = await self._call(
            self.redis.zrange(
                self._k("expiry"), float("-inf"), now, sortby=PureToken.BYSCORE, offset=0, count=1000
            )
        )
        deleted: list[str] = []
        for job_id in map(str, expired):
            record = await self.get_job(job_id)
            keys = [self._job(job_id), self._log(job_id)]
            if record is not None:
                if record.expires_at is not None and record.expires_at > now:
                    continue  # a newer expiry (it was restarted from scratch); leave it
                keys.append(self._msg(record.user, record.message_id))
                await self._call(self.redis.zrem(self._user_index(record.user), [job_id]))
                await self._call(self.redis.zrem(self._thread_index(record.user, record.thread_id), [job_id]))
            await self._call(self.redis.delete(keys))
            await self._call(self.redis.zrem(self._k("expiry"), [job_id]))
            deleted.append(job_id)
            lot = self._changed.pop(job_id, None)
            if lot is not None:
                lot.unpark_all()
        return deleted

    async def request_abort(self, job_id: str) -> None:
        if await self._call(self.redis.exists([self._job(job_id)])):
            await self._call(self.redis.hset(self._job(job_id), {"abort_requested": "true"}))
            await self._call(self.redis.publish(self._k("aborts"), job_id))

    async def wait_abort_requested(self, job_id: str) -> None:
        event = self._aborts.setdefault(job_id, trio.Event())
        try:
            while not event.is_set():
                flag = await self.redis.hget(self._job(job_id), "abort_requested")
                if flag == "true":
                    return
                with trio.move_on_after(_WAIT_POLL_S * 5):  # a missed message costs 5 s at most
                    await event.wait()
        except (coredis.exceptions.RedisError, OSError):
            await trio.sleep(_WAIT_POLL_S)  # Redis is away; the caller asks again
        finally:
            if self._aborts.get(job_id) is event:
                del self._aborts[job_id]

    # -- watchers and notifications, across instances ------------------------------------

    def _inbox(self, user: str) -> tuple[str, str]:
        return self._k("notif", str(len(user)), user), self._k("notifs", str(len(user)), user)

    async def watch_started(self, job_id: str, watch_id: str, until: float) -> None:
        await self._call(self.redis.zadd(self._k("watching", job_id), {watch_id: until}))

    async def watch_ended(self, job_id: str, watch_id: str, *, saw_end: bool) -> None:
        if saw_end:
            await self._call(self.redis.set(self._k("seen", job_id), "1", px=_ms(_SAFETY_TTL_S)))
        await self._call(self.redis.zrem(self._k("watching", job_id), [watch_id]))

    async def renew_watches(self, watches: Sequence[tuple[str, str]], until: float) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id, watch_id in watches:
                pipe.zadd(self._k("watching", job_id), {watch_id: until}, condition=PureToken.XX)

    async def notify_unwatched(self, notification: NotificationRecord, now: float, max_per_user: int) -> bool:
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
            str(_ms(_SAFETY_TTL_S * 24)),
            "0" if n.type == "ai.tool.approval_required" else "1",
        ]
        return bool(await self._call(self._scripts["notify"](keys=keys, args=args)))

    async def list_notifications(
        self, user: str, *, unread_only: bool, limit: int
    ) -> tuple[list[NotificationRecord], int]:
        hash_key, order_key = self._inbox(user)
        ids = [str(i) for i in await self._call(self.redis.zrange(order_key, 0, -1, rev=True))]
        values = await self._call(self.redis.hmget(hash_key, ids)) if ids else []
        items = [NotificationRecord(**json.loads(v)) for v in values if v]
        unread = sum(1 for n in items if not n.read)
        if unread_only:
            items = [n for n in items if not n.read]
        return items[:limit], unread

    async def mark_notifications_read(self, user: str, ids: Sequence[str], *, everything: bool) -> int:
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
        key = self._k("muted", str(len(user)), user)
        if muted:
            await self._call(self.redis.sadd(key, [thread_id]))
        else:
            await self._call(self.redis.srem(key, [thread_id]))

    # -- approvals through any instance ---------------------------------------------------

    async def send_decision(self, job_id: str, call_id: str, approved: bool) -> None:
        value = "true" if approved else "false"
        await self._call(self.redis.hset(self._job(job_id), {f"decision:{call_id}": value}))
        await self._call(self.redis.publish(self._k("aborts"), f"{job_id} {call_id}"))

    async def wait_decision(self, job_id: str, call_id: str) -> bool:
        event = self._aborts.setdefault(f"{job_id} {call_id}", trio.Event())
        try:
            while True:
                value = await self._call(self.redis.hget(self._job(job_id), f"decision:{call_id}"))
                if value in ("true", "false"):
                    return bool(value == "true")
                with trio.move_on_after(_WAIT_POLL_S * 5):  # a missed message costs 5 s at most
                    await event.wait()
                event = self._aborts[f"{job_id} {call_id}"] = trio.Event()
        finally:
            self._aborts.pop(f"{job_id} {call_id}", None)

    # -- many instances -----------------------------------------------------------------

    async def renew_leases(self, owner: str, job_ids: Sequence[str], until: float) -> None:
        if job_ids:
            await self._call(self._scripts["renew"](keys=[self._tag], args=[repr(until), *job_ids]))

    async def recover_orphans(self, owner: str, now: float, retention: float) -> list[JobRecord]:
        candidates = await self._call(
            self.redis.zrange(self._k("running"), float("-inf"), now, sortby=PureToken.BYSCORE)
        )
        recovered: list[JobRecord] = []
        for job_id in map(str, candidates):
            record = await self.get_job(job_id)
            keys = [
                self._job(job_id),
                self._log(job_id),
                self._msg(record.user, record.message_id) if record else self._k("none"),
                self._k("expiry"),
                self._k("running"),
                self._user_running(record.user) if record else "",
            ]
            args = [
                job_id,
                repr(now),
                str(_ms(retention + _SAFETY_TTL_S)),
                repr(now + retention),
                self._k("commits"),
            ]
            if await self._call(self._scripts["recover"](keys=keys, args=args)) == 1:
                final = await self.get_job(job_id)
                if final is not None:
                    recovered.append(final)
        return recovered


def _cluster_client(url: str) -> coredis.RedisCluster[str]:
    """A cluster client bootstrapped from the node in ``url`` (with its credentials and TLS)."""
    parts = urllib.parse.urlsplit(url)
    options: dict[str, Any] = {}
    if parts.username:
        options["username"] = urllib.parse.unquote(parts.username)
    if parts.password:
        options["password"] = urllib.parse.unquote(parts.password)
    if parts.scheme == "rediss":
        options["ssl_context"] = ssl.create_default_context()
    node = TCPLocation(host=parts.hostname or "127.0.0.1", port=parts.port or 6379)
    return coredis.RedisCluster(startup_nodes=[node], decode_responses=True, **options)
