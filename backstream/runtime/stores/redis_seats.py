"""Seats of ``RedisStore``: per-user caps counted across every instance on one Redis.

Each user's seats of a kind are a sorted set (``RedisKeyspace.seats``, in the user's slot)
of seat ids scored by lease expiry in milliseconds of Redis's own clock (``TIME`` inside
the script), so instances whose clocks differ still agree on what lapsed. Taking a seat
drops the lapsed ones first, then counts; the key itself expires with its latest seat.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from backstream.actors.ports import SeatKey, Seats
from backstream.runtime.stores.redis_client import RedisConnection, ms

__all__ = ["SEAT_RENEW", "SEAT_TAKE", "RedisSeats"]

# User slot. KEYS: the seats. ARGV: seat id, limit, lease (ms). Returns 1 if taken (or renewed:
# a seat held already), 0 when the user holds ``limit`` live seats. The key lives as long
# as its latest seat: ``PEXPIREAT ... GT`` only ever moves its end later, and a key that
# the ``ZADD`` just made (no end yet, which ``GT`` counts as later than any) gets one
# with ``NX``.
SEAT_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
local ends = now + tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], ends, ARGV[1])
if redis.call('PEXPIREAT', KEYS[1], ends, 'GT') == 0 then redis.call('PEXPIREAT', KEYS[1], ends, 'NX') end
return 1
"""

# User slot. KEYS: the seats. ARGV: lease (ms), then the seat ids. Extends the seats still
# held (a lapsed one stays gone); returns how many were extended.
SEAT_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ends = now + tonumber(ARGV[1])
local renewed = 0
for i = 2, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', ends, ARGV[i])
end
if renewed > 0 then redis.call('PEXPIREAT', KEYS[1], ends, 'GT') end
return renewed
"""


class RedisSeats(Seats):
    """The ``Seats`` port on a ``RedisConnection`` (``RedisStore`` forwards to it)."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn
        self._keys = conn.keys
        self._scripts: dict[str, Any] = {}
        self._client: object = None

    def _script(self, name: str) -> Any:
        """The script registered with the current client (registered again after a reopen)."""
        client = self._conn.client
        if client is not self._client:
            self._scripts = {
                "take": client.register_script(SEAT_TAKE),
                "renew": client.register_script(SEAT_RENEW),
            }
            self._client = client
        return self._scripts[name]

    async def take_seat(self, user: str, kind: str, seat_id: str, limit: int, lease: float) -> bool:
        """One script in the user's slot. Cancellation: the seat may or may not be taken."""
        script = self._script("take")
        args = [seat_id, str(limit), str(max(1, ms(lease)))]
        return bool(await self._conn.call(script(keys=[self._keys.seats(user, kind)], args=args)))

    async def release_seat(self, user: str, kind: str, seat_id: str) -> None:
        """Cancellation: the seat may stay until its lease lapses."""
        await self._conn.call(self._conn.client.zrem(self._keys.seats(user, kind), [seat_id]))

    async def renew_seats(self, seats: Sequence[SeatKey], lease: float) -> None:
        """One script per user and kind, in one pipeline. Cancellation: some may be renewed;
        the next renewal catches up."""
        by_key: defaultdict[str, list[str]] = defaultdict(list)
        for user, kind, seat_id in seats:
            by_key[self._keys.seats(user, kind)].append(seat_id)
        script = self._script("renew")
        lease_ms = str(max(1, ms(lease)))

        async def renew() -> None:
            async with self._conn.client.pipeline(transaction=False) as pipe:
                for key, seat_ids in by_key.items():
                    script(keys=[key], args=[lease_ms, *seat_ids], client=pipe)

        await self._conn.call(renew())
