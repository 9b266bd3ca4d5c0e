"""``RedisSubscriber``: what other instances write reaches this one's waiters, and only
what this instance follows.

Channels are per job and per user, on sharded pub/sub (``SSUBSCRIBE``; coredis'
``sharded_pubsub`` on a cluster, one connection per primary; on one Redis, the same
commands on one connection). Nothing is broadcast: an instance subscribes to a channel
while something of its own has an ``interest`` in it (a remote tail of a job, a wait
for a job's abort or decision, a connection of a user) and unsubscribes after the last
goes, so a commit, an abort or a notification reaches only the instances that follow
that job or user. One task (``_follow_interest``) applies the changes: interests come
and go synchronously, the subscription follows a moment later; what is published in
between is found by the waiters' reads (each listens, reads, then waits, and also
polls, with a floor, in case a message was missed), and every waiter of a channel is
woken once its subscription is acknowledged. After an outage it subscribes again and
wakes every waiter (they read again what they may have missed).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import coredis
import coredis.exceptions
import trio
from coredis.patterns.pubsub import PubSub

from backstream.actors.ports import EntriesListener, NotificationListener
from backstream.actors.signals import SignalHub, Topic, outage_backoff, through_outage
from backstream.protocol.backoff import Backoff
from backstream.protocol.errors import UnavailableError
from backstream.protocol.events import LogEvent
from backstream.protocol.lifecycle import is_terminal
from backstream.protocol.records import NotificationRecord, events_from_json
from backstream.runtime.stores.redis_client import RedisConnection

__all__ = [
    "MAX_CHANNELS",
    "REMOTE_OUTAGE_S",
    "SIGNAL_POLL_S",
    "WAIT_POLL_S",
    "RedisSubscriber",
    "RedisSubscriberStatistics",
]

log = logging.getLogger("backstream.redis")

REMOTE_OUTAGE_S = 3.0
"""A watcher of a job running elsewhere waits through an outage this long, then is told
``unavailable`` (it may resume once the store is back)."""
WAIT_POLL_S = 1.0
"""A missed commit message delays a remote watcher by this at most."""
SIGNAL_POLL_S = 5.0
"""... and an abort or a decision by this."""
MAX_CHANNELS = 100_000
"""Channels followed at once. Past it, a new interest is not subscribed: its waiters rely
on their polls (and a user's connection on listing its notifications)."""
_FLOOR_S = 0.01
"""Between two reads of one wait: a storm of wake-ups costs 100 reads/s at most."""
_CHUNK = 256
"""Channels per subscribe (or unsubscribe) call."""

COMMITS, CONTROL, USER = "commits", "control", "user"
STREAM = "stream"
"""A durable stream's channel (``streams_redis``): the interest's name is the channel."""


@attrs.define
class _Route:
    """A followed channel: what it is about, and who holds an interest in it."""

    kind: str
    name: str
    holders: int = 0
    topics: dict[Topic, int] = attrs.Factory(dict)
    """Hub topics woken once the subscription is acknowledged (a message published
    before then was not received): held per interest."""
    on_entries: list[EntriesListener] = attrs.Factory(list)
    """Given the entries a commit's announcement carries (``follow_job``)."""


@attrs.frozen
class RedisSubscriberStatistics:
    connected: bool
    channels_followed: int
    """Channels something here has an interest in."""
    channels_subscribed: int
    """... of which the subscription is acknowledged."""
    messages_total: int
    """Messages received on any channel (every one is for something followed here)."""
    subscribes_total: int
    unsubscribes_total: int
    interests_overflowed_total: int
    """Interests refused at ``MAX_CHANNELS`` (their waiters poll)."""
    watch_requests_total: int
    """``watch`` messages sent: a followed job's commits were not announced."""
    outage_retries: int


class _OneRedisShardedPubSub(PubSub[str]):
    """coredis' ``PubSub`` speaking the sharded commands: on one Redis (no cluster) the
    channels are still sharded ones, so that the scripts ``SPUBLISH`` alike on both."""

    _SHARDED = {b"SUBSCRIBE": b"SSUBSCRIBE", b"UNSUBSCRIBE": b"SUNSUBSCRIBE"}

    def _execute_command(self, command: bytes, *args: Any) -> None:
        if command in (b"UNSUBSCRIBE", b"PUNSUBSCRIBE") and not args:
            return  # coredis' cleanup unsubscribes from everything: the connection closes anyway
        super()._execute_command(self._SHARDED.get(bytes(command), command), *args)


class RedisSubscriber:
    def __init__(self, conn: RedisConnection, hub: SignalHub) -> None:
        self._conn = conn
        self._hub = hub
        self.on_notification: NotificationListener | None = None
        self.on_watched: Callable[[str], None] | None = None
        """Called with a job id when a follower asks for its commits (``watch``)."""
        self.on_stream_change: Callable[[str], None] | None = None
        """Called with a durable stream's channel when a write of it is announced."""
        self.outage_retries = 0
        self.subscribed = trio.Event()
        """Set while the pub/sub connection is up."""
        self._routes: dict[str, _Route] = {}
        self._current: set[str] = set()
        self._changed = trio.Event()
        self._announced: dict[str, int] = {}
        """Per followed job: the last seq announced on its channel since it was subscribed."""
        self._verified: set[str] = set()
        """Followed jobs read since their subscription was acknowledged, with no missed
        announcement since: their waits trust the channel and skip the read."""
        self._watch_requests: set[str] = set()
        self._messages_total = 0
        self._subscribes_total = 0
        self._unsubscribes_total = 0
        self._overflowed_total = 0
        self._watch_requests_total = 0

    def count_retry(self, exc: UnavailableError) -> None:
        self.outage_retries += 1

    def statistics(self) -> RedisSubscriberStatistics:
        return RedisSubscriberStatistics(
            connected=self.subscribed.is_set(),
            channels_followed=len(self._routes),
            channels_subscribed=len(self._current),
            messages_total=self._messages_total,
            subscribes_total=self._subscribes_total,
            unsubscribes_total=self._unsubscribes_total,
            interests_overflowed_total=self._overflowed_total,
            watch_requests_total=self._watch_requests_total,
            outage_retries=self.outage_retries,
        )

    # -- interests -------------------------------------------------------------------------

    def _channel(self, kind: str, name: str) -> str:
        keys = self._conn.keys
        if kind == COMMITS:
            return keys.job_channel(name)
        if kind == CONTROL:
            return keys.control_channel(name)
        if kind == STREAM:
            return name
        return keys.user_channel(name)

    @contextmanager
    def interest(
        self, kind: str, name: str, topic: Topic | None = None, on_entries: EntriesListener | None = None
    ) -> Iterator[None]:
        """Follow the channel of ``kind`` (``commits``, ``control``: a job id; ``user``) for
        the block; ``topic`` is woken once the subscription is acknowledged; ``on_entries``
        gets the entries that a commit's announcement carries."""
        channel = self._channel(kind, name)
        route = self._routes.get(channel)
        if route is None:
            if len(self._routes) >= MAX_CHANNELS:
                self._overflowed_total += 1
                yield
                return
            route = self._routes[channel] = _Route(kind, name)
            self._changed.set()
        route.holders += 1
        if topic is not None:
            route.topics[topic] = route.topics.get(topic, 0) + 1
        if on_entries is not None:
            route.on_entries.append(on_entries)
        try:
            yield
        finally:
            route.holders -= 1
            if on_entries is not None:
                route.on_entries.remove(on_entries)
            if topic is not None:
                route.topics[topic] -= 1
                if not route.topics[topic]:
                    del route.topics[topic]
            if not route.holders:
                del self._routes[channel]
                self._changed.set()

    def subscribed_to(self, job_id: str) -> bool:
        """The job's channel is subscribed (acknowledged) on the current connection."""
        return self._conn.keys.job_channel(job_id) in self._current

    def announced(self, job_id: str) -> int | None:
        """The last seq announced for the job since its channel was subscribed (None: none)."""
        return self._announced.get(job_id)

    def trusted(self, job_id: str) -> bool:
        """The job's channel is subscribed and was read since, with nothing missed: a wait
        need not read before it listens."""
        return job_id in self._verified

    def verified(self, job_id: str) -> None:
        """The job was read after its subscription was acknowledged (if it is)."""
        if self._conn.keys.job_channel(job_id) in self._current:
            self._verified.add(job_id)

    def suspect(self, job_id: str, *, unannounced: bool) -> None:
        """A wait of the job timed out (its next wait reads first); ``unannounced``: the
        read found commits nobody announced, so ask the writer to announce them."""
        self._verified.discard(job_id)
        if unannounced and self._conn.keys.job_channel(job_id) in self._current:
            self._watch_requests.add(job_id)
            self._changed.set()

    # -- the connection ------------------------------------------------------------------

    def _open_pubsub(self) -> Any:
        """No retry policy: a lost connection ends the subscription, and ``run`` subscribes
        again to everything followed and wakes every waiter (what a silent reconnection
        inside coredis would not do)."""
        client = self._conn.client
        if isinstance(client, coredis.RedisCluster):
            return client.sharded_pubsub(ignore_subscribe_messages=True, retry_policy=None)
        return _OneRedisShardedPubSub(
            client.connection_pool, ignore_subscribe_messages=True, retry_policy=None
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the channels of this instance's interests; resubscribe after outages.
        Once the store is closed, idles until cancelled. Cancellation: stops listening
        (waits then rely on polls).

        coredis runs a subscription in a task group of its own, so what ends it (a lost
        connection, a subscription Redis did not acknowledge in time, e.g. while it pauses
        its clients) may come wrapped in an exception group: ``except*`` handles both."""
        task_status.started()
        backoff = outage_backoff()
        while True:
            if self._hub.closed:
                await trio.sleep_forever()
            try:
                await self._listen(backoff)
            except* (coredis.exceptions.RedisError, OSError) as lost:
                self.outage_retries += 1
                self.subscribed = trio.Event()
                self._forget_subscriptions()
                delay = backoff.next_delay()
                log.warning("redis subscription lost (%s); retrying in %.1fs", _describe(lost), delay)
                await trio.sleep(delay)

    async def _listen(self, backoff: Backoff) -> None:
        """One connection's subscriptions, until it is lost (raises) or the store closes
        (returns, whatever the closing connection raised). Cancellation: stops."""
        try:
            async with self._open_pubsub() as pubsub, trio.open_nursery() as nursery:
                self.subscribed.set()
                backoff.reset()
                self._hub.signal_all()  # anything missed while unsubscribed
                nursery.start_soon(self._follow_interest, pubsub)
                while True:
                    message = await pubsub.get_message()
                    if message is not None:
                        self._dispatch(str(message["channel"]), str(message["data"]))
        except BaseException:
            if not self._hub.closed:
                raise
            self.subscribed = trio.Event()
            self._forget_subscriptions()

    def _forget_subscriptions(self) -> None:
        self._current.clear()
        self._announced.clear()
        self._verified.clear()

    async def _follow_interest(self, pubsub: Any) -> None:
        """Subscribe to what is followed and unsubscribe from what is not, whenever that
        changes. Cancellation: stops (the connection closes with it)."""
        while True:
            self._changed = trio.Event()
            wanted = set(self._routes)
            added = sorted(wanted - self._current)
            for start in range(0, len(added), _CHUNK):
                chunk = added[start : start + _CHUNK]
                try:
                    await pubsub.subscribe(*chunk)
                except KeyError as unknown:  # a slot's shard is not one this connection knows
                    changed = f"the cluster's layout changed: {unknown}"
                    raise coredis.exceptions.ConnectionError(changed) from None
                self._subscribes_total += len(chunk)
                self._current.update(chunk)
                self._acknowledged(chunk)
            dropped = sorted(self._current - wanted)
            for start in range(0, len(dropped), _CHUNK):
                chunk = dropped[start : start + _CHUNK]
                await pubsub.unsubscribe(*chunk)
                self._unsubscribes_total += len(chunk)
                self._current.difference_update(chunk)
            self._forget_unfollowed()
            await self._send_watch_requests()
            await self._changed.wait()

    def _acknowledged(self, channels: list[str]) -> None:
        """Wake the waiters of newly subscribed channels (they read again); a follower of a
        job asks its writer to announce its commits."""
        for channel in channels:
            route = self._routes.get(channel)
            if route is None:
                continue
            for topic in route.topics:
                self._hub.signal(topic)
            if route.kind == COMMITS:
                self._watch_requests.add(route.name)

    def _forget_unfollowed(self) -> None:
        followed = {route.name for route in self._routes.values() if route.kind == COMMITS}
        for job_id in [job_id for job_id in self._announced if job_id not in followed]:
            del self._announced[job_id]
        self._verified &= followed
        self._watch_requests &= followed

    async def _send_watch_requests(self) -> None:
        """``watch`` on the control channel of each job that asked: its writer announces
        its commits again. Lost ones are asked again at the follower's next missed
        announcement. Cancellation: the rest are sent at the next change."""
        while self._watch_requests:
            job_id = self._watch_requests.pop()
            self._watch_requests_total += 1
            try:
                channel = self._conn.keys.control_channel(job_id)
                await self._conn.call(self._conn.client.spublish(channel, "watch"))
            except UnavailableError:
                return  # the connection's loss ends this task too, or the poll asks again

    def _dispatch(self, channel: str, data: str) -> None:
        route = self._routes.get(channel)
        if route is None:
            return  # unfollowed meanwhile
        self._messages_total += 1
        if route.kind == COMMITS:
            self._dispatch_commit(route, data)
        elif route.kind == STREAM:
            if self.on_stream_change is not None:
                self.on_stream_change(route.name)
        elif route.kind == USER:
            if self.on_notification is not None:
                self.on_notification(NotificationRecord(**json.loads(data)))
        elif data == "abort":
            self._hub.signal(("abort", route.name))
        elif data.startswith("decision "):
            self._hub.signal(("decision", f"{route.name} {data.partition(' ')[2]}"))
        elif data == "watch" and self.on_watched is not None:
            self.on_watched(route.name)

    async def wait_for_entries(self, job_id: str, after_seq: int) -> None:
        """Returns when the record goes past ``after_seq``, ends, or is gone; otherwise
        after a commit message or ``WAIT_POLL_S`` (a missed message). Follows the job's
        channel meanwhile (a wake-up because its subscription was just acknowledged reads
        again instead of returning). Reads the record first unless the channel already
        announced a commit past ``after_seq`` (then returns at once) or is trusted
        (subscribed, read since, and no poll found a commit it did not announce); a poll
        that finds one asks the writer to announce again. Waits through an outage of up to
        ``REMOTE_OUTAGE_S``; a longer one raises ``UnavailableError``, so a remote watcher
        is told rather than left waiting. Cancellation: safe."""
        subscriber, topic = self, ("entries", job_id)
        deadline = trio.current_time() + WAIT_POLL_S
        with subscriber.interest(COMMITS, job_id, topic):
            while True:  # a read again per wake-up before the subscription was acknowledged
                with self._hub.listen(topic) as listener:
                    # Before the read: an acknowledgement during it wakes this wait to read again.
                    was_subscribed = subscriber.subscribed_to(job_id)
                    if await self._progressed(job_id, after_seq):
                        return
                    await listener.wait(max(deadline - trio.current_time(), 0.0))
                    if not listener.signalled:
                        subscriber.suspect(job_id, unannounced=False)  # the next wait reads first
                        return
                    announced = subscriber.announced(job_id)
                    if was_subscribed or (announced is not None and announced > after_seq):
                        return

    async def _progressed(self, job_id: str, after_seq: int) -> bool:
        """Whether the job went past ``after_seq``, ended or is gone, as announced or (unless
        its channel is trusted) as read. Cancellation: safe."""
        subscriber = self
        announced = subscriber.announced(job_id)
        if announced is not None and announced > after_seq:
            await trio.lowlevel.checkpoint()
            return True
        if subscriber.trusted(job_id):
            return False
        with trio.move_on_after(REMOTE_OUTAGE_S) as within:
            # On the job's primary: a replica cannot tell whether the job still moves.
            seq, status = await through_outage(
                f"job {job_id}: reading its progress",
                lambda: self._conn.read_progress(self._conn.keys.job(job_id)),
                on_retry=subscriber.count_retry,
            )
        if within.cancelled_caught:
            raise UnavailableError(f"job {job_id}: redis unavailable for {REMOTE_OUTAGE_S:g}s")
        if seq is None or is_terminal(json.loads(status)):
            return True
        if int(seq) > after_seq:
            # Past what was announced: a commit nobody announced (or one since the
            # subscription, whose notice is on its way).
            subscriber.suspect(job_id, unannounced=int(seq) > (announced or 0))
            return True
        subscriber.verified(job_id)
        return False

    def _dispatch_commit(self, route: _Route, data: str) -> None:
        """``ID SEQ`` (an end), or ``ID SEQ JSON`` (a commit and its entries, or entries
        announced before their commit; ``ID`` is ``JOB@EPOCH``, the writer's epoch; ``SEQ``
        how far the log is durable): the entries (or none, to be read), the epoch and the
        durable seq go to the followers that take them, then the job's waiters wake."""
        head, _, rest = data.partition(" ")
        seq, _, payload = rest.partition(" ")
        epoch_text = head.rpartition("@")[2]
        epoch = int(epoch_text) if epoch_text.isdigit() else 0
        durable = int(seq) if seq.isdigit() else 0
        if route.on_entries:
            entries: Sequence[LogEvent] = ()
            try:
                entries = events_from_json(payload) if payload else ()
            except Exception:  # a malformed announcement: the followers read the log instead
                log.warning("job %s: an announcement's entries could not be read", route.name)
            for listener in list(route.on_entries):
                listener(entries, epoch, durable)
        if durable:
            self._announced[route.name] = max(durable, self._announced.get(route.name, 0))
        self._hub.signal_job(route.name)

    async def wait_field(self, job_id: str, field: str, accepted: set[str], topic: Topic) -> str:
        """Wait until ``field`` of the job's record holds one of ``accepted`` and return it,
        following the job's control channel meanwhile. Woken through ``topic``; reads every
        ``SIGNAL_POLL_S`` in case a message was missed; waits through an outage.
        Cancellation: safe."""
        key = self._conn.keys.job(job_id)
        with self.interest(CONTROL, job_id, topic):
            while True:
                with self._hub.listen(topic) as listener:
                    value = await through_outage(
                        f"job {job_id}: reading {field}",
                        lambda: self._conn.call(self._conn.client.hget(key, field)),
                        on_retry=self.count_retry,
                    )
                    if value in accepted:
                        return str(value)
                    await listener.wait(SIGNAL_POLL_S)
                await trio.sleep(_FLOOR_S)


def _describe(group: BaseExceptionGroup[BaseException]) -> str:
    """The messages of the exceptions in ``group`` (nested groups flattened)."""
    return "; ".join(
        _describe(exc) if isinstance(exc, BaseExceptionGroup) else f"{type(exc).__name__}: {exc}"
        for exc in group.exceptions
    )
