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
    JobEndedElsewhereError,
    LogBehindError,
    NotificationListener,
    OutboxEntry,
    Store,
)
from backstream.actors.signals import OUTBOX_BELL, SignalHub
from backstream.protocol.errors import UnavailableError
from backstream.protocol.events import LogEvent
from backstream.protocol.lifecycle import LIVE_STATUSES, is_terminal
from backstream.protocol.records import (
    JobProgress,
    JobRecord,
    SharedCapacity,
    events_from_json,
    events_to_json,
)
from backstream.runtime.stores.redis_client import RedisConnection, Replication
from backstream.runtime.stores.redis_clock import RedisFrame
from backstream.runtime.stores.redis_groups import ScriptGroups, ScriptGroupsStatistics
from backstream.runtime.stores.redis_housekeeping import RedisHousekeeping
from backstream.runtime.stores.redis_keys import RedisKeyspace
from backstream.runtime.stores.redis_layout import check_layout
from backstream.runtime.stores.redis_notifications import RedisInbox
from backstream.runtime.stores.redis_seats import RedisSeats
from backstream.runtime.stores.redis_steps import (
    Finish,
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
    ANNOUNCE_LIMIT,
    Writing,
    commit_args,
    finish_of,
    shard_in,
    writing_of,
)
from backstream.runtime.stores.shared import (
    InboxForwarding,
    SeatsForwarding,
    outbox_from_json,
    plan_commit,
)

__all__ = ["REMOTE_OUTAGE_S", "RedisStore", "RedisStoreStatistics"]

