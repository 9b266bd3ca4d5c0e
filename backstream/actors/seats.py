"""The seats this instance holds: per-user caps (open HTTP streams and waits, WebSocket
connections) counted in the store, so that they hold across every instance sharing it.

A front door holds a seat for as long as what it counts is open (``HeldSeats.hold``); the
keeper renews every seat this instance holds in one store call per lease round, so the
seats of an instance that died lapse after ``lease_ttl``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from backstream.actors.ports import SeatKey, Seats
from backstream.protocol.errors import RateLimitedError
from backstream.protocol.ids import new_id

__all__ = ["CONNECTIONS", "STREAMS", "HeldSeats", "SeatsTakenError"]

log = logging.getLogger("backstream.seats")

STREAMS = "streams"
"""Open HTTP requests that wait on a job: event streams, and creates that wait for the end."""
CONNECTIONS = "connections"
"""Open WebSocket connections (``/v1`` and ``/v1/ai-sdk`` alike)."""


class SeatsTakenError(RateLimitedError):
    """The user holds all the seats of a kind, on one instance or several."""

    RETRY_AFTER_MS = 1000
    """The retry hint it carries (HTTP ``Retry-After``): a seat frees when one of the user's
    streams or connections ends, which nobody can foretell."""

    def __init__(self, kind: str, limit: int) -> None:
        super().__init__(f"at most {limit} {kind} open at once per user", retry_after_ms=self.RETRY_AFTER_MS)
        self.kind = kind
        self.limit = limit


class HeldSeats:
    """The seats this instance holds, for the keeper to renew; ``hold`` takes one."""

    def __init__(self, store: Seats, *, lease: float, release_timeout: float) -> None:
        self._store = store
        self._lease = lease
        self._release_timeout = release_timeout
        self._held: dict[str, tuple[str, str]] = {}  # seat id -> (user, kind)

    @asynccontextmanager
    async def hold(self, user: str, kind: str, limit: int) -> AsyncIterator[None]:
        """Hold one of the user's ``limit`` seats of ``kind`` for the block. Raises
        ``SeatsTakenError`` (a ``RateLimitedError``) when they are all held, on any instance;
        ``UnavailableError`` if the store cannot be reached.

        Cancellation: the seat is released (a shielded, bounded write; if that fails too, it
        lapses with its lease)."""
        seat_id = new_id("s_")
        try:
            taken = await self._store.take_seat(user, kind, seat_id, limit, self._lease)
        except BaseException:
            await self._release(user, kind, seat_id)  # it may have been taken
            raise
        if not taken:
            raise SeatsTakenError(kind, limit)
        self._held[seat_id] = (user, kind)
        try:
            yield
        finally:
            del self._held[seat_id]
            await self._release(user, kind, seat_id)

    async def _release(self, user: str, kind: str, seat_id: str) -> None:
        with trio.CancelScope(shield=True) as cleanup:
            cleanup.deadline = trio.current_time() + self._release_timeout
            try:
                await self._store.release_seat(user, kind, seat_id)
            except Exception as exc:
                log.warning("a seat of %s could not be released (it lapses with its lease): %s", kind, exc)

    def snapshot(self) -> tuple[SeatKey, ...]:
        """Every seat held here, as the keeper renews them."""
        return tuple((user, kind, seat_id) for seat_id, (user, kind) in self._held.items())

    def count(self, kind: str) -> int:
        """Seats of ``kind`` held here (by every user)."""
        return sum(1 for _, held_kind in self._held.values() if held_kind == kind)
