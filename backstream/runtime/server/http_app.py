"""The ASGI app of the HTTP listener: routing, auth, limits, errors in OpenAI's shape.

Routes: ``/healthz``, ``/readyz``, ``/metrics`` (unless metrics have a port of their own),
the Responses API under ``/v1/responses`` (``responses_http``), and static routes given by the
caller (exact paths, GET and HEAD; e.g. the browser client and the demo page of ``web_assets``).
Everything else is a 404 in OpenAI's error shape.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import socket as stdlib_socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

import attrs
import trio

from backstream.actors.seats import STREAMS
from backstream.protocol.codec import ProtocolError, loads_checked
from backstream.protocol.errors import (
    BackstreamError,
    BadRequestError,
    NotFoundError,
    RateLimitedError,
    TooLargeError,
    UnauthorizedError,
)
from backstream.protocol.responses_sse import error_body
from backstream.runtime.api import Runtime
from backstream.runtime.server.auth import Authenticator, Identity
from backstream.runtime.server.http_gzip import MIN_GZIP_BYTES, GzipStream, accepts_gzip, gzip_body
from backstream.runtime.server.listeners import PeerStreams
from backstream.runtime.server.session import UserBuckets
from backstream.runtime.server.socket_gate import SocketGate

__all__ = [
    "HttpApp",
    "HttpLimits",
    "HttpStatistics",
    "Request",
    "StaticReply",
    "StaticRoute",
    "StreamSocket",
    "error_response",
    "send_body",
]

log = logging.getLogger("backstream.http")

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
StaticReply = tuple[int, str, bytes] | tuple[int, str, bytes, Mapping[str, str]]
"""(status, content type, body), and optionally more headers."""
StaticRoute = Callable[[], Awaitable[StaticReply]]
"""A GET (and HEAD) route."""

_TYPE_OF_STATUS = {
    401: "authentication_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


@attrs.frozen(kw_only=True)
class HttpLimits:
    max_body_bytes: int = 1024 * 1024
    body_timeout: float = 10.0
    rate_per_s: float = 20.0
    """Requests per second one user may make on average (token bucket)..."""
    rate_burst: int = 40
    """...and in a burst."""
    max_streams_per_user: int = 64
    """Open event streams and requests waiting for a job, per user, on every instance."""
    send_timeout: float = 10.0
    """Every write of a stream must be taken by the socket within this."""
    slow_client_timeout: float = 10.0
    max_unsent_bytes: int = 256 * 1024
    """A stream whose socket holds more unsent for ``slow_client_timeout`` is cut."""
    max_tracked_users: int = 10_000
    sse_keepalive: float = 15.0
    """A stream silent this long gets a comment line (``: keep-alive``): proxies and load
    balancers cut connections idle for about a minute."""
    gzip_window_bits: int | None = 10
    """gzip for clients that accept it (``http_gzip``), event streams compressing with this
    window (9 to 15 bits); None: never."""


@attrs.frozen
class HttpStatistics:
    """A snapshot of one HTTP app's counters."""

    requests: int
    errors_sent: int
    streams_open: int
    """Event streams and requests waiting for a job, open on this app."""
    streams_cut: int
    """Streams ended because their client did not read in time."""
    bytes_sent: int = 0
    """UTF-8 bytes of the streams' bodies."""


