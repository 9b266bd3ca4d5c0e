"""The SQLite store's webhook deliveries: in the file, so they outlive the process."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import attrs

from backstream.actors.webhook_queue import WebhookCounts, WebhookQueue
from backstream.protocol.webhooks import WebhookDelivery

__all__ = ["SqliteWebhookQueue", "delivery_from_json", "delivery_to_json"]

T = TypeVar("T")


def delivery_to_json(delivery: WebhookDelivery) -> str:
    return json.dumps(attrs.asdict(delivery), separators=(",", ":"), ensure_ascii=False)


def delivery_from_json(text: str) -> WebhookDelivery:
    return WebhookDelivery(**json.loads(text))


def _in_transaction(conn: sqlite3.Connection, fn: Callable[[], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn()
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return result


class SqliteWebhookQueue(WebhookQueue):
    """Each step one statement or one transaction on the store's writer (reads on its
    reader). One process owns the file: another owner's claim is a dead instance's (taken
    at once after a restart, not when it lapses)."""

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError  # the store's

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError  # the store's

    async def record_webhooks(self, deliveries: Sequence[WebhookDelivery]) -> None:
        rows = [(d.delivery_id, d.endpoint, delivery_to_json(d), d.next_at) for d in deliveries]

        def insert(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT OR IGNORE INTO webhooks (delivery_id, endpoint, delivery, next_at) "
                "VALUES (?, ?, ?, ?)",
                rows,
            )

        if rows:
            await self._write(insert)

    async def claim_webhooks(
        self, endpoint: str, owner: str, now: float, until: float, limit: int
    ) -> list[WebhookDelivery]:
        def claim(conn: sqlite3.Connection) -> list[WebhookDelivery]:
            rows = conn.execute(
                "SELECT delivery_id, delivery FROM webhooks WHERE endpoint = ? AND dead = 0 "
                "AND next_at <= ? AND (claimed_until < ? OR claimed_by IS NOT ?) ORDER BY next_at LIMIT ?",
                (endpoint, now, now, owner, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE webhooks SET claimed_by = ?, claimed_until = ? WHERE delivery_id = ?",
                [(owner, until, r[0]) for r in rows],
            )
            return [delivery_from_json(r[1]) for r in rows]

        return await self._write(lambda conn: _in_transaction(conn, lambda: claim(conn)))

    async def settle_webhook(self, delivery: WebhookDelivery, *, delivered: bool) -> None:
        def settle(conn: sqlite3.Connection) -> None:
            if delivered:
                conn.execute("DELETE FROM webhooks WHERE delivery_id = ?", (delivery.delivery_id,))
                return
            conn.execute(
                "UPDATE webhooks SET delivery = ?, next_at = ?, dead = ?, dead_at = ?, claimed_until = 0 "
                "WHERE delivery_id = ?",
                (
                    delivery_to_json(delivery),
                    delivery.next_at,
                    int(delivery.dead),
                    delivery.dead_at,
                    delivery.delivery_id,
                ),
            )

        await self._write(settle)

    async def release_webhooks(self, delivery_ids: Sequence[str]) -> None:
        await self._write(
            lambda conn: conn.executemany(
                "UPDATE webhooks SET claimed_until = 0 WHERE delivery_id = ?", [(i,) for i in delivery_ids]
            )
        )

    async def failed_webhooks(self, limit: int) -> list[WebhookDelivery]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT delivery FROM webhooks WHERE dead = 1 ORDER BY dead_at LIMIT ?", (limit,)
            ).fetchall()
        )
        return [delivery_from_json(r[0]) for r in rows]

    async def redeliver_webhooks(self, delivery_ids: Sequence[str] | None, now: float) -> int:
        def redeliver(conn: sqlite3.Connection) -> int:
            rows = conn.execute("SELECT delivery FROM webhooks WHERE dead = 1").fetchall()
            chosen = [delivery_from_json(r[0]) for r in rows]
            if delivery_ids is not None:
                wanted = set(delivery_ids)
                chosen = [d for d in chosen if d.delivery_id in wanted or d.event_id in wanted]
            fresh = [attrs.evolve(d, dead=False, dead_at=None, attempts=0, next_at=now) for d in chosen]
            conn.executemany(
                "UPDATE webhooks SET delivery = ?, next_at = ?, dead = 0, dead_at = NULL, claimed_until = 0 "
                "WHERE delivery_id = ?",
                [(delivery_to_json(d), now, d.delivery_id) for d in fresh],
            )
            return len(fresh)

        return await self._write(lambda conn: _in_transaction(conn, lambda: redeliver(conn)))

    async def webhook_counts(self) -> WebhookCounts:
        rows: list[Any] = await self._read(
            lambda conn: conn.execute("SELECT dead, count(*) FROM webhooks GROUP BY dead").fetchall()
        )
        counts = {int(dead): int(n) for dead, n in rows}
        return WebhookCounts(pending=counts.get(0, 0), dead=counts.get(1, 0))

    async def disable_endpoint(self, endpoint: str, reason: str) -> None:
        await self._write(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO webhook_endpoints_disabled (endpoint, reason) VALUES (?, ?)",
                (endpoint, reason),
            )
        )

    async def enable_endpoint(self, endpoint: str) -> bool:
        def enable(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute("DELETE FROM webhook_endpoints_disabled WHERE endpoint = ?", (endpoint,))
            return cursor.rowcount > 0

        return await self._write(enable)

    async def disabled_endpoints(self) -> dict[str, str]:
        rows: list[Any] = await self._read(
            lambda conn: conn.execute("SELECT endpoint, reason FROM webhook_endpoints_disabled").fetchall()
        )
        return {str(e): str(r) for e, r in rows}
