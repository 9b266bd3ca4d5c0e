"""``RedisStore``: jobs shared by many server processes and machines, through Redis (coredis).

Keys are named by ``RedisKeyspace`` (``redis_keys``): per job a record (a hash of
JSON-encoded fields) and a log (a stream with one entry per flush batch, whose id
is the batch's last seq); per user the idempotency keys, the listing indexes and
the running set; and per shard (``SHARDS``) a running set (scored by lease end on
Redis's clock: the shard's share of the cluster-wide capacity count, and where
orphans are found), an expiry index and an outbox. A prefix's key layout is checked
when the store opens (``redis_layout``).

Every Lua script touches one cluster slot (one job's keys, one user's, or one
shard's), so jobs, users and shards spread over a Redis Cluster; what spans them
(creating a job, the end of a terminal commit, a hand-over, renewing leases) is a
sequence of such scripts, each idempotent, in the order ``RedisKeyspace`` documents
(``redis_steps``). A commit is planned in Python (``stores.shared.plan_commit``: which
entries are new) against the ``seq`` this process last saw, and the script
applies it only if the stored ``seq`` is still that one and the job is still this
writer's; otherwise it answers with the stored ``seq`` and the commit is planned
again. So a retried commit adds nothing twice, and a log behind the writer (Redis
back from an older snapshot) is reported, never left with a gap. A terminal commit
writes its outbox entry into the job's record in the same script; then frees the
user's and the cluster's slots and indexes the entry. Sweeping, scanning for orphans
and claiming the outbox go shard by shard, split between instances
(``redis_housekeeping``). Nothing is broadcast: a commit, and between commits the
entries not yet committed (``announce_entries``: a job commits every ``commit_ms`` and
announces every ``flush_ms``), are announced on its job's sharded channel, and only
while the writer knows of a follower (an instance that follows the job asks with
``watch`` on the job's control channel; a commit that reached nobody stops the
announcements); aborts and decisions go on the
control channel, which only the job's runner follows; notifications on the user's
channel, followed by the instances that hold a connection of the user. One subscriber
per instance (``RedisSubscriber``) follows what this instance's waiters are interested
in and wakes them through the store's ``SignalHub``; every wait also polls, with a
floor, in case a message was missed.

Outages: every method but the ``wait_*`` ones raises ``UnavailableError``; the
waits retry with backoff until Redis answers again, but ``wait_for_entries`` (a
remote watcher's) gives up after ``REMOTE_OUTAGE_S``. Finished jobs' keys also
expire in Redis, an hour after retention, should no sweep ever run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import attrs
import coredis
import trio

from backstream.actors.ports import (
    Capability,
    EntriesListener,
    Handover,
    NotificationListener,
    OutboxEntry,
    Store,
)
from backstream.actors.signals import OUTBOX_BELL, SignalHub
from backstream.protocol.events import LogEvent
from backstream.protocol.lifecycle import LIVE_STATUSES, is_terminal
from backstream.protocol.records import (
    JobProgress,
    JobRecord,
    SharedCapacity,
    events_from_json,
)
from backstream.runtime.stores.redis_client import RedisConnection, Replication
from backstream.runtime.stores.redis_clock import RedisFrame
from backstream.runtime.stores.redis_commits import RedisWriters
from backstream.runtime.stores.redis_groups import ScriptGroups, ScriptGroupsStatistics
from backstream.runtime.stores.redis_housekeeping import RedisHousekeeping
from backstream.runtime.stores.redis_keys import RedisKeyspace
from backstream.runtime.stores.redis_layout import check_layout
from backstream.runtime.stores.redis_notifications import RedisInbox
from backstream.runtime.stores.redis_seats import RedisSeats
from backstream.runtime.stores.redis_steps import (
    RedisSteps,
    decode_record,
)
from backstream.runtime.stores.redis_subscriber import (
    COMMITS,
    REMOTE_OUTAGE_S,
    USER,
    RedisSubscriber,
    RedisSubscriberStatistics,
)
from backstream.runtime.stores.redis_webhooks import RedisWebhookQueue
from backstream.runtime.stores.redis_writing import (
    shard_in,
    writing_of,
)
from backstream.runtime.stores.shared import (
    InboxForwarding,
    SeatsForwarding,
    outbox_from_json,
)

__all__ = ["REMOTE_OUTAGE_S", "RedisStore", "RedisStoreStatistics"]

_LIVE_JSON = json.dumps(sorted(LIVE_STATUSES))
_PAGE = 64
"""Stream entries per ``XRANGE`` of ``read``."""


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
    endings_unfinished: int
    """Terminal commits that landed whose later steps (freeing the slots, indexing the
    outbox entry) wait for the job's next commit or this instance's next ``take_orphans``."""
    commits_announced: int
    """Commits announced on their job's channel (the others had no follower, or brought
    followers nothing an announcement had not)."""
    entries_announced: int
    """Announcements of entries before their commit (``announce_entries``)."""
    subscriber: RedisSubscriberStatistics
    commit_groups: ScriptGroupsStatistics
    """Commits sent together (``redis_groups``)."""


class RedisStore(InboxForwarding, SeatsForwarding, RedisWebhookQueue, Store):
    capabilities = frozenset(
        {
            Capability.SHARED_BETWEEN_PROCESSES,
            Capability.SURVIVES_RESTART,
            Capability.LEASES,
            Capability.SHARED_CAPACITY,
        }
    )

    inbox: RedisInbox

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "backstream",
        frame: RedisFrame | None = None,
        replication: Replication | None = None,
    ) -> None:
        """``redis://HOST:PORT/DB`` or ``rediss://...``; ``redis+cluster://HOST:PORT`` (or
        ``rediss+cluster://``) for Redis Cluster through coredis' cluster client;
        ``redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`` (or ``rediss+sentinel://``)
        for the primary a Sentinel group names (``redis_urls``). Raises ``ValueError`` for
        any other URL. Each job's, user's and shard's keys have a hash tag of their own
        (``RedisKeyspace``); ``open`` refuses a prefix that holds an earlier layout's data.

        ``frame``: how the times this store is given map to Redis's clock (``RedisFrame``);
        by default its own, anchored at its first call. Stores that are given times of one
        clock may share one (tests that stand for several instances with synthetic times).

        ``replication``: a terminal commit (and, if asked, every commit) returns once that
        many replicas hold it (``Replication``, ``WAIT``)."""
        self._conn = RedisConnection(url, prefix, replication=replication)
        self.cluster = self._conn.cluster
        self.url = self._conn.url
        self.prefix = prefix
        self.keys: RedisKeyspace = self._conn.keys
        self.hub = SignalHub()
        self.subscriber = RedisSubscriber(self._conn, self.hub)
        self.frame = frame or RedisFrame()
        self.inbox = RedisInbox(self._conn, self.frame)
        self.seats = RedisSeats(self._conn)
        self._steps = RedisSteps(self._conn, self.frame)
        self._commit_groups = ScriptGroups(self._conn)
        self._housekeeping = RedisHousekeeping(self._conn, self._steps, self.hub)
        self._writers = RedisWriters(
            self._conn, self._steps, self._commit_groups, self._housekeeping, self.hub
        )
        self.subscriber.on_watched = self._writers.watched

    @property
    def subscribed(self) -> trio.Event:
        """Set while the pub/sub listener is connected."""
        return self.subscriber.subscribed

    @property
    def _redis(self) -> coredis.Redis[str] | coredis.RedisCluster[str] | None:
        return None if self._conn.closed else self._conn.client

    @property
    def redis(self) -> coredis.Redis[str] | coredis.RedisCluster[str]:
        return self._conn.client

    def statistics(self) -> RedisStoreStatistics:
        return RedisStoreStatistics(
            subscribed=self.subscribed.is_set(),
            jobs_writing=len(self._writers.writing),
            readers_waiting=self.hub.waiting("entries"),
            signal_waiters=self.hub.waiting("abort") + self.hub.waiting("decision"),
            commits_replanned=self._writers.commits_replanned,
            outage_retries=self.subscriber.outage_retries,
            endings_unfinished=len(self._writers.finishing),
            commits_announced=self._writers.commits_announced,
            entries_announced=self._writers.entries_announced,
            subscriber=self.subscriber.statistics(),
            commit_groups=self._commit_groups.statistics(),
        )

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self, *, on_notification: NotificationListener | None = None) -> None:
        """Connect, then check the prefix's key layout (``StoreLayoutError``: the prefix
        holds an earlier layout's data). Cancellation: nothing stays open."""
        self.subscriber.on_notification = on_notification
        await self._conn.open()
        try:
            await check_layout(self._conn)
        except BaseException:
            await self._conn.aclose()
            raise

    async def aclose(self) -> None:
        """Close the connections; waits under way raise ``StoreClosedError``.
        Cancellation: they are closed all the same."""
        self.hub.close()
        await self._conn.aclose()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The subscriber (``RedisSubscriber.run``) and the sender of grouped commits
        (``ScriptGroups``). Cancellation: stops listening; commits waiting for a group
        get ``StoreClosedError``."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._commit_groups.run)
            await self.subscriber.run(task_status=task_status)
            nursery.cancel_scope.cancel()

    async def _call(self, coro: Any) -> Any:
        return await self._conn.call(coro)

    async def ping(self) -> None:
        await self._call(self.redis.ping())

    # -- jobs ---------------------------------------------------------------------------

    async def create_job(
        self,
        record: JobRecord,
        capacity: SharedCapacity | None = None,
        *,
        max_stored_bytes: int | None = None,
    ) -> tuple[JobRecord, bool]:
        """Three one-slot steps (``RedisSteps.create``). Cancellation: the job may or may
        not exist; creating it again finds it, or finishes making it."""
        found, created, shard = await self._steps.create(record, capacity, max_stored_bytes)
        if created:
            self._writers.adopt(found.job_id, writing_of(found, shard))
        return found, created

    async def get_job(self, job_id: str) -> JobRecord | None:
        return await self._steps.read_record(job_id)

    async def stored_bytes(self, user: str) -> int:
        return await self._steps.quota.stored_bytes(user)

    async def find_job(self, user: str, message_id: str) -> JobRecord | None:
        job_id = await self._call(self.redis.get(self.keys.msg(user, message_id)))
        return await self.get_job(str(job_id)) if job_id else None

    async def commit(self, job_id: str, entries: Sequence[LogEvent], progress: JobProgress) -> None:
        """One script call in the job's slot, two if the log was not where this process
        last saw it; a terminal commit then frees the user's and the cluster's slots
        (``RedisWriters.commit``). Cancellation: the job's script ran entirely or not at
        all; commit again (a terminal commit's later steps are run again)."""
        await self._writers.commit(job_id, entries, progress)

    announces_uncommitted = True

    async def announce_entries(self, job_id: str, entries: Sequence[LogEvent]) -> None:
        """One ``SPUBLISH`` with the next commit group, while the job has a follower
        (``RedisWriters.announce_entries``). Cancellation: sent or not."""
        await self._writers.announce_entries(job_id, entries)

    async def read(self, job_id: str, after_seq: int, limit: int) -> list[LogEvent]:
        """One ``XRANGE`` per 64 stream entries (flush batches); a short page is the end.
        Cancellation: safe (a read)."""
        out: list[LogEvent] = []
        start = f"{after_seq + 1}-0"
        while len(out) < limit:
            batch = await self._call(self.redis.xrange(self.keys.log(job_id), start, "+", count=_PAGE))
            if not batch:
                break
            for entry in batch:
                for event in events_from_json(entry.field_values["e"]):
                    # Keep each seq once (logs written before commits were checked against
                    # the stored seq may repeat entries after a retry).
                    if event.seq > after_seq and (not out or event.seq > out[-1].seq):
                        out.append(event)
            if len(batch) < _PAGE:
                break
            last_seq = int(str(batch[-1].identifier).split("-", 1)[0])
            start = f"{last_seq + 1}-0"
        return out[:limit]

    async def wait_for_entries(self, job_id: str, after_seq: int) -> None:
        """Returns when the record goes past ``after_seq``, ends, or is gone; otherwise
        after a commit message or ``WAIT_POLL_S`` (a missed message), following the job's
        channel meanwhile (``RedisSubscriber.wait_for_entries``). Waits through an
        outage of up to ``REMOTE_OUTAGE_S``, then raises ``UnavailableError``.
        Cancellation: safe."""
        await self.subscriber.wait_for_entries(job_id, after_seq)

    def follow_job(
        self, job_id: str, on_entries: EntriesListener | None = None
    ) -> AbstractContextManager[None]:
        """Subscribe to the job's channel for the block (once per job however many
        follow it), and ask its writer to announce its commits; ``on_entries`` gets the
        entries each announcement carries."""
        return self.subscriber.interest(COMMITS, job_id, ("entries", job_id), on_entries)

    def notifications_of(self, user: str) -> AbstractContextManager[None]:
        """Subscribe to the user's channel for the block (once per user)."""
        return self.subscriber.interest(USER, user)

    async def list_jobs(
        self,
        user: str,
        *,
        thread_id: str | None = None,
        statuses: frozenset[str] | None = None,
        limit: int = 50,
    ) -> list[JobRecord]:
        k = self.keys
        index = k.thread_index(user, thread_id) if thread_id is not None else k.user_index(user)
        out: list[JobRecord] = []
        offset, page = 0, max(limit * 2, 50)
        while len(out) < limit and offset < 5000:
            ids = await self._call(self.redis.zrange(index, offset, offset + page - 1, rev=True))
            if not ids:
                break
            offset += page
            async with self.redis.pipeline(transaction=False) as pipe:
                replies = [pipe.hgetall(k.job(str(job_id))) for job_id in ids]
            for reply in replies:
                record = decode_record(await reply)
                if record is None or (statuses is not None and record.status not in statuses):
                    continue
                out.append(record)
                if len(out) >= limit:
                    break
        return out

    async def delete_expired(self, now: float) -> list[str]:
        """Shard by shard, in batches that no other instance's sweep takes too
        (``RedisHousekeeping.sweep``). Cancellation: a batch taken but not deleted is taken
        again once its claim lapses."""
        return await self._housekeeping.sweep(now)

    async def delete_job(self, job_id: str) -> bool:
        """The sweep's deletion of one job, its expiry set to now: the same steps, in the
        same order. Cancellation: the job may be gone already, or not; again is safe."""
        raw = await self._call(self.redis.hgetall(self.keys.job(job_id)))
        record = decode_record(raw)
        if record is None or not is_terminal(record.status):
            return False
        now = record.finished_at or record.updated_at
        await self._call(self.redis.hset(self.keys.job(job_id), {"expires_at": json.dumps(now)}))
        return bool(await self._housekeeping.delete_now(shard_in(raw, job_id), job_id, now))

    # -- aborts and decisions through any instance ------------------------------------------

    async def request_abort(self, job_id: str) -> None:
        """Sets the job's flag, then tells its runner on the job's control channel (only
        the runner follows it). Cancellation: the flag may or may not be set."""
        if await self._call(self.redis.exists([self.keys.job(job_id)])):
            await self._call(self.redis.hset(self.keys.job(job_id), {"abort_requested": "true"}))
            await self._call(self.redis.spublish(self.keys.control_channel(job_id), "abort"))

    async def wait_abort_requested(self, job_id: str) -> None:
        """Returns only once the job's ``abort_requested`` flag reads true. Follows the
        job's control channel meanwhile, and reads the flag every ``SIGNAL_POLL_S`` in case
        a message was missed; an outage, however long, is waited through. Cancellation: safe."""
        await self.subscriber.wait_field(job_id, "abort_requested", {"true"}, ("abort", job_id))

    async def send_decision(self, job_id: str, call_id: str, approved: bool) -> None:
        """The first decision on a call stands (``HSETNX``); its message on the job's
        control channel wakes the instance that runs the job. Cancellation: it may or may
        not be stored."""
        value = "true" if approved else "false"
        await self._call(self.redis.hsetnx(self.keys.job(job_id), f"decision:{call_id}", value))
        await self._call(self.redis.spublish(self.keys.control_channel(job_id), f"decision {call_id}"))

    async def wait_decision(self, job_id: str, call_id: str) -> bool:
        """Follows the job's control channel; reads the decision every ``SIGNAL_POLL_S``
        in case a message was missed; waits through an outage. Cancellation: safe."""
        topic = ("decision", f"{job_id} {call_id}")
        return (
            await self.subscriber.wait_field(job_id, f"decision:{call_id}", {"true", "false"}, topic)
            == "true"
        )

    # -- many instances -----------------------------------------------------------------

    async def renew_leases(self, owner: str, job_ids: Sequence[str], until: float) -> None:
        """Per job, in its slot, then its running entries (``RedisSteps.renew``).
        Cancellation: some may be renewed; the next renewal catches up."""
        await self._renew(owner, job_ids, until, handoff=False)

    async def hand_off(self, owner: str, job_ids: Sequence[str], now: float) -> None:
        """The leases end now and each job counts a hand-off. Cancellation: some may be
        handed off; the others' leases lapse by themselves (counted as crashes)."""
        await self._renew(owner, job_ids, now, handoff=True)

    async def _renew(self, owner: str, job_ids: Sequence[str], until: float, *, handoff: bool) -> None:
        if not job_ids:
            await trio.lowlevel.checkpoint()
            return
        jobs: list[tuple[str, str, int]] = []
        for job_id in job_ids:
            writing = self._writers.writing.get(job_id) or await self._writers.read_writing(job_id)
            if writing is not None:
                jobs.append((job_id, writing.user, writing.shard))
        await self._steps.renew(owner, jobs, until, handoff=handoff)

    async def announce(self, owner: str, until: float) -> None:
        """One script on the instances key, on Redis's clock; what it answers (the
        instances alive) deals out the shards each instance's housekeeping visits.
        Cancellation: announced or not."""
        args = [owner, self._steps.frame.ahead(until)]
        alive = await self._conn.script("announce", [self.keys.instances()], args)
        self._housekeeping.announced(owner, alive)

    async def withdraw(self, owner: str) -> None:
        await self._call(self.redis.zrem(self.keys.instances(), [owner]))
        self._housekeeping.withdrew(owner)

    async def others_alive(self, owner: str, now: float) -> bool:
        """Cancellation: nothing changes."""
        share = await self._housekeeping.alive(now)
        return any(instance != owner for instance in share.alive)

    async def take_orphans(self, owner: str, now: float, lease_until: float) -> list[Handover]:
        """The running set lists lapsed leases; each job is taken in its slot by one script
        (``HANDOVER``), then its running entries follow the new lease; the entries are read
        after it. A listed job that ended (its terminal commit stopped after its first
        step) is finished here; one that is gone is dropped from the set. Cancellation:
        each job is taken atomically or not at all; one taken but not returned is an
        orphan again once ``lease_until`` passes."""
        await self._writers.finish_pending()
        taken: list[Handover] = []
        for job_id, shard in await self._housekeeping.lapsed(owner, now, lease_until):
            handover = await self._take_over(job_id, shard, owner, now, lease_until)
            if handover is not None:
                taken.append(handover)
        return taken

    async def _take_over(
        self, job_id: str, shard: int, owner: str, now: float, lease_until: float
    ) -> Handover | None:
        raw = await self._call(self.redis.hgetall(self.keys.job(job_id)))
        record = decode_record(raw)
        if record is not None and shard_in(raw, job_id) != shard:
            # An entry a create's retry left in another shard than the record names.
            await self._call(self.redis.zrem(self.keys.running(shard), [job_id]))
            return None
        if record is not None and record.owner == owner and job_id in self._writers.writing:
            # The caller runs it (this store still writes it): not an orphan, whatever its
            # lease says. A renewal that a frozen Redis held up lands with a lease that may
            # have lapsed since. (A job of the caller's that it gave up writing is one.)
            return None
        frame = self._steps.frame
        args = [frame.ahead(now), _LIVE_JSON, json.dumps(owner), json.dumps(lease_until)]
        args.append(frame.ahead(lease_until))
        reply = await self._conn.script("handover", [self.keys.job(job_id)], args)
        epoch = int(reply[0])
        if epoch not in (-1, 0):  # its lease lapsed: its ending is this call's now
            self._writers.lapsed(job_id)
        if epoch == -1 or record is None:  # gone (or made since the read: next round)
            if epoch == -1:
                await self._call(self.redis.zrem(self.keys.running(shard), [job_id]))
            return None
        if epoch == -2:
            await self._steps.repair_ended(record, shard)
            self._housekeeping.wrote_entry(shard, "")
            return None
        if epoch == 0:
            return None
        await self._steps.follow_lease(job_id, record.user, shard, str(reply[1]), only_existing=False)
        # Read again: the old writer may have committed since the read above, and is
        # fenced off from now on, so this is the job as handed over.
        taken = await self.get_job(job_id)
        if taken is None:
            return None
        entries = await self.read(job_id, 0, taken.seq)
        self._writers.adopt(job_id, writing_of(taken, shard))
        return Handover(taken, tuple(entries))

    # -- the outbox ------------------------------------------------------------------------

    async def claim_outbox(self, owner: str, now: float, until: float, limit: int) -> list[OutboxEntry]:
        """One script per shard visited (``CLAIM``: the owner's entries first, then lapsed
        claims; ``RedisHousekeeping.claim`` says which shards). Cancellation: each shard's
        script ran entirely or not at all."""
        claimed = await self._housekeeping.claim(owner, now, until, limit)
        return [outbox_from_json(entry) for _, entry in claimed]

    async def delete_outbox(self, job_ids: Sequence[str]) -> None:
        """An owner's set of claims keeps a deleted id until its next claim drops it.
        Cancellation: some may be deleted; the rest are carried out again (idempotent)."""
        await self._housekeeping.delete_outbox(list(job_ids))

    async def wait_outbox(self, timeout: float) -> None:
        """Woken by this process's terminal commits (their entries start claimed by their
        job's owner, this instance); after ``timeout`` the next claim visits every shard
        (another instance's lapsed claims). Cancellation: safe."""
        started = trio.current_time()
        await self.hub.wait_bell(OUTBOX_BELL, timeout)
        if trio.current_time() - started >= timeout:
            self._housekeeping.wait_timed_out()
