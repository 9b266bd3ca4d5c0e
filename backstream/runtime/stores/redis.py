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
atomic. A commit is planned in Python (``stores.shared.plan_commit``: which
entries are new) against the ``seq`` this process last saw, and the script
applies it only if the stored ``seq`` is still that one; otherwise it answers
with the stored ``seq`` and the commit is planned again. So a retried commit
adds nothing twice, and a log behind the writer (Redis back from an older
snapshot) is reported, never left with a gap. One pub/sub subscriber per
instance (``{p}:commits``, ``{p}:aborts``, ``{p}:decisions``,
``{p}:notifications``) wakes local waiters; every wait also polls, with a
floor, in case a message was missed.

Outages: every method but the ``wait_*`` ones raises ``UnavailableError``; the
waits retry with backoff until Redis answers again. Finished jobs' keys also
expire in Redis, an hour after retention, should no sweep ever run.
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

from backstream.actors.ports import (
    JobEndedElsewhereError,
    LogBehindError,
    NotificationListener,
    Store,
    StoreClosedError,
)
from backstream.protocol.backoff import Backoff
from backstream.protocol.errors import CapacityError, UnavailableError
from backstream.protocol.events import LogEvent
from backstream.protocol.lifecycle import LIVE_STATUSES, TERMINAL_STATUSES, is_terminal
from backstream.protocol.records import (
    JobProgress,
    JobRecord,
    NotificationRecord,
    SharedCapacity,
    events_from_json,
    events_to_json,
    progress_to_dict,
    record_from_dict,
    record_to_dict,
)
from backstream.runtime.stores import redis_scripts as scripts
from backstream.runtime.stores.redis_notifications import SAFETY_TTL_S, RedisNotifications, ms
from backstream.runtime.stores.shared import interrupted, plan_commit

__all__ = ["RedisStore", "RedisStoreStatistics"]

log = logging.getLogger("backstream.redis")

_TERMINAL_JSON = json.dumps(sorted(TERMINAL_STATUSES))
_WAIT_POLL_S = 1.0  # a missed pub/sub message delays a remote watcher by this at most
_SIGNAL_POLL_S = 5.0  # ... and an abort or a decision by this
_UNAVAILABLE = (
    coredis.exceptions.ConnectionError,  # includes BusyLoadingError: Redis restarting
    coredis.exceptions.ClusterDownError,
    coredis.exceptions.TryAgainError,
    TimeoutError,
    OSError,
)


def _outage_backoff() -> Backoff:
    """The schedule of every wait that meets an outage: 0.1 s, doubling, at most 5 s."""
    return Backoff(0.1, 5.0)


@attrs.define
class _Writing:
    """A job this process writes: its names (so a commit takes one round trip) and the
    ``seq`` its log had at the last commit seen."""

    user: str
    message_id: str
    stored_seq: int


@attrs.frozen
class RedisStoreStatistics:
    subscribed: bool
    """The pub/sub listener is connected (else waits rely on their polls)."""
    jobs_writing: int
    readers_waiting: int
    """Tasks parked in ``wait_for_entries``."""
    signal_waiters: int
    """Tasks waiting for an abort or a decision."""
    commits_replanned: int
    """Commits whose log was not where this process last saw it (a retry that had
    landed, or Redis back from an older snapshot)."""
    outage_retries: int
    """Waits that met an unavailable Redis and retried."""


