"""What every WebSocket connection actor of the front door does alike, whatever it speaks:
closing with a code, a request rate limit and session expiry (keep-alive pings are the
front door's ``Heartbeat``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from backstream.actors.seats import SeatsTakenError
from backstream.protocol.errors import BackstreamError

__all__ = [
    "STORE_UNAVAILABLE",
    "TOO_MANY_CONNECTIONS",
    "Close",
    "TokenBucket",
    "close_at",
    "seat_refusal",
]

TOO_MANY_CONNECTIONS = 4409
"""The close code of a connection refused, once its user is known, because the user already
has ``max_connections_per_user`` open (on every instance that shares the store)."""
STORE_UNAVAILABLE = 1013
"""RFC 6455's "try again later": the store that counts connections did not answer."""


class Close(Exception):
    """End the connection with this WebSocket close code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class TokenBucket:
    """``rate`` requests per second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at = trio.current_time()

    def take(self) -> bool:
        """Take one token if there is one."""
        now = trio.current_time()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def full(self) -> bool:
        """Whether the bucket has refilled to its burst (forgetting it loses nothing)."""
        return self._tokens + (trio.current_time() - self._at) * self._rate >= self._burst


async def close_at(expires_at: float, close_soon: Callable[[int, str], None]) -> None:
    """Close the session (4401) at wall time ``expires_at``. Cancellation: nothing happens."""
    await trio.sleep(max(0.0, expires_at - time.time()))
    close_soon(4401, "session expired")


def seat_refusal(exc: BackstreamError) -> Close:
    """How a connection whose seat was refused (``HeldSeats.hold``) is closed: 4409 when the
    user has all their connections open, 1013 (try again later) when the store is away."""
    if isinstance(exc, SeatsTakenError):
        return Close(TOO_MANY_CONNECTIONS, exc.message[:120])  # a close reason fits in 123 bytes
    return Close(STORE_UNAVAILABLE, "try again later: the server cannot count connections now")
