"""``RedisStore``: jobs shared by many server processes and machines, through Redis (coredis).

Keys are named by ``RedisKeyspace`` (``redis_keys``): per job a record (a hash of
JSON-encoded fields) and a log (a stream with one entry per flush batch, whose id
is the batch's last seq); per user the idempotency keys, the listing indexes and
the running set; and the instance-wide running set (scored by lease expiry: the
cluster-wide capacity count, and where orphans are found), expiry index and outbox.

Every Lua script touches one cluster slot (one job's keys, one user's, or the
instance set's), so jobs and users spread over a Redis Cluster; what spans them
(creating a job, the end of a terminal commit, a hand-over, renewing leases) is a
sequence of such scripts, each idempotent, in the order ``RedisKeyspace`` documents
(``redis_steps``). A commit is planned in Python (``stores.shared.plan_commit``: which
entries are new) against the ``seq`` this process last saw, and the script
applies it only if the stored ``seq`` is still that one and the job is still this
writer's; otherwise it answers with the stored ``seq`` and the commit is planned
again. So a retried commit adds nothing twice, and a log behind the writer (Redis
back from an older snapshot) is reported, never left with a gap. A terminal commit
writes its outbox entry into the job's record in the same script; then frees the
user's and the cluster's slots and indexes the entry. One pub/sub subscriber per instance
(``RedisSubscriber``) wakes local waiters through the store's ``SignalHub``; every
wait also polls, with a floor, in case a message was missed.

Outages: every method but the ``wait_*`` ones raises ``UnavailableError``; the
waits retry with backoff until Redis answers again. Finished jobs' keys also
expire in Redis, an hour after retention, should no sweep ever run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs
import coredis
import trio
from coredis.tokens import PureToken

from backstream.actors.ports import (
    OUTBOX_CLAIM_S,
    Capability,
    Handover,
    JobEndedElsewhereError,
    LogBehindError,
    NotificationListener,
    OutboxEntry,
    Store,
)
from backstream.actors.signals import OUTBOX_BELL, SignalHub, through_outage
from backstream.protocol.errors import UnavailableError
from backstream.protocol.events import LogEvent
from backstream.protocol.lifecycle import LIVE_STATUSES, TERMINAL_STATUSES, is_terminal
from backstream.protocol.records import (
    JobProgress,
    JobRecord,
    SharedCapacity,
    events_from_json,
    events_to_json,
    progress_to_dict,
    request_bytes,
)
from backstream.runtime.stores.redis_client import SAFETY_TTL_S, RedisConnection, ms
from backstream.runtime.stores.redis_keys import RedisKeyspace
from backstream.runtime.stores.redis_notifications import RedisInbox
from backstream.runtime.stores.redis_seats import RedisSeats
from backstream.runtime.stores.redis_steps import (
    OUTBOX_FIELD,
    Finish,
    RedisSteps,
    decode_record,
    encode_fields,
)
from backstream.runtime.stores.redis_subscriber import WAIT_POLL_S, RedisSubscriber
from backstream.runtime.stores.shared import (
    InboxForwarding,
    SeatsForwarding,
    outbox_from_json,
    outbox_to_json,
    plan_commit,
)

__all__ = ["RedisStore", "RedisStoreStatistics"]

_TERMINAL_JSON = json.dumps(sorted(TERMINAL_STATUSES))
_LIVE_JSON = json.dumps(sorted(LIVE_STATUSES))


@attrs.define
class _Writing:
    """A job this process writes: its names (so a commit takes one round trip), its owner
    (the fence) and the ``seq`` its log had at the last commit seen."""

    user: str
    message_id: str
    thread_id: str
    owner: str | None
    stored_seq: int
    request_bytes: int
    """What its request counts against its user's quota (with its log, from its end on)."""


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


