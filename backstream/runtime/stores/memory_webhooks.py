"""The memory store's webhook deliveries: in this process, bounded."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import attrs
import trio

from backstream.actors.webhook_queue import WebhookCounts, WebhookQueue
from backstream.protocol.webhooks import WebhookDelivery

__all__ = ["MAX_MEMORY_DELIVERIES", "MemoryWebhookQueue"]

log = logging.getLogger("backstream.webhooks")

MAX_MEMORY_DELIVERIES = 10_000
"""Deliveries held (waiting or dead-lettered). When full, a new one is dropped, logged
and counted (``dropped``): the memory store keeps nothing across a restart anyway."""


@attrs.define
class _Held:
    delivery: WebhookDelivery
    claimed_until: float = 0.0


class MemoryWebhookQueue(WebhookQueue):
    """One process, one deliverer: every claim is the caller's."""

    def _init_webhooks(self) -> None:
        self._deliveries: dict[str, _Held] = {}  # in record order
        self._disabled: dict[str, str] = {}
        self.webhooks_dropped = 0

    async def record_webhooks(self, deliveries: Sequence[WebhookDelivery]) -> None:
        await trio.lowlevel.checkpoint()
        for delivery in deliveries:
            if delivery.delivery_id in self._deliveries:
                continue
            if len(self._deliveries) >= MAX_MEMORY_DELIVERIES:
                self.webhooks_dropped += 1
                log.error(
                    "webhook %s to %s dropped: the memory store holds %d deliveries already",
                    delivery.event_id,
                    delivery.url,
                    MAX_MEMORY_DELIVERIES,
                )
                continue
            self._deliveries[delivery.delivery_id] = _Held(delivery)

    async def claim_webhooks(
        self, endpoint: str, owner: str, now: float, until: float, limit: int
    ) -> list[WebhookDelivery]:
        await trio.lowlevel.checkpoint()
        due = [
            held
            for held in self._deliveries.values()
            if held.delivery.endpoint == endpoint
            and not held.delivery.dead
            and held.delivery.next_at <= now
            and held.claimed_until < now
        ]
        due.sort(key=lambda held: held.delivery.next_at)
        for held in due[:limit]:
            held.claimed_until = until
        return [held.delivery for held in due[:limit]]

    async def settle_webhook(self, delivery: WebhookDelivery, *, delivered: bool) -> None:
        await trio.lowlevel.checkpoint()
        if delivered:
            self._deliveries.pop(delivery.delivery_id, None)
        elif delivery.delivery_id in self._deliveries:
            self._deliveries[delivery.delivery_id] = _Held(delivery)

    async def release_webhooks(self, delivery_ids: Sequence[str]) -> None:
        await trio.lowlevel.checkpoint()
        for delivery_id in delivery_ids:
            held = self._deliveries.get(delivery_id)
            if held is not None:
                held.claimed_until = 0.0

    async def failed_webhooks(self, limit: int) -> list[WebhookDelivery]:
        await trio.lowlevel.checkpoint()
        dead = [held.delivery for held in self._deliveries.values() if held.delivery.dead]
        dead.sort(key=lambda d: d.dead_at or 0.0)
        return dead[:limit]

    async def redeliver_webhooks(self, delivery_ids: Sequence[str] | None, now: float) -> int:
        await trio.lowlevel.checkpoint()
        wanted = None if delivery_ids is None else set(delivery_ids)
        count = 0
        for key, held in self._deliveries.items():
            d = held.delivery
            if d.dead and (wanted is None or d.delivery_id in wanted or d.event_id in wanted):
                self._deliveries[key] = _Held(
                    attrs.evolve(d, dead=False, dead_at=None, attempts=0, next_at=now)
                )
                count += 1
        return count

    async def webhook_counts(self) -> WebhookCounts:
        await trio.lowlevel.checkpoint()
        dead = sum(1 for held in self._deliveries.values() if held.delivery.dead)
        return WebhookCounts(pending=len(self._deliveries) - dead, dead=dead)

    async def disable_endpoint(self, endpoint: str, reason: str) -> None:
        await trio.lowlevel.checkpoint()
        self._disabled[endpoint] = reason

    async def enable_endpoint(self, endpoint: str) -> bool:
        await trio.lowlevel.checkpoint()
        return self._disabled.pop(endpoint, None) is not None

    async def disabled_endpoints(self) -> dict[str, str]:
        await trio.lowlevel.checkpoint()
        return dict(self._disabled)
