"""The shard-wide work of ``RedisStore``, split between instances: the retention sweep,
the scan for orphans, and claiming and deleting outbox entries.

Each runs shard by shard (``RedisKeyspace``: ``SHARDS`` of them), so no key sees every
instance's housekeeping, and each instance visits only its share of the shards
(``ShardShare``: the instances alive, sorted, deal the shards out in turn), so that a
deployment's housekeeping costs Redis the same whatever its number of instances. An
instance that is not among the instances alive (it has not announced itself yet, or its
announcement lapsed) visits every shard: a shard is never left without a visitor for
longer than an instance's announcement lasts. Within a share, claims keep two visitors
of one shard (a view of the instances alive is a moment old) from doing the same work:

- the sweep takes a batch of expired jobs out of a shard's expiry index in one script
  (``EXPIRY_TAKE``: moved to ``expiry_taken``, claimed by this sweep), so two sweeps never
  take the same job; deletes the batch with two pipelines (the users' indexes first, so
  an index never names a job the sweep deleted, then the jobs' keys and outbox entries);
  and drops the claims last. A sweep that dies mid-batch leaves its claims to lapse
  (``SWEEP_CLAIM_S``): the next sweep takes the batch again (deleting is idempotent).
- the orphan scan claims a shard for a while (``SCAN``: an instance skips a shard
  another is scanning) and reads its lapsed leases in the same script.
- the outbox: a shard's entries are claimed by one script (``CLAIM``); an owner (an
  instance) visits the shards where it wrote or holds entries, and every shard on its
  first claim, when its wait for entries timed out, or ``OUTBOX_FULL_PASS_S`` (on its
  clock) after its last such pass (another instance's lapsed claims are found then).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import attrs
import trio

from backstream.actors.ports import OUTBOX_CLAIM_S
from backstream.actors.signals import SignalHub
from backstream.runtime.stores.redis_client import SAFETY_TTL_S, RedisConnection, ms
from backstream.runtime.stores.redis_keys import SHARDS
from backstream.runtime.stores.redis_steps import SHARD_FIELD, RedisSteps

__all__ = [
    "ORPHAN_BATCH",
    "OUTBOX_FULL_PASS_S",
    "SWEEP_BATCH",
    "SWEEP_CLAIM_S",
    "SWEEP_MAX",
    "RedisHousekeeping",
    "ShardShare",
]

SWEEP_BATCH = 500
"""Expired jobs taken and deleted per script and pipeline."""
SWEEP_MAX = 20_000
"""Expired jobs one ``delete_expired`` call deletes at most (the rest: the next call)."""
SWEEP_CLAIM_S = 60.0
"""How long a sweep's claim on a batch holds: past it, another sweep takes the batch."""
ORPHAN_BATCH = 1000
"""Lapsed leases read per shard and scan."""
OUTBOX_FULL_PASS_S = 5.0
"""Under a steady stream of local entries, every shard is still visited this often."""
_REMEMBERED = 4096
"""Claimed outbox entries whose shard an owner remembers (past it, forgotten: a delete
reads the shard from the job's record, and a claim finds them in a full pass)."""
_OWNERS = 64
"""Owners whose claims a store follows (one per instance; past it, forgotten: each starts
again with a full pass)."""


@attrs.frozen
class ShardShare:
    """The instances alive, sorted by id: the one at rank r of n visits the shards s with
    s mod n = r (past ``SHARDS`` instances, the later ones visit none)."""

    alive: tuple[str, ...] = ()

    @classmethod
    def of(cls, alive: Sequence[object]) -> ShardShare:
        return cls(tuple(sorted({str(instance) for instance in alive})))

    def shards(self, owners: Sequence[str]) -> list[int]:
        """The shards ``owners`` (the instances one store works for) visit between them:
        every shard if one of them is not among the instances alive."""
        if not owners or any(owner not in self.alive for owner in owners):
            return list(range(SHARDS))
        count = len(self.alive)
        ranks = {self.alive.index(owner) for owner in owners}
        return [shard for shard in range(SHARDS) if shard % count in ranks]


