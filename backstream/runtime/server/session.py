"""The session core every front door shares: limits, refusals, the paced send path, closing.

``/v1`` (``connection``) and ``/v1/ai-sdk`` (``ai_sdk``) each hold a ``Session`` for their
WebSocket; the HTTP listener (``http_app``) charges its requests to ``UserBuckets`` and
writes its streams through ``StreamSocket``, which waits on the same ``SocketGate``. So
every front door:

- charges a request to a token bucket before decoding it (a flood costs no more than the
  bucket allows), and counts refusals as strikes (past ``abuse_limit``: close 1008);
- sends a frame only once the socket keeps up (``SocketGate``): a client behind for
  ``slow_client_timeout`` is closed 4429; every send has a deadline (``send_timeout``);
- counts ``bytes_sent`` in UTF-8 bytes;
- sizes frames to fit beside what a slow client left unread (``frame_chars``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Awaitable, Callable

import attrs
import trio
from trio_websocket import ConnectionClosed

from backstream.runtime.server.peer import Close, TokenBucket
from backstream.runtime.server.socket_gate import SocketGate
from backstream.runtime.server.websocket import ServerWebSocket, send_text

__all__ = [
    "ConnectionLimits",
    "ConnectionStats",
    "Session",
    "UserBuckets",
    "frame_chars",
    "peek_string_field",
    "utf8_len",
]

log = logging.getLogger("backstream.session")


@attrs.frozen(kw_only=True)
class ConnectionLimits:
    hello_timeout: float = 10.0
    max_message_bytes: int = 1024 * 1024
    max_watches: int = 64
    max_connections_per_user: int = 32
    """WebSocket connections one user may have open at once (``/v1`` and ``/v1/ai-sdk``
    together, on every instance sharing the store); past it, closed 4409 once authenticated."""
    rate_per_s: float = 20.0
    """Requests per second a connection may make on average (token bucket)..."""
    rate_burst: int = 40
    """...and in a burst."""
    abuse_limit: int = 20
    """Refused requests (rate-limited or malformed) a connection may make before it is closed 1008."""
    send_timeout: float = 10.0
    slow_client_timeout: float = 10.0
    max_unsent_bytes: int = 256 * 1024
    ping_interval: float = 20.0
    idle_timeout: float = 60.0
    close_timeout: float = 2.0


@attrs.define
class ConnectionStats:
    """Counters the front door owns and its connections add to; read only through
    ``FrontDoor.statistics()``, a frozen snapshot."""

    frames_sent: int = 0
    bytes_sent: int = 0
    """UTF-8 bytes of the frames' payloads."""
    batches_sent: int = 0
    closed_slow: int = 0
    requests: int = 0
    errors_sent: int = 0


def utf8_len(text: str) -> int:
    """The UTF-8 length of ``text``; str.isascii() is O(1) in CPython, so ASCII is not encoded."""
    return len(text) if text.isascii() else len(text.encode())


def frame_chars(max_unsent_bytes: int) -> int:
    """The most characters a batch or chunk frame should hold: small enough to fit beside
    what a slow client may leave unread, so the gate (and a close frame) still work."""
    return max(1024, max_unsent_bytes // 4)


def peek_string_field(data: str | bytes, field: str) -> str | None:
    """A top-level string ``field`` of a JSON frame without decoding it, if it appears in the
    first 512 characters before any nested value; else None. Cheap: for answering a request
    refused before decoding."""
    if not isinstance(data, str):
        return None
    head = data[:512]
    nested = min((i for i in (head.find("{", 1), head.find("[")) if i >= 0), default=len(head))
    found = re.compile(rf'"{re.escape(field)}"\s*:\s*"([^"\\]{{1,256}})"').search(head, 0, nested)
    return found.group(1) if found else None


class UserBuckets:
    """One token bucket per user (the HTTP listener's rate limit), at most ``max_users``
    tracked: past it, the users whose buckets have refilled are forgotten (they lose
    nothing); if every bucket is still in use, the one tracked longest is forgotten (that
    user starts again with a full bucket: at most ``burst`` more requests)."""

    def __init__(self, rate: float, burst: int, *, max_users: int) -> None:
        self._rate = rate
        self._burst = burst
        self._max_users = max_users
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, user: str) -> bool:
        """Take one of the user's tokens if there is one."""
        bucket = self._buckets.get(user)
        if bucket is None:
            if len(self._buckets) >= self._max_users:
                self._buckets = {u: b for u, b in self._buckets.items() if not b.full()}
            if len(self._buckets) >= self._max_users:
                del self._buckets[next(iter(self._buckets))]
            bucket = self._buckets[user] = TokenBucket(self._rate, self._burst)
        return bucket.take()

    def __len__(self) -> int:
        return len(self._buckets)