class StreamSocket:
    """The socket under one request: whether it keeps up (the session core's ``SocketGate``,
    as on the WebSocket front doors), the paced send path of a stream, and a way to cut it."""

    def __init__(self, sock: trio.socket.SocketType | None, *, max_unsent_bytes: int) -> None:
        self._sock = sock
        self.gate = SocketGate(sock, max_unsent_bytes=max_unsent_bytes)
        self.cut = False
        self.last_write = trio.current_time()
        """When the stream last wrote (trio time): its keep-alive counts from here."""
        self._send_lock = trio.Lock()  # the events and the keep-alive share the stream
        self.gzip: GzipStream | None = None
        """Set when the stream's body is gzip'd: each chunk is compressed in the order it is sent."""

    async def send_chunk(self, send: Send, body: bytes, *, send_timeout: float, patience: float) -> bool:
        """Write one chunk of a streamed body once the socket keeps up, within ``send_timeout``;
        a client behind for ``patience`` seconds, or a write past its deadline, is cut off.
        False if the stream was cut (the client resumes).

        Cancellation: the write may be cut; the stream cannot go on. A gzip'd chunk once
        compressed is written whole (at most ``send_timeout``) before a cancellation lands."""
        async with self._send_lock:
            if self.cut:
                return False
            if not await self.gate.wait_keeps_up(patience):
                log.info("a stream's client is too slow: cut off (it can resume)")
                self.shut()
                return False
            await trio.lowlevel.checkpoint_if_cancelled()  # a stream being ended writes no more
            if self.gzip is None:
                return await self._send_body(send, body, send_timeout)
            # Once compressed, the chunk is part of the gzip stream: it goes out whole (within
            # send_timeout) even while the stream is being cancelled, or the client's check of
            # the trailer would fail.
            sent = False
            with trio.CancelScope(shield=True):
                sent = await self._send_body(send, self.gzip.chunk(body), send_timeout)
            return sent

    async def _send_body(self, send: Send, body: bytes, send_timeout: float) -> bool:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._cut_after, send_timeout)
            await send({"type": "http.response.body", "body": body, "more_body": True})
            nursery.cancel_scope.cancel()
        self.last_write = trio.current_time()
        return not self.cut

    async def _cut_after(self, seconds: float) -> None:
        await trio.sleep(seconds)
        log.info("a stream write did not go out within %gs: cut off", seconds)
        self.shut()

    def last_chunk(self) -> bytes:
        """What ends the stream's body: the gzip trailer, or nothing."""
        return self.gzip.end() if self.gzip is not None else b""

    def shut(self) -> None:
        """Cut the connection: a write in progress fails at once, the client sees it end."""
        self.cut = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(stdlib_socket.SHUT_RDWR)


