"""The quota of stored bytes on Redis: each user's charges, in the user's slot.

Per user (``RedisKeyspace``): ``stored_charges`` (a hash, job id → the bytes the job is
charged), ``stored_bytes`` (their sum, kept as they change) and ``stored_lapse`` (job id →
when its charge lapses by itself). Every script here touches those three keys only: one
slot, the user's, where the create's first step also runs (``redis_steps``).

- At create (after the user's first step, in the same slot): the request's bytes are
  checked against the limit and charged, atomically, so that racing creates on any number
  of instances never take the user past it; a retry finds the charge made.
- At the end (the terminal commit's user step): the charge becomes the request plus the
  log (``log_bytes`` of every batch, summed on the job's record as they landed), only
  while the job holds a charge: one the sweep released is never made again.
- At the sweep (its user step): the charge is released and deleted in one script, so
  nothing is released twice.
- A charge lapses by itself once Redis has expired the job's keys (an hour after its
  retention, should no sweep run), or, for a job that never ended, ``RUNNING_LAPSE_S``
  after its creation (a create that stopped halfway and was never repeated, a job Redis
  lost): the user's next create drops lapsed charges first, at most ``LAPSE_BATCH`` a call.
"""

from __future__ import annotations

from backstream.runtime.stores.redis_client import RedisConnection
from backstream.runtime.stores.redis_quota_scripts import (
    CHARGE,
    LAPSE_BATCH,
    RELEASE,
    RUNNING_LAPSE_S,
    SCRIPTS,
    SETTLE,
)
from backstream.runtime.stores.shared import quota_exceeded

__all__ = ["CHARGE", "LAPSE_BATCH", "RELEASE", "RUNNING_LAPSE_S", "SCRIPTS", "SETTLE", "RedisQuota"]

class RedisQuota:
    """The user-slot steps of the quota, called by ``RedisSteps`` and the sweep."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn

    def _keys(self, user: str) -> list[str]:
        k = self._conn.keys
        return [k.stored_bytes(user), k.stored_charges(user), k.stored_lapse(user)]

    async def charge(
        self, user: str, job_id: str, cost: int, limit: int | None, *, now: float, lapses_at: float
    ) -> None:
        """Charge ``cost`` for the job unless it holds a charge; raises
        ``QuotaExceededError`` (nothing charged) if that would take ``user`` past ``limit``.
        Cancellation: charged or not; charging again charges once."""
        args = [job_id, str(cost), "" if limit is None else str(limit), repr(now), repr(lapses_at)]
        done, stored = await self._conn.script("quota_charge", self._keys(user), args)
        if not int(done):
            assert limit is not None
            raise quota_exceeded(int(stored), cost, limit)

    async def settle(self, user: str, job_id: str, charge: int, lapses_at: float) -> None:
        """The job's charge from its end on. Cancellation: repeat it (idempotent)."""
        args = [job_id, str(charge), repr(lapses_at)]
        await self._conn.script("quota_settle", self._keys(user), args)

    async def release(self, user: str, *job_ids: str) -> None:
        """Release the jobs' charges (of one user), each once. Cancellation: released or
        not; repeat it."""
        if job_ids:
            await self._conn.script("quota_release", self._keys(user), list(job_ids))

    async def stored_bytes(self, user: str) -> int:
        """The sum of the user's charges (lapsed ones included until the next create).
        Cancellation: safe (a read)."""
        raw = await self._conn.call(self._conn.client.get(self._conn.keys.stored_bytes(user)))
        return int(raw) if raw else 0