class Session:
    """One WebSocket client: its close request, rate limit, strikes and send path.

    ``run(serve)`` runs the protocol's ``serve`` inside the session's cancel scope and closes
    the socket after it; ``close_soon`` ends it from anywhere.
    """

    def __init__(
        self,
        ws: ServerWebSocket,
        limits: ConnectionLimits,
        stats: ConnectionStats,
        *,
        conn_id: str,
        sock: trio.socket.SocketType | None,
        slow_reason: str,
    ) -> None:
        self.ws = ws
        self.limits = limits
        self.stats = stats
        self.conn_id = conn_id
        self.gate = SocketGate(sock, max_unsent_bytes=limits.max_unsent_bytes)
        self.frame_chars = frame_chars(limits.max_unsent_bytes)
        self._slow_reason = slow_reason
        self._scope = trio.CancelScope()
        self._close_request: Close | None = None
        self._bucket = TokenBucket(limits.rate_per_s, limits.rate_burst)
        self._strikes = 0

    # -- closing ------------------------------------------------------------------------

    def close_soon(self, code: int, reason: str) -> None:
        """Ask the session to close with ``code`` (the first request wins). Returns at once."""
        if self._close_request is None:
            self._close_request = Close(code, reason)
        self._scope.cancel()

    async def run(self, serve: Callable[[], Awaitable[None]]) -> None:
        """Run ``serve`` until it returns, raises ``Close`` or the session is closed; then
        close the socket with the code asked for (1000 if none), within ``close_timeout``.
        Never raises for the client's faults.

        Cancellation: the socket is closed all the same (shielded, bounded)."""
        try:
            with self._scope:
                await serve()
        except Close as exc:
            self.close_soon(exc.code, exc.reason)
        except ConnectionClosed:
            return  # the client left; nothing more to send
        close = self._close_request or Close(1000, "")
        with trio.move_on_after(self.limits.close_timeout) as scope:
            scope.shield = True
            with contextlib.suppress(ConnectionClosed):
                await self.ws.aclose(close.code, close.reason)

    # -- requests -----------------------------------------------------------------------

    def charge(self) -> bool:
        """Count a request and take a token for it; False when the client is over its rate.
        Call before decoding the request."""
        self.stats.requests += 1
        return self._bucket.take()

    def strike(self) -> bool:
        """Count a refused request; True once the client has passed ``abuse_limit``."""
        self._strikes += 1
        return self._strikes > self.limits.abuse_limit

    # -- sending ------------------------------------------------------------------------

    async def send(self, text: str, *, gated: bool = True) -> None:
        """Send one frame: ``gated``, only once the socket keeps up; always within
        ``send_timeout``. Raises ``Close`` (4429) for a client that stays behind for
        ``slow_client_timeout`` or does not take the frame in time (the frame may be cut, so
        no close frame can follow), ``ConnectionClosed`` if it left.

        Cancellation: the frame may be cut; end the session."""
        if gated and not await self.gate.wait_keeps_up(self.limits.slow_client_timeout):
            self.stats.closed_slow += 1
            log.info("conn %s: client too slow, closing 4429", self.conn_id)
            raise Close(4429, self._slow_reason)
        # Streamed frames compress; replies go plain (few, and an idle connection allocates
        # no compressor for its welcome).
        if not await send_text(self.ws, text, self.limits.send_timeout, compress=gated):
            self.stats.closed_slow += 1
            log.info(
                "conn %s: a frame did not go out within %gs: %s",
                self.conn_id,
                self.limits.send_timeout,
                text[:60],
            )
            raise Close(4429, self._slow_reason)
        self.stats.frames_sent += 1
        self.stats.bytes_sent += utf8_len(text)
