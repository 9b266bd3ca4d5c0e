"""The writes of ``RedisStore`` that span entities (a user, a job, the instance set), as
a sequence of one-slot Lua scripts: creating a job, the steps after a terminal commit,
renewing leases and what follows a hand-over.

Each step is idempotent and the order is the one ``RedisKeyspace``'s docstring gives,
with what a crash between two steps leaves and who repairs it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import attrs
from coredis.tokens import PureToken

from backstream.protocol.errors import CapacityError, UnavailableError
from backstream.protocol.records import JobRecord, SharedCapacity, record_from_dict, record_to_dict
from backstream.runtime.stores.redis_client import SAFETY_TTL_S, RedisConnection, ms

__all__ = ["OUTBOX_FIELD", "Finish", "RedisSteps", "decode_record", "encode_fields"]

OUTBOX_FIELD = "outbox"
"""The job record's field that holds the outbox entry its terminal commit wrote (JSON)."""


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
        if not name.startswith("decision:") and name != OUTBOX_FIELD
    }
    return record_from_dict(data)


@attrs.frozen
class Finish:
    """The steps after a terminal commit's first: the user's running entry goes, and the
    outbox entry, the expiry entry and the running entry's removal land in the instance set."""

    job_id: str
    seq: int
    user: str
    message_id: str
    outbox: str
    """The entry's JSON ('' for a job ended before entries were kept with it: none)."""
    owner: str
    """Who claims the entry at first ('': nobody, any dispatcher takes it)."""
    claim_until: float
    expires_at: float
    ttl_ms: int
    """How long the idempotency key lives on (the job's other keys got it with the commit)."""


class RedisSteps:
    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn
        self._keys = conn.keys

    async def create(self, record: JobRecord, capacity: SharedCapacity | None) -> tuple[JobRecord, bool]:
        """User slot, instance set, then the record in the job slot (see ``RedisKeyspace``).
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
                limits = [repr(capacity.now), str(capacity.max_jobs_per_user), repr(capacity.lease_until)]
            taken = str(
                await self._conn.script("create_user", user_keys, [job_id, repr(record.created_at), *limits])
            )
            if taken == "!user":
                raise CapacityError("you reached the limit of running jobs", retry_after_ms=1000)
            if taken:  # the message id names another job
                found = await self.read_record(taken)
                if found is not None:
                    return found, False
                record = attrs.evolve(record, job_id=taken)
                continue
            if capacity is not None:
                args = [job_id, repr(capacity.now), str(capacity.max_jobs), repr(capacity.lease_until)]
                if await self._conn.script("create_reserve", [k.running()], args) == "!server":
                    await self._conn.script("create_undo", user_keys, [job_id])
                    raise CapacityError("the cluster reached the limit of running jobs", retry_after_ms=1000)
            if await self._conn.script("create_job", [k.job(job_id)], encode_fields(record_to_dict(record))):
                return record, True
            found = await self.read_record(job_id)  # a create racing this one wrote it
            return (found if found is not None else record), False
        raise UnavailableError(f"{record.message_id}: its job kept changing under the create")

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
        k = self._keys
        await self._conn.script(
            "finish_user",
            [k.user_running(step.user), k.msg(step.user, step.message_id)],
            [step.job_id, str(step.ttl_ms)],
        )
        keys = [
            k.running(),
            k.expiry(),
            k.outbox(),
            k.outbox_due(),
            k.outbox_claims(),
            k.outbox_owned(step.owner),
        ]
        args = [
            step.job_id,
            repr(step.expires_at),
            step.outbox,
            step.owner,
            repr(step.claim_until),
            str(ms(SAFETY_TTL_S)),
            "1" if first else "0",
        ]
        await self._conn.script("finish_instance", keys, args)
        # The end, announced in the job's slot (where its followers listen), after the slots
        # are freed; a lost announcement is found by the followers' polls.
        announcement = f"{step.job_id} {step.seq}"
        await self._conn.call(self._conn.client.spublish(k.job_channel(step.job_id), announcement))

    async def repair_ended(self, record: JobRecord) -> None:
        """A job that ended but is still in the running set: its terminal commit stopped
        after its first step. Its outbox entry, unclaimed, is read from its record.
        Cancellation: the next sweep of orphans repeats it."""
        stored = await self._conn.call(self._conn.client.hget(self._keys.job(record.job_id), OUTBOX_FIELD))
        expires_at = record.expires_at or 0.0
        ttl_s = expires_at - record.updated_at + SAFETY_TTL_S
        step = Finish(
            record.job_id,
            record.seq,
            record.user,
            record.message_id,
            "" if stored is None else str(json.loads(stored)),
            "",
            0.0,
            expires_at,
            ms(max(ttl_s, 1.0)),
        )
        await self.finish(step, first=False)

    async def follow_lease(self, job_id: str, user: str, until: float, *, only_existing: bool) -> None:
        """The job's running entries (instance set, then user slot) follow its lease.
        ``only_existing``: a renewal does not bring back an entry a terminal commit removed.
        Cancellation: either may be moved or not; the next renewal catches up."""
        condition: Literal[PureToken.XX] | None = PureToken.XX if only_existing else None
        await self._conn.call(
            self._conn.client.zadd(self._keys.running(), {job_id: until}, condition=condition)
        )
        await self._conn.call(
            self._conn.client.zadd(self._keys.user_running(user), {job_id: until}, condition=condition)
        )

    async def renew(self, owner: str, jobs: Sequence[tuple[str, str | None]], until: float) -> None:
        """Per job: its lease in its slot (only if ``owner`` holds it), then its running
        entries. Cancellation: some may be renewed; the next renewal catches up."""
        for job_id, user in jobs:
            args = [repr(until), json.dumps(owner)]
            if await self._conn.script("renew", [self._keys.job(job_id)], args) and user is not None:
                await self.follow_lease(job_id, user, until, only_existing=True)