@attrs.define
class _Claimer:
    """One owner's outbox claims: the shards to visit, and when it last visited all."""

    dirty: set[int] = attrs.field(factory=set)
    held: dict[str, int] = attrs.field(factory=dict)
    """Entries it claimed and did not delete yet, and their shards (visited again)."""
    fresh: dict[str, tuple[int, str, float]] = attrs.field(factory=dict)
    """Entries this store just wrote claimed by it (a job's end here): their shard, JSON
    and claim's end, handed to its next claim without asking Redis again."""
    full_pass_at: float | None = None

    def hold(self, job_id: str, shard: int) -> None:
        """It claimed ``job_id`` (in ``shard``): held until deleted, and no longer fresh
        (an entry a shard's claim returned is not handed over fresh again)."""
        if len(self.held) >= _REMEMBERED:
            self.held.clear()
        self.held[job_id] = shard
        self.fresh.pop(job_id, None)


class RedisHousekeeping:
    def __init__(self, conn: RedisConnection, steps: RedisSteps, hub: SignalHub) -> None:
        self._conn = conn
        self._keys = conn.keys
        self._steps = steps
        self._hub = hub
        self._cursor = 0
        """Where the next sweep and scan start: instances start apart, and a shard a
        capped sweep did not reach is first next time."""
        self._claimers: dict[str, _Claimer] = {}
        self._share = ShardShare()
        self._unowned: set[int] = set()
        """Shards where this store wrote an entry claimed by nobody (a repaired end)."""
        self._owners: list[str] = []
        """The instances this store announced, newest last (bounded by ``_OWNERS``)."""

    def announced(self, owner: str, alive: Sequence[object]) -> None:
        """``owner`` announced itself through this store; ``alive`` the instances alive then."""
        if owner in self._owners:
            self._owners.remove(owner)
        self._owners = [*self._owners[-(_OWNERS - 1) :], owner]
        self._share = ShardShare.of(alive)

    def withdrew(self, owner: str) -> None:
        if owner in self._owners:
            self._owners.remove(owner)

    async def alive(self, now: float) -> ShardShare:
        """The instances alive at ``now``, read from Redis (one script, on its clock).
        Cancellation: safe (a read)."""
        args = [self._steps.frame.at(now)]
        return ShardShare.of(await self._conn.script("alive", [self._keys.instances()], args))

    def my_shards(self, start: int) -> list[int]:
        """This store's share of the shards, from the first at or after ``start``."""
        mine = self._share.shards(self._owners)
        return [s for s in mine if s >= start] + [s for s in mine if s < start]

    # -- the retention sweep --------------------------------------------------------------

    async def sweep(self, now: float) -> list[str]:
        """Delete the finished jobs whose expiry passed, shard by shard, in batches; return
        their ids. Cancellation: a batch taken but not deleted is taken again by a sweep
        once its claim lapses."""
        deleted: list[str] = []
        start, self._cursor = self._cursor, (self._cursor + 1) % SHARDS
        for shard in self.my_shards(start):
            while len(deleted) < SWEEP_MAX:
                taken = await self._take_expired(shard, now)
                if not taken:
                    break
                deleted += await self._delete_batch(shard, taken, now)
                if len(taken) < SWEEP_BATCH:
                    break
        return deleted

    async def delete_now(self, shard: int, job_id: str, now: float) -> list[str]:
        """Delete one job whose expiry was set to ``now`` (``RedisStore.delete_job``) as a
        sweep deletes a batch, and drop it from the shard's expiry index."""
        deleted = await self._delete_batch(shard, [job_id], now)
        await self._conn.call(self._conn.client.zrem(self._keys.expiry(shard), [job_id]))
        return deleted

    async def _take_expired(self, shard: int, now: float) -> list[str]:
        k, frame = self._keys, self._steps.frame
        limit = min(SWEEP_BATCH, SWEEP_MAX)
        args = [repr(now), frame.at(now), frame.ahead(now + SWEEP_CLAIM_S), str(limit)]
        reply = await self._conn.script("expiry_take", [k.expiry(shard), k.expiry_taken(shard)], args)
        return [str(job_id) for job_id in reply]

    async def _delete_batch(self, shard: int, taken: list[str], now: float) -> list[str]:
        """One pipeline reads the batch's names, one removes them from the users' indexes
        (one command per user and key, whatever the batch holds of them), one deletes the
        jobs' keys and outbox entries and drops the claims."""
        k, client = self._keys, self._conn.client

        async def read() -> list[list[str | None]]:
            async with client.pipeline(transaction=False) as pipe:
                replies = [pipe.hmget(k.job(job_id), _SWEEP_FIELDS) for job_id in taken]
            return [list(await reply) for reply in replies]

        found = [
            _Swept.of(job_id, values)
            for job_id, values in zip(taken, await self._conn.call(read()), strict=True)
        ]
        kept = [job for job in found if job.expires_at is not None and job.expires_at > now]
        gone = [job for job in found if job not in kept]
        by_user: dict[str, list[_Swept]] = {}
        for job in gone:
            if job.user is not None:
                by_user.setdefault(job.user, []).append(job)

        async def unindex() -> None:  # the users' slots first: no index names a deleted job
            async with client.pipeline(transaction=False) as pipe:
                for user, jobs in by_user.items():
                    ids = [job.job_id for job in jobs]
                    pipe.delete([k.msg(user, job.message_id) for job in jobs])
                    pipe.zrem(k.user_index(user), ids)
                    for thread_id in {job.thread_id for job in jobs}:
                        pipe.zrem(
                            k.thread_index(user, thread_id),
                            [j.job_id for j in jobs if j.thread_id == thread_id],
                        )

        async def delete() -> None:
            async with client.pipeline(transaction=False) as pipe:
                ids = [job.job_id for job in gone]
                for job_id in ids:
                    pipe.delete([k.job(job_id), k.log(job_id)])
                if ids:
                    pipe.hdel(k.outbox(shard), ids)
                    pipe.zrem(k.outbox_due(shard), ids)
                    pipe.hdel(k.outbox_claims(shard), ids)
                for job in kept:  # a newer expiry (restarted from scratch): back in the index
                    pipe.zadd(k.expiry(shard), {job.job_id: job.expires_at or now})
                pipe.zrem(k.expiry_taken(shard), list(taken))

        if by_user:
            await self._conn.call(unindex())
            for user, jobs in by_user.items():  # before the records go: released once
                await self._steps.quota.release(user, *(job.job_id for job in jobs))
        await self._conn.call(delete())
        for job in gone:
            self._hub.signal_job(job.job_id)
        return [job.job_id for job in gone]

    # -- orphans ---------------------------------------------------------------------------

    async def lapsed(self, owner: str, now: float, lease_until: float) -> list[tuple[str, int]]:
        """The jobs (and their shards) whose lease lapsed, in ``owner``'s share of the
        shards as the instances alive are now (read first: an instance that withdrew a
        moment ago leaves its share to the others at once), skipping a shard another
        instance is scanning; each shard scanned is claimed for a third of a lease.
        Cancellation: safe (a claim lapses)."""
        frame = self._steps.frame
        share = await self.alive(now)
        hold = max((lease_until - now) / 3, 0.0)
        args = [owner, frame.at(now), frame.ahead(now + hold), str(ORPHAN_BATCH)]
        found: list[tuple[str, int]] = []
        for shard in share.shards([owner]):
            keys = [self._keys.scan(shard), self._keys.running(shard)]
            reply = await self._conn.script("scan", keys, args)
            found += [(str(job_id), shard) for job_id in reply or ()]
        return found

    # -- the outbox ------------------------------------------------------------------------

    def _claimer(self, owner: str) -> _Claimer:
        if owner not in self._claimers and len(self._claimers) >= _OWNERS:
            self._claimers.clear()
        return self._claimers.setdefault(owner, _Claimer())

    def wrote_entry(
        self, shard: int, owner: str, *, job_id: str = "", entry: str = "", until: float = 0.0
    ) -> None:
        """An outbox entry was written in ``shard``, claimed by ``owner`` until ``until``
        ('': by nobody, so the next claim here visits that shard, whoever's share it is
        in, and every owner's next claim passes over its share). Given its ``job_id`` and
        JSON, the owner's next claim takes it as written, while its claim holds."""
        if owner and job_id and entry:
            claimer = self._claimer(owner)
            if len(claimer.fresh) >= _REMEMBERED:
                claimer.dirty.update(shard for shard, _, _ in claimer.fresh.values())
                claimer.fresh.clear()
            claimer.fresh[job_id] = (shard, entry, until)
        elif owner:
            self._claimer(owner).dirty.add(shard)
        else:
            self._unowned.add(shard)
            self.wait_timed_out()

    def wait_timed_out(self) -> None:
        """Every owner's next claim visits every shard (another instance's lapsed claims)."""
        for claimer in self._claimers.values():
            claimer.full_pass_at = None

    async def claim(self, owner: str, now: float, until: float, limit: int) -> list[tuple[str, str]]:
        """Claim up to ``limit`` entries (their job id and JSON): those this store wrote
        claimed by ``owner`` (as written, while their claim holds), then in the shards
        ``owner`` wrote to or holds entries in, and in its share of the shards when a full
        pass is due.
        Cancellation: each shard's claim ran entirely or not at all; an entry claimed but
        not returned is carried out once its claim lapses."""
        claimer = self._claimer(owner)
        held_before = set(claimer.held.values())  # not the shards of what is handed over fresh
        out = self._take_fresh(claimer, now, limit)
        taken = {job_id for job_id, _ in out}
        last = claimer.full_pass_at
        full = last is None or now - last >= OUTBOX_FULL_PASS_S or now < last
        first = sorted(claimer.dirty | held_before | self._unowned)
        self._unowned = set()
        shards = first + ([s for s in self._share.shards([owner]) if s not in first] if full else [])
        claimer.dirty = set()
        frame, k = self._steps.frame, self._keys
        args_head = [frame.at(now), frame.ahead(until)]
        for index, shard in enumerate(shards):
            want = limit - len(out)
            if want <= 0:
                claimer.dirty.update(shards[index:])  # visited next time
                return out
            keys = [k.outbox(shard), k.outbox_due(shard), k.outbox_claims(shard)]
            keys.append(k.outbox_owned(shard, owner))
            args = [*args_head, str(want), owner, str(ms(SAFETY_TTL_S))]
            reply = await self._conn.script("claim", keys, args)
            if len(reply) >= want:
                claimer.dirty.add(shard)  # perhaps more there
            for entry in map(str, reply):
                job_id = str(json.loads(entry)["job_id"])
                if job_id in taken:
                    continue  # handed over fresh by this call already
                taken.add(job_id)
                claimer.hold(job_id, shard)
                out.append((job_id, entry))
        if full:
            claimer.full_pass_at = now
        return out

    def _take_fresh(self, claimer: _Claimer, now: float, limit: int) -> list[tuple[str, str]]:
        """The entries this store wrote claimed by ``claimer`` whose claim holds for half
        a claim's time yet (a later one is claimed again through its shard)."""
        out: list[tuple[str, str]] = []
        for job_id, (shard, entry, until) in list(claimer.fresh.items()):
            if len(out) >= limit:
                break
            if until - now < OUTBOX_CLAIM_S / 2:
                del claimer.fresh[job_id]
                claimer.dirty.add(shard)
                continue
            claimer.hold(job_id, shard)
            out.append((job_id, entry))
        return out

    async def delete_outbox(self, job_ids: Sequence[str]) -> None:
        """Delete entries, shard by shard (one pipeline). Cancellation: some may be
        deleted; the rest are carried out again (idempotent)."""
        by_shard: dict[int, list[str]] = {}
        for job_id in job_ids:
            shard = None
            for claimer in self._claimers.values():
                shard = claimer.held.pop(job_id, shard)
                claimer.fresh.pop(job_id, None)
            if shard is None:
                shard = await self._shard_of(job_id)
            if shard is not None:
                by_shard.setdefault(shard, []).append(job_id)
        k, client = self._keys, self._conn.client

        async def delete() -> None:
            async with client.pipeline(transaction=False) as pipe:
                for shard, ids in by_shard.items():
                    pipe.hdel(k.outbox(shard), ids)
                    pipe.zrem(k.outbox_due(shard), ids)
                    pipe.hdel(k.outbox_claims(shard), ids)

        if by_shard:
            await self._conn.call(delete())
        else:
            await trio.lowlevel.checkpoint()

    async def _shard_of(self, job_id: str) -> int | None:
        raw = await self._conn.call(self._conn.client.hget(self._keys.job(job_id), SHARD_FIELD))
        return None if raw is None else int(raw)


_SWEEP_FIELDS = ["user", "message_id", "thread_id", "expires_at"]


@attrs.frozen
class _Swept:
    """What the sweep reads of a job: the names of its index entries, and its expiry (a
    job with no record has neither: only its keys and claims go)."""

    job_id: str
    user: str | None
    message_id: str
    thread_id: str
    expires_at: float | None

    @classmethod
    def of(cls, job_id: str, values: list[str | None]) -> _Swept:
        user, message_id, thread_id, expires_at = (None if v is None else json.loads(v) for v in values)
        if user is None or message_id is None or thread_id is None:
            return cls(job_id, None, "", "", None)
        return cls(job_id, str(user), str(message_id), str(thread_id), expires_at)
