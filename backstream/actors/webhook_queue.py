"""The port of the webhooks' deliveries: recorded, claimed with a lease, settled.

Every store implements it (``Store`` inherits it). A delivery is recorded before the
outbox entry that asked for it is deleted, so the job's end and its events are never
apart; it stays in the store until it is delivered, or is dead-lettered once its retry
schedule is spent (listed and redelivered by ``backstream webhooks``).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import attrs

from backstream.protocol.webhooks import WebhookDelivery

__all__ = ["WEBHOOK_CLAIM_S", "WebhookCounts", "WebhookQueue"]

WEBHOOK_CLAIM_S = 60.0
"""How long a claim on a delivery holds: longer than an attempt may take (its timeout),
so that no other instance sends it meanwhile; a dead instance's claim lapses."""


@attrs.frozen
class WebhookCounts:
    pending: int
    """Deliveries waiting for their (next) attempt."""
    dead: int
    """Deliveries dead-lettered: their schedule was spent."""


class WebhookQueue(abc.ABC):
    """Deliveries of webhook events. Cancellation: every write is atomic (all of it or
    none) and safe to repeat; reads are safe."""

    @abc.abstractmethod
    async def record_webhooks(self, deliveries: Sequence[WebhookDelivery]) -> None:
        """Record each delivery unless one with its ``delivery_id`` exists (a repeat, after
        a crash, records nothing twice). Cancellation: some or all may be recorded;
        record them again."""

    @abc.abstractmethod
    async def claim_webhooks(
        self, endpoint: str, owner: str, now: float, until: float, limit: int
    ) -> list[WebhookDelivery]:
        """Claim up to ``limit`` live deliveries to ``endpoint`` due by ``now`` and not
        claimed by another (a claim lapsed before ``now`` is nobody's), oldest due first,
        for ``owner`` until ``until``. In a store one process owns (SQLite), another
        owner's claim is a dead instance's: taken at once. Cancellation: they may or may
        not be claimed; a claim lapses by itself."""

    @abc.abstractmethod
    async def settle_webhook(self, delivery: WebhookDelivery, *, delivered: bool) -> None:
        """After an attempt: delete it if ``delivered``, else store its attempts, next
        attempt, last error and dead-letter mark, and release its claim. Nothing if it
        is gone. Cancellation: settled or not (atomic); a claim left lapses and the
        delivery is sent again (same ``webhook-id``)."""

    @abc.abstractmethod
    async def release_webhooks(self, delivery_ids: Sequence[str]) -> None:
        """Release claims without an attempt (its endpoint was disabled meanwhile).
        Cancellation: some may stay claimed until their claims lapse."""

    @abc.abstractmethod
    async def failed_webhooks(self, limit: int) -> list[WebhookDelivery]:
        """Dead-lettered deliveries, oldest first. Cancellation: safe (a read)."""

    @abc.abstractmethod
    async def redeliver_webhooks(self, delivery_ids: Sequence[str] | None, now: float) -> int:
        """Make dead-lettered deliveries (these, or all with None; an id may also be an
        event id: each of its deliveries) due now with a fresh schedule. Returns how many.
        Cancellation: some may be due again; repeating it is safe."""

    @abc.abstractmethod
    async def webhook_counts(self) -> WebhookCounts:
        """How many deliveries wait, and how many are dead-lettered. Cancellation: safe."""

    @abc.abstractmethod
    async def disable_endpoint(self, endpoint: str, reason: str) -> None:
        """Mark the endpoint disabled (it answered 410 Gone): no instance sends to it until
        ``enable_endpoint``. Its deliveries wait meanwhile. Cancellation: marked or not."""

    @abc.abstractmethod
    async def enable_endpoint(self, endpoint: str) -> bool:
        """Clear the mark; whether it was disabled. Cancellation: cleared or not."""

    @abc.abstractmethod
    async def disabled_endpoints(self) -> dict[str, str]:
        """The disabled endpoints' keys, each with why. Cancellation: safe (a read)."""
