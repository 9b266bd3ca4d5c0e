"""Webhook deliveries of ``RedisStore``: shared by every instance on one Redis.

Every key is in the instance set's slot (``RedisKeyspace.webhooks``), so each script
touches one slot. A delivery's due set score is when it may be claimed: its next
attempt, or, while claimed, its claim's end, so that a claim left by a dead instance
lapses by itself and another instance takes it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import attrs

from backstream.actors.webhook_queue import WebhookCounts, WebhookQueue
from backstream.protocol.webhooks import WebhookDelivery
from backstream.runtime.stores.redis_client import RedisConnection
from backstream.runtime.stores.sqlite_webhooks import delivery_from_json, delivery_to_json

__all__ = ["RedisWebhookQueue"]

# KEYS: deliveries, the endpoint's due set. ARGV: id, JSON, next attempt, repeated.
# Records each delivery unless it exists.
RECORD = """
for i = 1, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('ZADD', KEYS[2], ARGV[i + 2], ARGV[i])
  end
end
return 1
"""

# KEYS: the endpoint's due set, deliveries. ARGV: now, the claim's end, limit. Claims the
# deliveries due by now (stale ids dropped) and returns their JSON.
CLAIM = """
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))) do
  local body = redis.call('HGET', KEYS[2], id)
  if body then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    table.insert(out, body)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""

# KEYS: deliveries, the endpoint's due set, dead letters. ARGV: id, JSON, outcome
# ('delivered' | 'retry' | 'dead'), next attempt or dead-letter time. Nothing if it is gone.
SETTLE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
if ARGV[3] == 'delivered' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == 'dead' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
else
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
end
return 1
"""

_SCRIPTS = {"record": RECORD, "claim": CLAIM, "settle": SETTLE}


class RedisWebhookQueue(WebhookQueue):
    """The ``WebhookQueue`` port for ``RedisStore`` (which lists it among its bases)."""

    _conn: RedisConnection

    def _webhook_script(self, name: str) -> Any:
        """The script registered with the current client (registered again after a reopen)."""
        client = self._conn.client
        cache: dict[str, Any] = getattr(self, "_webhook_scripts", {})
        if cache.get("client") is not client:
            cache = {"client": client, **{n: client.register_script(b) for n, b in _SCRIPTS.items()}}
            self._webhook_scripts = cache
        return cache[name]

    async def _run(self, name: str, keys: list[str], args: list[str]) -> Any:
        return await self._conn.call(self._webhook_script(name)(keys=keys, args=args))

    async def record_webhooks(self, deliveries: Sequence[WebhookDelivery]) -> None:
        """One script per endpoint. Cancellation: some may be recorded; record again."""
        k = self._conn.keys
        by_endpoint: defaultdict[str, list[str]] = defaultdict(list)
        for d in deliveries:
            by_endpoint[d.endpoint] += [d.delivery_id, delivery_to_json(d), repr(d.next_at)]
        for endpoint, args in by_endpoint.items():
            await self._run("record", [k.webhooks(), k.webhooks("due", endpoint)], args)

    async def claim_webhooks(
        self, endpoint: str, owner: str, now: float, until: float, limit: int
    ) -> list[WebhookDelivery]:
        k = self._conn.keys
        keys = [k.webhooks("due", endpoint), k.webhooks()]
        reply = await self._run("claim", keys, [repr(now), repr(until), str(limit)])
        return [delivery_from_json(str(body)) for body in reply]

    async def settle_webhook(self, delivery: WebhookDelivery, *, delivered: bool) -> None:
        k = self._conn.keys
        keys = [k.webhooks(), k.webhooks("due", delivery.endpoint), k.webhooks("dead")]
        if delivered:
            outcome, when = "delivered", 0.0
        elif delivery.dead:
            outcome, when = "dead", delivery.dead_at or 0.0
        else:
            outcome, when = "retry", delivery.next_at
        await self._run(
            "settle", keys, [delivery.delivery_id, delivery_to_json(delivery), outcome, repr(when)]
        )

    async def release_webhooks(self, delivery_ids: Sequence[str]) -> None:
        k = self._conn.keys
        for delivery_id in delivery_ids:
            body = await self._conn.call(self._conn.client.hget(k.webhooks(), delivery_id))
            if body is not None:
                d = delivery_from_json(str(body))
                await self._conn.call(
                    self._conn.client.zadd(k.webhooks("due", d.endpoint), {delivery_id: d.next_at})
                )

    async def failed_webhooks(self, limit: int) -> list[WebhookDelivery]:
        k = self._conn.keys
        ids = await self._conn.call(self._conn.client.zrange(k.webhooks("dead"), 0, limit - 1))
        if not ids:
            return []
        bodies = await self._conn.call(self._conn.client.hmget(k.webhooks(), list(ids)))
        return [delivery_from_json(str(b)) for b in bodies if b is not None]

    async def redeliver_webhooks(self, delivery_ids: Sequence[str] | None, now: float) -> int:
        """Each delivery in a script of its own. Cancellation: some may be redelivered."""
        dead = await self.failed_webhooks(1_000_000)
        if delivery_ids is not None:
            wanted = set(delivery_ids)
            dead = [d for d in dead if d.delivery_id in wanted or d.event_id in wanted]
        for d in dead:
            fresh = attrs.evolve(d, dead=False, dead_at=None, attempts=0, next_at=now)
            await self.settle_webhook(fresh, delivered=False)
        return len(dead)

    async def webhook_counts(self) -> WebhookCounts:
        k = self._conn.keys
        total = int(await self._conn.call(self._conn.client.hlen(k.webhooks())))
        dead = int(await self._conn.call(self._conn.client.zcard(k.webhooks("dead"))))
        return WebhookCounts(pending=total - dead, dead=dead)

    async def disable_endpoint(self, endpoint: str, reason: str) -> None:
        await self._conn.call(
            self._conn.client.hset(self._conn.keys.webhooks("disabled"), {endpoint: reason})
        )

    async def enable_endpoint(self, endpoint: str) -> bool:
        removed = await self._conn.call(
            self._conn.client.hdel(self._conn.keys.webhooks("disabled"), [endpoint])
        )
        return bool(removed)

    async def disabled_endpoints(self) -> dict[str, str]:
        found = await self._conn.call(self._conn.client.hgetall(self._conn.keys.webhooks("disabled")))
        return {str(e): str(r) for e, r in found.items()}