class RedisStore(RedisNotifications, Store):
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
        self._aborts: dict[str, trio.Event] = {}  # by job id
        self._decisions: dict[str, trio.Event] = {}  # by "job_id call_id"
        self._writing: dict[str, _Writing] = {}
        self._on_notification: NotificationListener | None = None
        self._commits_replanned = 0
        self._outage_retries = 0
        self.subscribed = trio.Event()
        """Set while the pub/sub listener is connected."""

    def statistics(self) -> RedisStoreStatistics:
        return RedisStoreStatistics(
            subscribed=self.subscribed.is_set(),
            jobs_writing=len(self._writing),
            readers_waiting=sum(lot.statistics().tasks_waiting for lot in self._changed.values()),
            signal_waiters=len(self._aborts) + len(self._decisions),
            commits_replanned=self._commits_replanned,
            outage_retries=self._outage_retries,
        )

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

    async def open(self, *, on_notification: NotificationListener | None = None) -> None:
        self._on_notification = on_notification
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
        """Close the connections. Cancellation: they are closed all the same."""
        stack, self._stack = self._stack, None
        self._redis = None
        if stack is not None:
            await stack.aclose()

    @property
    def redis(self) -> coredis.Redis[str] | coredis.RedisCluster[str]:
        if self._redis is None:
            raise StoreClosedError("the store is closed")
        return self._redis

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen for commits, aborts, decisions and notifications from every instance;
        resubscribe after outages. Cancellation: stops listening (waits then rely on polls).

        coredis runs a subscription in a task group of its own, so what ends it (a lost
        connection, a subscription Redis did not acknowledge in time, e.g. while it pauses
        its clients) may come wrapped in an exception group: ``except*`` handles both."""
        task_status.started()
        backoff = _outage_backoff()
        while True:
            try:
                channels = [self._k(name) for name in ("commits", "aborts", "decisions", "notifications")]
                async with self.redis.pubsub(channels=channels, ignore_subscribe_messages=True) as pubsub:
                    self.subscribed.set()
                    backoff.reset()
                    self._wake_all()  # anything missed while unsubscribed
                    async for message in pubsub:
                        self._dispatch(str(message["channel"]), str(message["data"]))
            except* (coredis.exceptions.RedisError, OSError) as lost:
                self._outage_retries += 1
                self.subscribed = trio.Event()
                delay = backoff.next_delay()
                log.warning("redis subscription lost (%s); retrying in %.1fs", _describe(lost), delay)
                await trio.sleep(delay)

    def _dispatch(self, channel: str, data: str) -> None:
        if channel.endswith(":commits"):
            lot = self._changed.get(data.split(" ", 1)[0])
            if lot is not None:
                lot.unpark_all()
        elif channel.endswith(":notifications"):
            if self._on_notification is not None:
                self._on_notification(NotificationRecord(**json.loads(data)))
        else:
            waiting = self._aborts if channel.endswith(":aborts") else self._decisions
            event = waiting.get(data)
            if event is not None:
                event.set()

    def _wake_all(self) -> None:
        for lot in self._changed.values():
            lot.unpark_all()
        for event in (*self._aborts.values(), *self._decisions.values()):
            event.set()  # their waiters read the flag again

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except _UNAVAILABLE as exc:
            raise UnavailableError(f"redis unavailable: {exc}") from None

    async def _retry_outage(self, what: str, backoff: Backoff, exc: UnavailableError) -> None:
        """Sleep before a wait asks Redis again; re-raise if the store was closed."""
        if isinstance(exc, StoreClosedError):
            raise exc
        self._outage_retries += 1
        delay = backoff.next_delay()
        log.debug("%s: %s; retrying in %.1fs", what, exc, delay)  # the writes warn already
        await trio.sleep(delay)

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
            self._writing[record.job_id] = _Writing(record.user, record.message_id, record.seq)
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
        """One script call, two if the log was not where this process last saw it.
        Cancellation: the script ran entirely or not at all; commit again."""
        writing = self._writing.get(job_id)
        if writing is None:
            record = await self.get_job(job_id)
            if record is None:
                return  # the store no longer holds it (swept, or Redis lost it): watchers get gone
            writing = _Writing(record.user, record.message_id, record.seq)
        terminal = is_terminal(progress.status)
        try:
            for attempt in range(3):
                try:
                    plan = plan_commit(job_id, entries, progress, writing.stored_seq)
                except LogBehindError:
                    if attempt > 0:
                        raise  # planned against the seq Redis holds: the log is really behind
                    stored = await self._call(self.redis.hget(self._job(job_id), "seq"))
                    if stored is None:
                        return
                    writing.stored_seq = int(stored)  # this process's view may be stale
                    continue
                if not plan.entries and not plan.apply_progress:
                    return  # a late retry: the store is ahead of it
                reply = await self._call(
                    self._scripts["commit"](
                        keys=self._commit_keys(job_id, writing.user, writing.message_id),
                        args=self._commit_args(job_id, writing.stored_seq, plan.entries, progress),
                    )
                )
                if int(reply[0]) == 0:  # Redis lost the job (a restart without its data)
                    self._writing.pop(job_id, None)
                    return
                if int(reply[0]) == 3:  # ended already: recovered by another instance
                    self._writing.pop(job_id, None)
                    raise JobEndedElsewhereError(job_id)
                if int(reply[0]) == 1:
                    writing.stored_seq = progress.seq
                    if not terminal:
                        self._writing[job_id] = writing
                    return
                self._commits_replanned += 1
                writing.stored_seq = int(reply[1])
            raise UnavailableError(f"{job_id}: its log kept moving under the commit")
        finally:
            if terminal:  # the job's last write here, whether it landed or not
                self._writing.pop(job_id, None)

    def _commit_keys(self, job_id: str, user: str, message_id: str) -> list[str]:
        return [
            self._job(job_id),
            self._log(job_id),
            self._msg(user, message_id),
            self._k("expiry"),
            self._k("running"),
            self._user_running(user),
        ]

    def _commit_args(
        self, job_id: str, expected_seq: int, entries: Sequence[LogEvent], progress: JobProgress
    ) -> list[str]:
        terminal = is_terminal(progress.status)
        fields = progress_to_dict(progress)
        if terminal:
            fields["lease_until"] = None
        ttl_s = (progress.expires_at or 0) - progress.updated_at + SAFETY_TTL_S
        return [
            job_id,
            str(expected_seq),
            str(entries[-1].seq if entries else progress.seq),
            events_to_json(entries) if entries else "",
            "1" if terminal else "0",
            str(ms(max(ttl_s, 1.0))),
            repr(progress.expires_at or 0.0),
            self._k("commits"),
            _TERMINAL_JSON,
            *self._fields(fields),
        ]

    async def read(self, job_id: str, after_seq: int, limit: int) -> list[LogEvent]:
        out: list[LogEvent] = []
        start = f"{after_seq + 1}-0"
        while len(out) < limit:
            batch = await self._call(self.redis.xrange(self._log(job_id), start, "+", count=64))
            if not batch:
                break
            for entry in batch:
                for event in events_from_json(entry.field_values["e"]):
                    # Keep each seq once (logs written before commits were checked against
                    # the stored seq may repeat entries after a retry).
                    if event.seq > after_seq and (not out or event.seq > out[-1].seq):
                        out.append(event)
            last_seq = int(str(batch[-1].identifier).split("-", 1)[0])
            start = f"{last_seq + 1}-0"
        return out[:limit]

    async def wait_for_entries(self, job_id: str, after_seq: int) -> None:
        """Returns when the record goes past ``after_seq``, ends, or is gone; otherwise
        after a commit message or ``_WAIT_POLL_S`` (a missed message). Waits through an
        outage. Cancellation: safe."""
        lot = self._changed.setdefault(job_id, trio.lowlevel.ParkingLot())
        backoff = _outage_backoff()
        try:
            while True:
                try:
                    seq, status = await self._call(self.redis.hmget(self._job(job_id), ["seq", "status"]))
                    break
                except UnavailableError as exc:
                    await self._retry_outage(f"job {job_id}: reading its progress", backoff, exc)
            if seq is None or int(seq) > after_seq or is_terminal(json.loads(status)):
                await trio.lowlevel.checkpoint()
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
        """Returns only once the job's ``abort_requested`` flag reads true. Woken by the
        ``aborts`` channel, and reads the flag every ``_SIGNAL_POLL_S`` in case a message
        was missed; an outage, however long, is waited through. Cancellation: safe."""
        await self._wait_signal(self._aborts, job_id, job_id, "abort_requested", {"true"})

    async def _wait_signal(
        self, waiting: dict[str, trio.Event], name: str, job_id: str, field: str, accepted: set[str]
    ) -> str:
        """Wait until ``field`` of the job's record holds one of ``accepted`` and return it.
        Woken through ``waiting[name]``, which the listener sets; polls with a floor."""
        what = f"job {job_id}: reading {field}"
        backoff = _outage_backoff()
        try:
            while True:
                event = waiting[name] = trio.Event()
                try:
                    value = await self._call(self.redis.hget(self._job(job_id), field))
                except UnavailableError as exc:
                    await self._retry_outage(what, backoff, exc)
                    continue
                backoff.reset()
                if value in accepted:
                    return str(value)
                with trio.move_on_after(_SIGNAL_POLL_S):
                    await event.wait()
                await trio.sleep(0.01)  # the floor: a storm of wake-ups costs 100 reads/s at most
        finally:
            waiting.pop(name, None)

    # -- approvals through any instance ---------------------------------------------------

    async def send_decision(self, job_id: str, call_id: str, approved: bool) -> None:
        """The first decision on a call stands (``HSETNX``); its ``decisions`` message wakes
        the instance that runs the job. Cancellation: it may or may not be stored."""
        value = "true" if approved else "false"
        await self._call(self.redis.hsetnx(self._job(job_id), f"decision:{call_id}", value))
        await self._call(self.redis.publish(self._k("decisions"), f"{job_id} {call_id}"))

    async def wait_decision(self, job_id: str, call_id: str) -> bool:
        """Woken by the ``decisions`` channel; reads the decision every ``_SIGNAL_POLL_S``
        in case a message was missed; waits through an outage. Cancellation: safe."""
        name, field = f"{job_id} {call_id}", f"decision:{call_id}"
        return await self._wait_signal(self._decisions, name, job_id, field, {"true", "false"}) == "true"

    # -- many instances -----------------------------------------------------------------

    async def renew_leases(self, owner: str, job_ids: Sequence[str], until: float) -> None:
        if not job_ids:
            await trio.lowlevel.checkpoint()
            return
        keys = [self._k("running")]
        for job_id in job_ids:
            writing = self._writing.get(job_id)
            user = writing.user if writing is not None else await self._user_of(job_id)
            # The user's key is built here, as everywhere: Lua's string.len counts bytes.
            keys += [self._job(job_id), self._user_running(user) if user is not None else self._k("none")]
        await self._call(self._scripts["renew"](keys=keys, args=[repr(until), *job_ids]))

    async def _user_of(self, job_id: str) -> str | None:
        raw = await self._call(self.redis.hget(self._job(job_id), "user"))
        return None if raw is None else str(json.loads(raw))

    async def recover_orphans(self, owner: str, now: float, retention: float) -> list[JobRecord]:
        candidates = await self._call(
            self.redis.zrange(self._k("running"), float("-inf"), now, sortby=PureToken.BYSCORE)
        )
        recovered: list[JobRecord] = []
        for job_id in map(str, candidates):
            record = await self.get_job(job_id)
            if record is not None and record.owner == owner and job_id in self._writing:
                # The caller runs it (this store still writes it): not an orphan, whatever its
                # lease says. A renewal that a frozen Redis held up lands with a lease that may
                # have lapsed since. (A job of the caller's that it gave up writing is one.)
                continue
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
                str(ms(retention + SAFETY_TTL_S)),
                repr(now + retention),
                self._k("commits"),
            ]
            args.append(json.dumps(sorted(LIVE_STATUSES)))
            if record is None:
                await self._call(self._scripts["recover"](keys=keys, args=[*args, "-1", "0", "[]"]))
                continue
            final, event = interrupted(record, now, retention)
            fields = {
                name: getattr(final, name)
                for name in (
                    "status",
                    "seq",
                    "epoch",
                    "updated_at",
                    "finished_at",
                    "expires_at",
                    "lease_until",
                )
            }
            args += [str(record.seq), str(final.seq), events_to_json([event]), *self._fields(fields)]
            if await self._call(self._scripts["recover"](keys=keys, args=args)) == 1:
                recovered.append(final)
        return recovered


def _describe(group: BaseExceptionGroup[BaseException]) -> str:
    """The messages of the exceptions in ``group`` (nested groups flattened)."""
    return "; ".join(
        _describe(exc) if isinstance(exc, BaseExceptionGroup) else f"{type(exc).__name__}: {exc}"
        for exc in group.exceptions
    )


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
