"""The writes of ``RedisStore`` that span entities (a user, a job, the instance set), as
a sequence of one-slot Lua scripts: creating a job (and the cluster-wide capacity count,
split over the shards), the steps after a terminal commit, renewing leases and what
follows a hand-over.

Each step is idempotent and the order is the one ``RedisKeyspace``'s docstring gives,
with what a crash between two steps leaves and who repairs it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import attrs
from coredis.tokens import PureToken

from backstream.protocol.errors import CapacityError, QuotaExceededError, UnavailableError
from backstream.protocol.records import (
    JobRecord,
    SharedCapacity,
    record_from_dict,
    record_to_dict,
    request_bytes,
)
from backstream.runtime.stores.redis_client import SAFETY_TTL_S, RedisConnection, ms
from backstream.runtime.stores.redis_clock import RedisFrame
from backstream.runtime.stores.redis_keys import SHARDS, shard_budget
from backstream.runtime.stores.redis_quota import RUNNING_LAPSE_S, RedisQuota

__all__ = [
    "LEASE_FIELD",
    "LOG_BYTES_FIELD",
    "OUTBOX_FIELD",
    "SHARD_FIELD",
    "Finish",
    "RedisSteps",
    "decode_record",
    "encode_fields",
]

OUTBOX_FIELD = "outbox"
"""The job record's field that holds the outbox entry its terminal commit wrote (JSON)."""
LEASE_FIELD = "lease_at"
"""The job record's field that holds its lease's end on Redis's clock (the record's
``lease_until`` is the same end as its owner's clock reads it)."""
SHARD_FIELD = "shard"
"""The job record's field that names its shard (where its running, expiry and outbox
entries are)."""
LOG_BYTES_FIELD = "log_bytes"
"""The job record's field that sums the bytes of its log's batches (``COMMIT`` adds them)."""
_HIDDEN = (OUTBOX_FIELD, LEASE_FIELD, SHARD_FIELD, LOG_BYTES_FIELD)


def encode_fields(data: dict[str, Any]) -> list[str]:
    """A record's fields as ``HSET`` arguments: name, JSON value, name, ..."""
    flat: list[str] = []
    for name, value in data.items():
        flat += [name, json.dumps(value, separators=(",", ":"))]
    return flat


def decode_record(raw: dict[str, str]) -> JobRecord | None:
    """The record in a job hash; None without one (never made, swept, or only decisions)."""
    if not raw or "job_id" not in raw:
        return None
    data = {
        name: json.loads(value)
        for name, value in raw.items()
        if not name.startswith("decision:") and name not in _HIDDEN
    }
    return record_from_dict(data)


@attrs.frozen
class Finish:
    """The steps after a terminal commit's first: the user's running entry goes, and the
    outbox entry, the expiry entry and the running entry's removal land in the instance set."""

    job_id: str
    shard: int
    seq: int
    user: str
    message_id: str
    outbox: str
    """The entry's JSON ('' for a job ended before entries were kept with it: none)."""
    owner: str
    """Who claims the entry at first ('': nobody, any dispatcher takes it)."""
    claim_until: float
    """The caller's time (``RedisFrame.ahead`` puts it on Redis's clock)."""
    expires_at: float
    ttl_ms: int
    """How long the idempotency key lives on (the job's other keys got it with the commit)."""
    charge: int
    """What the job counts against its user's quota from its end on: request and log."""