class RedisStore(InboxForwarding, SeatsForwarding, Store):
    capabilities = frozenset(
        {
            Capability.SHARED_BETWEEN_PROCESSES,
            Capability.SURVIVES_RESTART,
            Capability.LEASES,
            Capability.SHARED_CAPACITY,
        }
    )

    inbox: RedisInbox

    def __init__(self, url: str, *, prefix: str = "backstream", per_entity_slots: bool = False) -> None:
        """``redis://HOST:PORT/DB`` or ``rediss://...``; ``redis+cluster://HOST:PORT`` (or
        ``rediss+cluster://``) for Redis Cluster through coredis' cluster client.

        ``per_entity_slots``: each job's and each user's keys get a hash tag of their own,
        so that a Redis Cluster spreads them over its shards (``RedisKeyspace``). Off, every
        key shares the prefix's one slot, as in every deployment before it: choose it for a
        new prefix, since data under one layout is not found under the other."""
        self._conn = RedisConnection(url, prefix, per_entity_slots=per_entity_slots)
        self.per_entity_slots = per_entity_slots
        self.cluster = self._conn.cluster
        self.url = self._conn.url
        self.prefix = prefix
        self.keys: RedisKeyspace = self._conn.keys
        self.hub = SignalHub()
        self.subscriber = RedisSubscriber(self._conn, self.hub)
        self.inbox = RedisInbox(self._conn)
        self.seats = RedisSeats(self._conn)
        self._steps = RedisSteps(self._conn)
        self._writing: dict[str, _Writing] = {}
        self._finishing: dict[str, Finish] = {}
        """Terminal commits whose later steps did not land yet: the job's next commit (a
        retry) or this instance's next ``take_orphans`` runs them again. Bounded by the
        jobs this process ends; each goes once its steps land."""
        self._commits_replanned = 0

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
        )

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self, *, on_notification: NotificationListener | None = None) -> None:
        self.subscriber.on_notification = on_notification
        await self._conn.open()

    async def aclose(self) -> None:
        """Close the connections; waits under way raise ``StoreClosedError``.
        Cancellation: they are closed all the same."""
        self.hub.close()
        await self._conn.aclose()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The subscriber (``RedisSubscriber.run``). Cancellation: stops listening."""
        await self.subscriber.run(task_status=task_status)

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
        found, created = await self._steps.create(record, capacity, max_stored_bytes)
        if created:
            self._writing[found.job_id] = _writing_of(found)
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
        pending = self._finishing.get(job_id)
        if pending is not None:  # a retry of a terminal commit whose first step landed
            await self._steps.finish(pending, first=False)
            del self._finishing[job_id]
            return
        writing = self._writing.get(job_id)
        if writing is None:
            record = await self.get_job(job_id)
            if record is None:
                return  # the store no longer holds it (swept, or Redis lost it): watchers get gone
            writing = _writing_of(record)
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
                    continue
                if not plan.entries and not plan.apply_progress:
                    return  # a late retry: the store is ahead of it
                reply = await self._conn.script(
                    "commit",
                    [self.keys.job(job_id), self.keys.log(job_id)],
                    self._commit_args(job_id, writing, plan.entries, progress),
                )
                if int(reply[0]) == 0:  # Redis lost the job (a restart without its data)
                    self._writing.pop(job_id, None)
                    return
                if int(reply[0]) == 3:  # ended, or handed over: another instance has it
                    self._writing.pop(job_id, None)
                    raise JobEndedElsewhereError(job_id)
                if int(reply[0]) == 1:
                    writing.stored_seq = progress.seq
                    if not terminal:
                        self._writing[job_id] = writing
                    else:
                        await self._finish(self._finish_of(job_id, writing, progress, int(reply[1])))
                    return
                self._commits_replanned += 1
                writing.stored_seq = int(reply[1])
            raise UnavailableError(f"{job_id}: its log kept moving under the commit")
        finally:
            if terminal:  # the job's last write here, whether it landed or not
                self._writing.pop(job_id, None)

    async def _finish(self, step: Finish) -> None:
        try:
            await self._steps.finish(step, first=True)
        except BaseException:  # an outage or a cancellation: the retry, or the keeper, ends it
            self._finishing[step.job_id] = step
            raise
        self.hub.ring(OUTBOX_BELL)

    def _finish_of(self, job_id: str, writing: _Writing, progress: JobProgress, logged: int) -> Finish:
        return Finish(
            job_id,
            progress.seq,
            writing.user,
            writing.message_id,
            self._outbox_json(job_id, writing, progress),
            writing.owner or "",
            progress.updated_at + OUTBOX_CLAIM_S if writing.owner else 0.0,
            progress.expires_at or 0.0,
            ms(max((progress.expires_at or 0) - progress.updated_at + SAFETY_TTL_S, 1.0)),
            writing.request_bytes + logged,
        )

    @staticmethod
    def _outbox_json(job_id: str, writing: _Writing, progress: JobProgress) -> str:
        entry = OutboxEntry(job_id, writing.user, writing.thread_id, progress.status, progress.error)
        return outbox_to_json(entry)

    def _commit_args(
        self, job_id: str, writing: _Writing, entries: Sequence[LogEvent], progress: JobProgress
    ) -> list[str]:
        terminal = is_terminal(progress.status)
        fields: dict[str, Any] = dict(progress_to_dict(progress))
        if terminal:
            fields["lease_until"] = None
            fields[OUTBOX_FIELD] = self._outbox_json(job_id, writing, progress)
        ttl_s = (progress.expires_at or 0) - progress.updated_at + SAFETY_TTL_S
        return [
            job_id,
            str(writing.stored_seq),
            str(entries[-1].seq if entries else progress.seq),
            events_to_json(entries) if entries else "",
            "1" if terminal else "0",
            str(ms(max(ttl_s, 1.0))),
            self.keys.job_channel(job_id),
            _TERMINAL_JSON,
            "" if writing.owner is None else json.dumps(writing.owner),
            *encode_fields(fields),
        ]

    async def read(self, job_id: str, after_seq: int, limit: int) -> list[LogEvent]:
        out: list[LogEvent] = []
        start = f"{after_seq + 1}-0"
        while len(out) < limit:
            batch = await self._call(self.redis.xrange(self.keys.log(job_id), start, "+", count=64))
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
        after a commit message or ``WAIT_POLL_S`` (a missed message). Waits through an
        outage. Cancellation: safe."""
        with self.subscriber.listen_job(job_id) as listener:
            seq, status = await through_outage(
                f"job {job_id}: reading its progress",
                lambda: self._call(self.redis.hmget(self.keys.job(job_id), ["seq", "status"])),
                on_retry=self.subscriber.count_retry,
            )
            if seq is None or int(seq) > after_seq or is_terminal(json.loads(status)):
                await trio.lowlevel.checkpoint()
                return
            await listener.wait(WAIT_POLL_S)

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
        k = self.keys
        expired = await self._call(
            self.redis.zrange(k.expiry(), float("-inf"), now, sortby=PureToken.BYSCORE, offset=0, count=1000)
        )
        deleted: list[str] = []
        for job_id in map(str, expired):
            record = await self.get_job(job_id)
            if record is not None:
                if record.expires_at is not None and record.expires_at > now:
                    continue  # a newer expiry (it was restarted from scratch); leave it
                # The user's slot first: an index never names a job the sweep deleted.
                await self._call(self.redis.delete([k.msg(record.user, record.message_id)]))
                await self._call(self.redis.zrem(k.user_index(record.user), [job_id]))
                await self._call(self.redis.zrem(k.thread_index(record.user, record.thread_id), [job_id]))
                await self._steps.quota.release(record.user, job_id)  # once: it holds none after
            await self._call(self.redis.delete([k.job(job_id), k.log(job_id)]))
            await self._call(self.redis.zrem(k.expiry(), [job_id]))
            await self.delete_outbox([job_id])  # undelivered by now: dropped with its job
            deleted.append(job_id)
            self.hub.signal_job(job_id)
        return deleted

    # -- aborts and decisions through any instance ------------------------------------------

    async def request_abort(self, job_id: str) -> None:
        if await self._call(self.redis.exists([self.keys.job(job_id)])):
            await self._call(self.redis.hset(self.keys.job(job_id), {"abort_requested": "true"}))
            await self._call(self.redis.publish(self.keys.channel("aborts"), job_id))

    async def wait_abort_requested(self, job_id: str) -> None:
        """Returns only once the job's ``abort_requested`` flag reads true. Woken by the
        ``aborts`` channel, and reads the flag every ``SIGNAL_POLL_S`` in case a message
        was missed; an outage, however long, is waited through. Cancellation: safe."""
        await self.subscriber.wait_field(job_id, "abort_requested", {"true"}, ("abort", job_id))

    async def send_decision(self, job_id: str, call_id: str, approved: bool) -> None:
        """The first decision on a call stands (``HSETNX``); its ``decisions`` message wakes
        the instance that runs the job. Cancellation: it may or may not be stored."""
        value = "true" if approved else "false"
        await self._call(self.redis.hsetnx(self.keys.job(job_id), f"decision:{call_id}", value))
        await self._call(self.redis.publish(self.keys.channel("decisions"), f"{job_id} {call_id}"))

    async def wait_decision(self, job_id: str, call_id: str) -> bool:
        """Woken by the ``decisions`` channel; reads the decision every ``SIGNAL_POLL_S``
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
        if not job_ids:
            await trio.lowlevel.checkpoint()
            return
        jobs: list[tuple[str, str | None]] = []
        for job_id in job_ids:
            writing = self._writing.get(job_id)
            jobs.append((job_id, writing.user if writing is not None else await self._user_of(job_id)))
        await self._steps.renew(owner, jobs, until)

    async def _user_of(self, job_id: str) -> str | None:
        raw = await self._call(self.redis.hget(self.keys.job(job_id), "user"))
        return None if raw is None else str(json.loads(raw))

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
        candidates = await self._call(
            self.redis.zrange(self.keys.running(), float("-inf"), now, sortby=PureToken.BYSCORE)
        )
        taken: list[Handover] = []
        for job_id in map(str, candidates):
            handover = await self._take_over(job_id, owner, now, lease_until)
            if handover is not None:
                taken.append(handover)
        return taken

    async def _take_over(self, job_id: str, owner: str, now: float, lease_until: float) -> Handover | None:
        record = await self.get_job(job_id)
        if record is not None and record.owner == owner and job_id in self._writing:
            # The caller runs it (this store still writes it): not an orphan, whatever its
            # lease says. A renewal that a frozen Redis held up lands with a lease that may
            # have lapsed since. (A job of the caller's that it gave up writing is one.)
            return None
        args = [repr(now), _LIVE_JSON, json.dumps(owner), json.dumps(lease_until)]
        epoch = int(await self._conn.script("handover", [self.keys.job(job_id)], args))
        if epoch == -1 or record is None:  # gone (or made since the read: next round)
            if epoch == -1:
                await self._call(self.redis.zrem(self.keys.running(), [job_id]))
            return None
        if epoch == -2:
            await self._steps.repair_ended(record)
            return None
        if epoch == 0:
            return None
        await self._steps.follow_lease(job_id, record.user, lease_until, only_existing=False)
        # Read again: the old writer may have committed since the read above, and is
        # fenced off from now on, so this is the job as handed over.
        taken = await self.get_job(job_id)
        if taken is None:
            return None
        entries = await self.read(job_id, 0, taken.seq)
        self._writing[job_id] = _writing_of(taken)
        return Handover(taken, tuple(entries))

    # -- the outbox ------------------------------------------------------------------------

    async def claim_outbox(self, owner: str, now: float, until: float, limit: int) -> list[OutboxEntry]:
        """One script (``CLAIM``): the owner's entries first, then lapsed claims.
        Cancellation: the script ran entirely or not at all."""
        k = self.keys
        keys = [k.outbox(), k.outbox_due(), k.outbox_claims(), k.outbox_owned(owner)]
        args = [repr(now), repr(until), str(limit), owner, str(ms(SAFETY_TTL_S))]
        reply = await self._conn.script("claim", keys, args)
        return [outbox_from_json(str(entry)) for entry in reply]

    async def delete_outbox(self, job_ids: Sequence[str]) -> None:
        """An owner's set of claims keeps a deleted id until its next claim drops it.
        Cancellation: some may be deleted; the rest are carried out again (idempotent)."""
        if not job_ids:
            await trio.lowlevel.checkpoint()
            return
        k, ids = self.keys, list(job_ids)
        await self._call(self.redis.hdel(k.outbox(), ids))
        await self._call(self.redis.zrem(k.outbox_due(), ids))
        await self._call(self.redis.hdel(k.outbox_claims(), ids))

    async def wait_outbox(self, timeout: float) -> None:
        """Woken by this process's terminal commits (their entries start claimed by their
        job's owner, this instance); another instance's lapsed claims are found after
        ``timeout``. Cancellation: safe."""
        await self.hub.wait_bell(OUTBOX_BELL, timeout)



def _writing_of(record: JobRecord) -> _Writing:
    return _Writing(
        record.user,
        record.message_id,
        record.thread_id,
        record.owner,
        record.seq,
        request_bytes(record.request),
    )