_LIVE_JSON = json.dumps(sorted(LIVE_STATUSES))
_PAGE = 64
"""Stream entries per ``XRANGE`` of ``read``."""
_FENCED_KEPT = 10_000
"""Fenced-off jobs remembered (``RedisStore._fenced``)."""


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
        self.subscriber.on_watched = self._watched
        self.inbox = RedisInbox(self._conn, self.frame)
        self.seats = RedisSeats(self._conn)
        self._steps = RedisSteps(self._conn, self.frame)
        self._commit_groups = ScriptGroups(self._conn)
        self._housekeeping = RedisHousekeeping(self._conn, self._steps, self.hub)
        self._writing: dict[str, Writing] = {}
        self._fenced: dict[str, None] = {}
        """Jobs whose writer here was fenced off (another owner holds them, or they ended):
        a later commit of theirs is refused before it reads the record, which names the new
        owner. At most ``_FENCED_KEPT``, the oldest forgotten (its writer stopped long ago);
        a job this instance takes over again is written again."""
        self._finishing: dict[str, Finish] = {}
        """Terminal commits whose later steps did not land yet: the job's next commit (a
        retry) or this instance's next ``take_orphans`` runs them again. Bounded by the
        jobs this process ends; each goes once its steps land."""
        self._unreplicated: dict[str, Finish] = {}
        """Terminal commits that landed but that the replicas ``replication`` asks for did not
        acknowledge in time: not done until they do (the job's own retry, alone, settles
        them). Bounded by the jobs this process ends; one whose lease lapsed is dropped
        when it is taken over."""
        self._commits_replanned = 0
        self._commits_announced = 0
        self._entries_announced = 0

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
            jobs_writing=len(self._writing),
            readers_waiting=self.hub.waiting("entries"),
            signal_waiters=self.hub.waiting("abort") + self.hub.waiting("decision"),
            commits_replanned=self._commits_replanned,
            outage_retries=self.subscriber.outage_retries,
            endings_unfinished=len(self._finishing),
            commits_announced=self._commits_announced,
            entries_announced=self._entries_announced,
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
            self._writing[found.job_id] = writing_of(found, shard)
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
        (``RedisSteps.finish``). Cancellation: the job's script ran entirely or not at
        all; commit again (a terminal commit's later steps are run again)."""
        if await self._end_landed_before(job_id):
            return
        if job_id in self._fenced:
            raise JobEndedElsewhereError(job_id)
        writing = self._writing.get(job_id)
        if writing is None:
            writing = await self._read_writing(job_id)
            if writing is None:
                return  # the store no longer holds it (swept, or Redis lost it): watchers get gone
        terminal = is_terminal(progress.status)
        try:
            for attempt in range(3):
                try:
                    plan = plan_commit(job_id, entries, progress, writing.stored_seq)
                except LogBehindError:
                    if attempt > 0:
                        raise  # planned against the seq Redis holds: the log is really behind
                    stored = await self._call(self.redis.hget(self.keys.job(job_id), "seq"))
                    if stored is None:
                        return
                    writing.stored_seq = int(stored)  # this process's view may be stale
                    writing.written = {}
                    continue
                replicated = self._conn.replication.applies(terminal)
                if not plan.entries and not plan.apply_progress:
                    if replicated:  # it landed, but its replicas may not have answered
                        await self._conn.confirm_replicated(self.keys.job(job_id))
                    return  # a late retry: the store is ahead of it
                reply = await self._commit_groups.script(
                    "commit",
                    [self.keys.job(job_id), self.keys.log(job_id)],
                    commit_args(self.keys, job_id, writing, plan.entries, progress),
                )
                if int(reply[0]) == 0:  # Redis lost the job (a restart without its data)
                    self._writing.pop(job_id, None)
                    return
                if int(reply[0]) == 3:  # ended, or handed over: another instance has it
                    self._writing.pop(job_id, None)
                    self._fenced[job_id] = None
                    if len(self._fenced) > _FENCED_KEPT:
                        del self._fenced[next(iter(self._fenced))]
                    raise JobEndedElsewhereError(job_id)
                if int(reply[0]) == 1:
                    await self._landed(job_id, writing, progress, reply, replicated=replicated)
                    return
                self._commits_replanned += 1
                writing.stored_seq = int(reply[1])
                writing.written = {}  # the record is not where this writer left it
            raise UnavailableError(f"{job_id}: its log kept moving under the commit")
        finally:
            if terminal:  # the job's last write here, whether it landed or not
                self._writing.pop(job_id, None)

    async def _end_landed_before(self, job_id: str) -> bool:
        """A retry of a terminal commit that landed: settle what is left of it (its
        replicas' answer, or its later steps). False if there is none."""
        if await self._end_unreplicated(job_id):  # it landed unreplicated
            return True
        pending = self._finishing.get(job_id)
        if pending is None:
            return False
        await self._steps.finish(pending, first=False)  # its first step landed
        del self._finishing[job_id]
        return True

    async def _landed(
        self, job_id: str, writing: Writing, progress: JobProgress, reply: Any, *, replicated: bool
    ) -> None:
        """The commit script applied: note it, then wait for the replicas if asked, and for
        a terminal commit run its later steps."""
        writing.stored_seq = progress.seq
        writing.written = writing.writing
        self._announced(writing, int(reply[1]))
        if not is_terminal(progress.status):
            self._writing[job_id] = writing
            if replicated:
                await self._conn.confirm_replicated(self.keys.job(job_id))
            self.hub.signal_job(job_id)  # waiters here need no round trip
            return
        step = finish_of(job_id, writing, progress, int(reply[2]))
        if replicated:
            await self._confirm(step)
        await self._finish(step)

    async def _confirm(self, step: Finish) -> None:
        """The replicas hold the job's end, or it waits in ``_unreplicated`` for the commit's
        retry, its later steps not yet run."""
        try:
            await self._conn.confirm_replicated(self.keys.job(step.job_id))
        except BaseException:
            self._unreplicated[step.job_id] = step
            raise

    async def _end_unreplicated(self, job_id: str) -> bool:
        """True once the replicas hold the job's landed end and its later steps ran; False
        if none waits, or if it is no longer there (a failover lost it: the commit is
        planned again, against the new primary)."""
        step = self._unreplicated.pop(job_id, None)
        if step is None:
            return False
        await self._confirm(step)
        try:
            seq, status = await self._call(self.redis.hmget(self.keys.job(job_id), ["seq", "status"]))
        except BaseException:
            self._unreplicated[job_id] = step
            raise
        if seq is None or int(seq) != step.seq or not is_terminal(json.loads(status)):
            return False
        await self._finish(step)
        return True

    async def _finish(self, step: Finish) -> None:
        try:
            await self._steps.finish(step, first=True)
        except BaseException:  # an outage or a cancellation: the retry, or the keeper, ends it
            self._finishing[step.job_id] = step
            raise
        self._housekeeping.wrote_entry(step.shard, step.owner)
        self.hub.ring(OUTBOX_BELL)
        self.hub.signal_job(step.job_id)

    announces_uncommitted = True

    async def announce_entries(self, job_id: str, entries: Sequence[LogEvent]) -> None:
        """An ``SPUBLISH`` on the job's channel, with the next commit group: the writer's
        epoch, the seq the log is durable through, and ``entries``; only while a follower
        is known (as commits are announced), and only up to ``ANNOUNCE_LIMIT`` bytes (past
        it the followers get them with the commit). Cancellation: sent or not."""
        writing = self._writing.get(job_id)
        if writing is None or not writing.announce or not entries:
            await trio.lowlevel.checkpoint()
            return
        payload = events_to_json(entries)
        if len(payload) > ANNOUNCE_LIMIT:
            await trio.lowlevel.checkpoint()
            return
        message = f"{job_id}@{writing.epoch} {writing.stored_seq} {payload}"
        receivers = await self._commit_groups.publish(self.keys.job_channel(job_id), message)
        writing.announced_seq = max(writing.announced_seq, entries[-1].seq)
        self._entries_announced += 1
        if receivers == 0:
            writing.announce = False

    def _announced(self, writing: Writing, receivers: int) -> None:
        """A commit landed; ``receivers``: how many instances its announcement reached
        (-1: not announced). Nobody: stop announcing until a follower asks."""
        if receivers >= 0:
            self._commits_announced += 1
        if receivers == 0:
            writing.announce = False

    def _watched(self, job_id: str) -> None:
        """A follower asked for the job's commits (``watch`` on its control channel)."""
        writing = self._writing.get(job_id)
        if writing is not None:
            writing.announce = True

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
            writing = self._writing.get(job_id) or await self._read_writing(job_id)
            if writing is not None:
                jobs.append((job_id, writing.user, writing.shard))
        await self._steps.renew(owner, jobs, until, handoff=handoff)

    async def announce(self, owner: str, until: float) -> None:
        """One script on the instances key, on Redis's clock. Cancellation: announced or not."""
        await self._conn.script("announce", [self.keys.instances()], [owner, self._steps.frame.ahead(until)])

    async def withdraw(self, owner: str) -> None:
        await self._call(self.redis.zrem(self.keys.instances(), [owner]))

    async def others_alive(self, owner: str, now: float) -> bool:
        """Cancellation: nothing changes."""
        args = [owner, self._steps.frame.at(now)]
        return int(await self._conn.script("others_alive", [self.keys.instances()], args)) > 0

    async def _read_writing(self, job_id: str) -> Writing | None:
        """What a commit or a renewal needs of a job this process does not write yet."""
        raw = await self._call(self.redis.hgetall(self.keys.job(job_id)))
        record = decode_record(raw)
        return None if record is None else writing_of(record, shard_in(raw, job_id))

    async def take_orphans(self, owner: str, now: float, lease_until: float) -> list[Handover]:
        """The running set lists lapsed leases; each job is taken in its slot by one script
        (``HANDOVER``), then its running entries follow the new lease; the entries are read
        after it. A listed job that ended (its terminal commit stopped after its first
        step) is finished here; one that is gone is dropped from the set. Cancellation:
        each job is taken atomically or not at all; one taken but not returned is an
        orphan again once ``lease_until`` passes."""
        for job_id, step in list(self._finishing.items()):
            await self._steps.finish(step, first=False)
            del self._finishing[job_id]
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
        if record is not None and record.owner == owner and job_id in self._writing:
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
            self._unreplicated.pop(job_id, None)
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
        self._writing[job_id] = writing_of(taken, shard)
        self._fenced.pop(job_id, None)
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