class RedisSteps:
    def __init__(self, conn: RedisConnection, frame: RedisFrame) -> None:
        self._conn = conn
        self._keys = conn.keys
        self.frame = frame
        self.quota = RedisQuota(conn)

    async def create(
        self, record: JobRecord, capacity: SharedCapacity | None, max_stored_bytes: int | None
    ) -> tuple[JobRecord, bool, int]:
        """User slot (the running entry, then the quota's charge), a shard, then the record
        in the job slot (see ``RedisKeyspace``); returns the job, whether this call inserted
        it and (if so) its shard.
        A message id whose job has no record yet (a create that stopped between its steps,
        or one under way) is finished under that job's id: whoever writes the record
        inserted it. Cancellation: the job may or may not exist, or be half made; creating
        it again finishes it."""
        k = self._keys
        user_keys = [
            k.msg(record.user, record.message_id),
            k.user_index(record.user),
            k.thread_index(record.user, record.thread_id),
            k.user_running(record.user),
        ]
        for _ in range(3):
            job_id = record.job_id
            limits = ["", "", ""]
            if capacity is not None:
                now, until = self.frame.at(capacity.now), self.frame.ahead(capacity.lease_until)
                limits = [now, str(capacity.max_jobs_per_user), until]
            taken = str(
                await self._conn.script("create_user", user_keys, [job_id, repr(record.created_at), *limits])
            )
            if taken == "!user":
                raise CapacityError("you reached the limit of running jobs", retry_after_ms=1000)
            if taken:  # the message id names another job
                found = await self.read_record(taken)
                if found is not None:
                    return found, False, -1
                record = attrs.evolve(record, job_id=taken)
                continue
            await self._charge(record, capacity, max_stored_bytes, user_keys)
            hidden = [SHARD_FIELD, str(k.home_shard(job_id))]
            if capacity is not None:
                reserved = await self._reserve(job_id, capacity)
                if reserved is None:
                    await self._conn.script("create_undo", user_keys, [job_id])
                    await self.quota.release(record.user, job_id)
                    raise CapacityError("the cluster reached the limit of running jobs", retry_after_ms=1000)
                hidden = [SHARD_FIELD, str(reserved[0]), LEASE_FIELD, reserved[1]]
            fields = encode_fields(record_to_dict(record)) + hidden
            if await self._conn.script("create_job", [k.job(job_id)], fields):
                return record, True, int(hidden[1])
            found = await self.read_record(job_id)  # a create racing this one wrote it
            return (found if found is not None else record), False, -1
        raise UnavailableError(f"{record.message_id}: its job kept changing under the create")

    async def _charge(
        self, record: JobRecord, capacity: SharedCapacity | None, limit: int | None, user_keys: list[str]
    ) -> None:
        """The request's bytes, checked against the user's quota and charged (the user
        slot's second step); a refusal undoes the first. Cancellation: charged or not."""
        now = capacity.now if capacity is not None else record.created_at
        try:
            await self.quota.charge(
                record.user,
                record.job_id,
                request_bytes(record.request),
                limit,
                now=now,
                lapses_at=record.created_at + RUNNING_LAPSE_S,
            )
        except QuotaExceededError:
            await self._conn.script("create_undo", user_keys, [record.job_id])
            raise

    async def _reserve(self, job_id: str, capacity: SharedCapacity) -> tuple[int, str] | None:
        """A running entry in the first shard with room, from the job's home shard on; its
        shard and lease's end (Redis's clock), or None if every shard was full when asked.
        Each shard holds at most its share of ``max_jobs`` (``shard_budget``), so the total
        never exceeds it. Cancellation: the entry may or may not be taken (it lapses with
        its lease, or the create's retry finds it)."""
        home = self._keys.home_shard(job_id)
        now, until = self.frame.at(capacity.now), self.frame.ahead(capacity.lease_until)
        for step in range(SHARDS):
            shard = (home + step) % SHARDS
            budget = shard_budget(capacity.max_jobs, shard)
            if budget == 0:
                continue
            args = [job_id, now, str(budget), until]
            lease = str(await self._conn.script("create_reserve", [self._keys.running(shard)], args))
            if lease != "!full":
                return shard, lease
        return None

    async def read_record(self, job_id: str) -> JobRecord | None:
        """The job's record, or None. Cancellation: safe (a read)."""
        return decode_record(await self._conn.call(self._conn.client.hgetall(self._keys.job(job_id))))

    async def finish(self, step: Finish, *, first: bool) -> None:
        """The user slot, then the instance set (its running entry goes last: while it
        stays, the job is found again), then the end is announced to the job's followers.
        ``first``: right after the terminal commit landed (the outbox entry is written
        whatever the running set says: a job created without capacity has no running
        entry); otherwise a repair, which writes the entry only if the running entry was
        still there. Cancellation: repeat it (with ``first=False``)."""
        k, shard = self._keys, step.shard
        await self._conn.script(
            "finish_user",
            [k.user_running(step.user), k.msg(step.user, step.message_id)],
            [step.job_id, str(step.ttl_ms)],
        )
        await self.quota.settle(step.user, step.job_id, step.charge, step.expires_at + SAFETY_TTL_S)
        keys = [
            k.running(shard),
            k.expiry(shard),
            k.outbox(shard),
            k.outbox_due(shard),
            k.outbox_claims(shard),
            k.outbox_owned(shard, step.owner),
        ]
        args = [
            step.job_id,
            repr(step.expires_at),
            step.outbox,
            step.owner,
            self.frame.ahead(step.claim_until),
            str(ms(SAFETY_TTL_S)),
            "1" if first else "0",
        ]
        await self._conn.script("finish_instance", keys, args)
        # The end, announced in the job's slot (where its followers listen), after the slots
        # are freed; a lost announcement is found by the followers' polls.
        announcement = f"{step.job_id} {step.seq}"
        await self._conn.call(self._conn.client.spublish(k.job_channel(step.job_id), announcement))

    async def repair_ended(self, record: JobRecord, shard: int) -> None:
        """A job that ended but is still in the running set: its terminal commit stopped
        after its first step. Its outbox entry, unclaimed, is read from its record.
        Cancellation: the next sweep of orphans repeats it."""
        stored, logged = await self._conn.call(
            self._conn.client.hmget(self._keys.job(record.job_id), [OUTBOX_FIELD, LOG_BYTES_FIELD])
        )
        expires_at = record.expires_at or 0.0
        ttl_s = expires_at - record.updated_at + SAFETY_TTL_S
        step = Finish(
            record.job_id,
            shard,
            record.seq,
            record.user,
            record.message_id,
            "" if stored is None else str(json.loads(stored)),
            "",
            0.0,
            expires_at,
            ms(max(ttl_s, 1.0)),
            request_bytes(record.request) + int(logged or 0),
        )
        await self.finish(step, first=False)

    async def follow_lease(
        self, job_id: str, user: str, shard: int, lease_at: str, *, only_existing: bool
    ) -> None:
        """The job's running entries (its shard, then user slot) follow its lease (its end
        on Redis's clock). ``only_existing``: a renewal does not bring back an entry a
        terminal commit removed. Cancellation: either may be moved or not; the next
        renewal catches up."""
        condition: Literal[PureToken.XX] | None = PureToken.XX if only_existing else None
        score = float(lease_at)
        client, k = self._conn.client, self._keys
        await self._conn.call(client.zadd(k.running(shard), {job_id: score}, condition=condition))
        await self._conn.call(client.zadd(k.user_running(user), {job_id: score}, condition=condition))

    async def renew(
        self, owner: str, jobs: Sequence[tuple[str, str, int]], until: float, *, handoff: bool = False
    ) -> None:
        """Per job (its id, user and shard): its lease in its slot (only if ``owner`` holds
        it; with ``handoff``, the job's count of hand-offs goes up too), then its running
        entries; one pipeline for the leases and one for the entries, whatever the number
        of jobs. Cancellation: some may be renewed; the next renewal catches up."""
        if not jobs:
            return
        args = [repr(until), json.dumps(owner), self.frame.ahead(until), "1" if handoff else "0"]
        client, k, script = self._conn.client, self._keys, self._conn.scripts["renew"]

        async def renew_leases() -> list[str]:
            async with client.pipeline(transaction=False) as pipe:
                replies = [script(keys=[k.job(job_id)], args=args, client=pipe) for job_id, _, _ in jobs]
            return [str(await reply or "") for reply in replies]

        async def follow(renewed: list[tuple[str, str, int, float]]) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for job_id, user, shard, score in renewed:
                    pipe.zadd(k.running(shard), {job_id: score}, condition=PureToken.XX)
                    pipe.zadd(k.user_running(user), {job_id: score}, condition=PureToken.XX)

        leases = await self._conn.call(renew_leases())
        renewed = [(*job, float(lease)) for job, lease in zip(jobs, leases, strict=True) if lease]
        if renewed:
            await self._conn.call(follow(renewed))