@attrs.define
class Request:
    scope: dict[str, Any]
    receive: Receive
    send: Send
    socket: StreamSocket
    identity: Identity | None = None

    @property
    def method(self) -> str:
        return str(self.scope["method"])

    @property
    def path(self) -> str:
        return str(self.scope["path"])

    @property
    def user(self) -> str:
        assert self.identity is not None
        return self.identity.user

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode()
        for key, value in self.scope.get("headers", []):
            if key.lower() == wanted:
                return bytes(value).decode("latin-1")
        return None

    def query(self, name: str) -> str | None:
        values = parse_qs(bytes(self.scope.get("query_string", b"")).decode("latin-1")).get(name)
        return values[-1] if values else None

    async def raw_body(self, limit: int, timeout: float) -> bytes:
        """The body's bytes. Raises ``TooLargeError`` past ``limit``, ``BadRequestError`` when late.

        Cancellation: what was read is dropped; the request cannot be read again."""
        chunks, size = [], 0
        with trio.move_on_after(timeout) as waited:
            while True:
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise TooLargeError(f"the request body exceeds {limit} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        if waited.cancelled_caught:
            raise BadRequestError("the request body did not arrive in time")
        return b"".join(chunks)

    async def json_body(self, limit: int, timeout: float) -> Any:
        """The body as JSON, checked as WebSocket frames are (``codec.loads_checked``): nested
        at most 64 levels, numbers finite, lone surrogates repaired to U+FFFD. Raises
        ``TooLargeError`` past ``limit``, ``BadRequestError`` when bad (also text that is not
        UTF-8, -16 or -32, as RFC 8259 allows) or late.

        Cancellation: what was read is dropped; the request cannot be read again."""
        data = await self.raw_body(limit, timeout)
        try:
            # Strict: encoded surrogates are not text (json.loads of bytes would let them pass).
            text = data.decode(json.detect_encoding(data))
        except (UnicodeDecodeError, LookupError):
            raise BadRequestError("the request body is not valid JSON text (UTF-8)") from None
        try:
            return loads_checked(text, what="the request body")
        except ProtocolError as exc:
            raise BadRequestError(exc.message) from None


class _ClientGone(Exception):
    """The client left before its request was read."""


async def send_body(
    send: Send, status: int, content_type: str, body: bytes, headers: Mapping[str, str] | None = None
) -> None:
    """A whole response. Cancellation: the response may be cut; the connection cannot go on."""
    head = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    head += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def error_response(exc: BackstreamError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """HTTP status, OpenAI-shaped body and headers for a typed error."""
    status = exc.http_status
    headers: dict[str, str] = {}
    retry_ms = exc.extra.get("retry_after_ms")
    if isinstance(retry_ms, int):
        headers["retry-after"] = str(max(1, math.ceil(retry_ms / 1000)))
        headers["retry-after-ms"] = str(retry_ms)
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    if status == 413:
        headers["connection"] = "close"  # the rest of the body is not read: the connection cannot go on
    param = exc.extra.get("param")
    body = error_body(
        exc.message,
        kind=_TYPE_OF_STATUS.get(status, "invalid_request_error"),
        code=exc.code,
        param=param if isinstance(param, str) else None,
    )
    return status, body, headers


Handler = Callable[[Request, re.Match[str]], Awaitable[None]]


class HttpApp:
    """An ASGI app. ``closing`` is set at shutdown: streams end so clients resume elsewhere."""

    def __init__(
        self,
        runtime: Runtime,
        authenticator: Authenticator | None,
        *,
        limits: HttpLimits | None = None,
        status_routes: Mapping[str, StaticRoute] | None = None,
        static_routes: Mapping[str, StaticRoute] | None = None,
        allow_origins: tuple[str, ...] = (),
    ) -> None:
        self.runtime = runtime
        self.limits = limits or HttpLimits()
        self._auth = authenticator
        self.status_routes = dict(status_routes or {})
        # Static assets (e.g. a demo page and its script) go here: exact path -> GET route.
        self._static_routes = dict(static_routes or {})
        self._allow_origins = allow_origins
        self._api: list[tuple[str, re.Pattern[str], Handler, bool]] = []
        self._self_authenticating: set[Handler] = set()
        self._buckets = UserBuckets(
            self.limits.rate_per_s, self.limits.rate_burst, max_users=self.limits.max_tracked_users
        )
        self._open_streams = 0  # here; the per-user count is the store's (``stream_slot``)
        self._requests = 0
        self._errors_sent = 0
        self._streams_cut = 0
        self._bytes_sent = 0
        self.closing = trio.Event()
        self.peer_streams = PeerStreams()
        """The streams the server accepts for this app, by peer: how a request finds its socket."""

    def route(
        self,
        method: str,
        pattern: str,
        handler: Handler,
        *,
        rate_limited: bool = True,
        self_authenticating: bool = False,
    ) -> None:
        """An authenticated API route; ``pattern`` is a regular expression over the path.
        A ``self_authenticating`` handler authenticates, limits and answers preflights itself."""
        self._api.append((method, re.compile(pattern), handler, rate_limited))
        if self_authenticating:
            self._self_authenticating.add(handler)

    @contextlib.asynccontextmanager
    async def stream_slot(self, user: str) -> AsyncIterator[None]:
        """Hold one of the user's ``max_streams_per_user`` open streams for the block: an
        event stream, or a request that waits for a job. Counted in the store, so across
        every instance that shares it. Raises ``RateLimitedError`` when all are held.

        Cancellation: the slot is released (shielded, bounded; else it lapses with its lease)."""
        async with self.runtime.seats.hold(user, STREAMS, self.limits.max_streams_per_user):
            self._open_streams += 1
            try:
                yield
            finally:
                self._open_streams -= 1

    async def send_stream_chunk(self, request: Request, body: bytes) -> bool:
        """Write one chunk of a stream's body through the request's ``StreamSocket`` (gated,
        with a deadline); False, and counted, if the client was cut off for not reading.

        Cancellation: the write may be cut; the stream cannot go on."""
        limits = self.limits
        sent = await request.socket.send_chunk(
            request.send, body, send_timeout=limits.send_timeout, patience=limits.slow_client_timeout
        )
        if not sent:
            self._streams_cut += 1
            return False
        self._bytes_sent += len(body)
        return True

    def statistics(self) -> HttpStatistics:
        return HttpStatistics(
            requests=self._requests,
            errors_sent=self._errors_sent,
            streams_open=self._open_streams,
            streams_cut=self._streams_cut,
            bytes_sent=self._bytes_sent,
        )

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """Serve one ASGI request; errors become replies in OpenAI's shape.

        Cancellation (the server stopping): the request ends where it is; jobs go on."""
        if scope["type"] == "lifespan":
            return  # nothing to start or stop: the runtime lives around the server
        if scope["type"] != "http":
            return
        stream = self.peer_streams.get(scope.get("client"))
        sock = StreamSocket(stream.socket if stream else None, max_unsent_bytes=self.limits.max_unsent_bytes)
        request = Request(scope, receive, send, sock)
        self._requests += 1
        try:
            await self._dispatch(request)
        except _ClientGone:
            pass
        except BackstreamError as exc:
            self._errors_sent += 1
            status, body, headers = error_response(exc)
            await self.send_json(request, status, body, headers)
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            self._errors_sent += 1
            body = error_body("the server failed on this request", kind="server_error", code="internal")
            await self.send_json(request, 500, body)

    async def _dispatch(self, request: Request) -> None:
        path, method = request.path, request.method
        route = self.status_routes.get(path) or self._static_routes.get(path)
        if route is not None:
            if method not in ("GET", "HEAD"):
                raise _MethodNotAllowed()
            reply = await route()
            headers = reply[3] if len(reply) == 4 else None
            status, kind, body = reply[:3]
            # For HEAD the server leaves the body out (ASGI servers suppress it) and the
            # content-length stays the GET's.
            await send_body(request.send, status, kind, body, headers)
            return
        origin = request.header("origin")
        if origin is not None and self._allow_origins and origin not in self._allow_origins:
            await self.send_json(
                request, 403, error_body("origin not allowed", kind="invalid_request_error", code="forbidden")
            )
            return
        matched_path = False
        for route_method, pattern, handler, rate_limited in self._api:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            matched_path = True
            if handler in self._self_authenticating:
                if route_method == method or method == "OPTIONS":
                    await handler(request, match)
                    return
                continue
            if method == "OPTIONS":
                await self._preflight(request)
                return
            if route_method != method:
                continue
            request.identity = self._authenticate(request)
            if rate_limited:
                self._take_token(request.user)
            await handler(request, match)
            return
        if matched_path:
            raise _MethodNotAllowed()
        raise NotFoundError(f"no route for {method} {path}")

    def _authenticate(self, request: Request) -> Identity:
        if self._auth is None:
            raise UnauthorizedError("authentication is not configured")
        authorization = request.header("authorization") or ""
        token = authorization[7:].strip() if authorization.lower().startswith("bearer ") else None
        if token is None and request.method == "GET":
            token = request.query("access_token")  # RFC 6750 2.3: for EventSource, which sends no headers
        if not token:
            raise UnauthorizedError("an Authorization: Bearer token is required")
        return self._auth.authenticate(token)

    def _take_token(self, user: str) -> None:
        if not self._buckets.take(user):
            rate = self.limits.rate_per_s
            raise RateLimitedError("too many requests; slow down", retry_after_ms=int(1000 / rate) + 1)

    async def _preflight(self, request: Request) -> None:
        headers = {
            "access-control-allow-methods": "GET, POST, OPTIONS",
            "access-control-allow-headers": "authorization, content-type, last-event-id, openai-beta, "
            "x-stainless-arch, x-stainless-lang, x-stainless-os, x-stainless-package-version, "
            "x-stainless-runtime, x-stainless-runtime-version, x-stainless-retry-count",
            "access-control-max-age": "600",
            **self.cors_headers(request),
        }
        head = [(k.encode(), v.encode()) for k, v in headers.items()]
        await request.send({"type": "http.response.start", "status": 204, "headers": head})
        await request.send({"type": "http.response.body", "body": b""})

    def cors_headers(self, request: Request) -> dict[str, str]:
        origin = request.header("origin")
        if not origin:
            return {}
        # Link: a job's durable stream, named on the Responses API's replies.
        return {
            "access-control-allow-origin": origin,
            "access-control-expose-headers": "link",
            "vary": "origin",
        }

    def _gzip_wanted(self, request: Request) -> bool:
        return self.limits.gzip_window_bits is not None and accepts_gzip(request.header("accept-encoding"))

    def stream_headers(self, request: Request) -> dict[str, str]:
        """The headers of an event stream for ``request``: CORS, and gzip when the client
        accepts it (from here on, ``send_stream_chunk`` compresses every chunk)."""
        headers = self.cors_headers(request)
        if self._gzip_wanted(request):
            assert self.limits.gzip_window_bits is not None
            request.socket.gzip = GzipStream(self.limits.gzip_window_bits)
            headers = {**headers, **_GZIP_HEADERS, "vary": _vary(headers)}
        return headers

    async def send_json(
        self, request: Request, status: int, body: Any, headers: Mapping[str, str] | None = None
    ) -> None:
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        more = {**(headers or {}), **self.cors_headers(request)}
        if self.limits.gzip_window_bits is not None:  # the reply's encoding follows the request's
            more["vary"] = _vary(more)
        if len(data) >= MIN_GZIP_BYTES and self._gzip_wanted(request):
            data = gzip_body(data)
            more.update(_GZIP_HEADERS)
        try:
            await send_body(request.send, status, "application/json", data, more)
        except Exception:  # the response had started, or the client left: nothing more to say
            log.debug("HTTP %s %s: could not send the reply", request.method, request.path)


_GZIP_HEADERS = {"content-encoding": "gzip"}


def _vary(headers: Mapping[str, str]) -> str:
    """The ``vary`` of a reply whose encoding follows ``Accept-Encoding``."""
    return ", ".join(dict.fromkeys(filter(None, (headers.get("vary"), "accept-encoding"))))


class _MethodNotAllowed(BackstreamError):
    code = "method_not_allowed"
    http_status = 405

    def __init__(self) -> None:
        super().__init__("method not allowed")
