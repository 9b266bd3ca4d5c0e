"""``RedisSubscriber``: what other instances write reaches this one's waiters.

One pub/sub connection per instance listens on the keyspace's channels and feeds
the store's ``SignalHub``; after an outage it resubscribes and wakes every waiter
(they read again what they may have missed). Waiters never rely on a message
alone: each also polls, with a floor, in case one was missed.

Per-job seam: ``listen_job`` is how a reader of one job's log registers. Today
every commit is announced on one global channel that this instance always
listens to; a per-job channel (``RedisKeyspace.job_channel``, subscribed with
coredis' ``sharded_pubsub`` in a cluster) would be subscribed on the first
listener of a job and unsubscribed after its last, behind this one method.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import coredis.exceptions
import trio

from backstream.actors.ports import NotificationListener
from backstream.actors.signals import Listener, SignalHub, outage_backoff, through_outage
from backstream.protocol.errors import UnavailableError
from backstream.protocol.records import NotificationRecord
from backstream.runtime.stores.redis_client import RedisConnection

__all__ = ["SIGNAL_POLL_S", "WAIT_POLL_S", "RedisSubscriber"]

log = logging.getLogger("backstream.redis")

WAIT_POLL_S = 1.0
"""A missed commit message delays a remote watcher by this at most."""
SIGNAL_POLL_S = 5.0
"""... and an abort or a decision by this."""
_FLOOR_S = 0.01
"""Between two reads of one wait: a storm of wake-ups costs 100 reads/s at most."""


class RedisSubscriber:
    def __init__(self, conn: RedisConnection, hub: SignalHub) -> None:
        self._conn = conn
        self._hub = hub
        self.on_notification: NotificationListener | None = None
        self.outage_retries = 0
        self.subscribed = trio.Event()
        """Set while the pub/sub listener is connected."""

    def count_retry(self, exc: UnavailableError) -> None:
        self.outage_retries += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen for commits, aborts, decisions and notifications from every instance;
        resubscribe after outages. Cancellation: stops listening (waits then rely on polls).

        coredis runs a subscription in a task group of its own, so what ends it (a lost
        connection, a subscription Redis did not acknowledge in time, e.g. while it pauses
        its clients) may come wrapped in an exception group: ``except*`` handles both."""
        task_status.started()
        backoff = outage_backoff()
        while True:
            try:
                channels = self._conn.keys.channels()
                async with self._conn.client.pubsub(
                    channels=channels, ignore_subscribe_messages=True
                ) as pubsub:
                    self.subscribed.set()
                    backoff.reset()
                    self._hub.signal_all()  # anything missed while unsubscribed
                    async for message in pubsub:
                        self._dispatch(str(message["channel"]), str(message["data"]))
            except* (coredis.exceptions.RedisError, OSError) as lost:
                self.outage_retries += 1
                self.subscribed = trio.Event()
                delay = backoff.next_delay()
                log.warning("redis subscription lost (%s); retrying in %.1fs", _describe(lost), delay)
                await trio.sleep(delay)

    def _dispatch(self, channel: str, data: str) -> None:
        kind = channel.rsplit(":", 1)[-1]
        if kind == "commits":
            self._hub.signal_job(data.partition(" ")[0])
        elif kind == "notifications":
            if self.on_notification is not None:
                self.on_notification(NotificationRecord(**json.loads(data)))
        elif kind == "aborts":
            self._hub.signal(("abort", data))
        elif kind == "decisions":
            self._hub.signal(("decision", data))

    @contextmanager
    def listen_job(self, job_id: str) -> Iterator[Listener]:
        """Register for the commits of ``job_id`` for the block (the per-job seam)."""
        with self._hub.listen(("entries", job_id)) as listener:
            yield listener

    async def wait_field(self, job_id: str, field: str, accepted: set[str], topic: tuple[str, str]) -> str:
        """Wait until ``field`` of the job's record holds one of ``accepted`` and return it.
        Woken through ``topic``; reads every ``SIGNAL_POLL_S`` in case a message was missed;
        waits through an outage. Cancellation: safe."""
        key = self._conn.keys.job(job_id)
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
