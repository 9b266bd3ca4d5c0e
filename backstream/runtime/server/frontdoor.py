"""The WebSocket front door: accepts clients at ``/v1`` (and the AI SDK's at ``/v1/ai-sdk``)
and runs a connection actor for each.

A thin I/O shell: the handshake checks (path, Origin, an optional
``Authorization: Bearer`` header; for ``/v1/ai-sdk`` also a ``token`` query
parameter or the configured cookie) happen here, everything after in
``server.connection`` and ``server.ai_sdk``. ``/v1/ai-sdk`` without valid
credentials is accepted only to be closed 4401 after the client's first frame
(unread), so that a page can read why (``/v1`` says so in answer to its ``hello``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import ssl
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs

import attrs
import trio
from trio_websocket import ConnectionClosed, Endpoint

from backstream.actors.seats import CONNECTIONS
from backstream.protocol.codec import ProtocolError
from backstream.protocol.errors import BackstreamError, UnauthorizedError
from backstream.protocol.ui_messages import coalesce_ms_of
from backstream.runtime.api import Runtime
from backstream.runtime.server.ai_sdk import AiSdkConnection
from backstream.runtime.server.auth import Authenticator, Identity
from backstream.runtime.server.connection import MAX_HELLO_BYTES, Connection
from backstream.runtime.server.deflate import DeflateSettings
from backstream.runtime.server.frames import FrameCache
from backstream.runtime.server.heartbeat import Heartbeat
from backstream.runtime.server.listeners import PeerStreams, TrackedListener, open_tcp_listener
from backstream.runtime.server.peer import seat_refusal
from backstream.runtime.server.session import ConnectionLimits, ConnectionStats
from backstream.runtime.server.websocket import ServerWebSocket
from backstream.runtime.server.wsserver import HandshakeRequest, WebSocketServer

__all__ = ["FrontDoor", "FrontDoorConfig"]

log = logging.getLogger("backstream.frontdoor")

UNAUTHORIZED_REASON = "unauthorized: a valid token is required (?token= or the auth cookie)"
"""The close reason of an ``/v1/ai-sdk`` connection without valid credentials (code 4401)."""


@attrs.frozen(kw_only=True)
class FrontDoorConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    path: str = "/v1"
    ai_sdk_path: str = "/v1/ai-sdk"
    """Where the Vercel AI SDK's ``WebSocketChatTransport`` connects."""
    auth_cookie: str | None = None
    """A cookie whose value is a token, for browsers on ``ai_sdk_path`` (besides ``?token=``).
    Accepted only on a handshake whose Origin is in ``allow_origins`` (else HTTP 403): a page
    on another site can make the browser send the cookie, but not forge its Origin."""
    default_model: str = "backstream/echo"
    """The model of an AI SDK request whose body names none."""
    ai_sdk_coalesce_ms: int = 0
    """Milliseconds between text frames of an AI SDK request when its URL gives no
    ``coalesce_ms``; 0 sends one chunk per log entry, numbered the same on every replay."""
    allow_origins: tuple[str, ...] = ()
    """Exact Origin values browsers may connect from; empty allows any. No Origin header
    (a non-browser client) is always allowed, except to authenticate by ``auth_cookie``."""
    limits: ConnectionLimits = attrs.field(factory=ConnectionLimits)
    deflate: DeflateSettings | None = attrs.field(factory=DeflateSettings)
    """permessage-deflate for clients that offer it (browsers always do); None: never."""
    socket_send_buffer: int = 1024 * 1024
    """SO_SNDBUF of client sockets: with ``max_unsent_bytes`` below it, a close frame always fits."""
    handshake_timeout: float = 10.0
    ssl_context: ssl.SSLContext | None = attrs.field(default=None, eq=False)
    reuse_port: bool = False


@attrs.frozen
class _Admitted:
    """A handshake that passed: which endpoint, and who (if the handshake said)."""

    ai_sdk: bool
    identity: Identity | None
    coalesce_ms: int = 0


@attrs.frozen
class FrontDoorStatistics:
    connections: int
    frames_sent: int
    bytes_sent: int
    batches_sent: int
    closed_slow: int
    requests: int
    errors_sent: int


class FrontDoor:
    """Start with ``await nursery.start(front_door.run)``; ``port`` is then bound."""

    def __init__(
        self,
        runtime: Runtime,
        authenticator: Authenticator,
        config: FrontDoorConfig,
        *,
        features: dict[str, Any] | None = None,
        version: str = "0",
    ) -> None:
        self._runtime = runtime
        self._auth = authenticator
        self.config = config
        self._features = features or {
            "tools": runtime.tools.names(),
            "approvals": True,
            "notifications": True,
        }
        self._version = version
        self._counters = ConnectionStats()
        self.frames = FrameCache()
        """The watchers of a job on any of this front door's connections share its frames."""
        self.connections: set[Connection | AiSdkConnection] = set()
        self._streams = PeerStreams()
        self._ids = itertools.count(1)
        self._heartbeat = Heartbeat(config.limits.ping_interval, config.limits.idle_timeout)
        self._listen_scope = trio.CancelScope()
        self._idle = trio.Event()
        self._idle.set()
        self.port = 0

    def statistics(self) -> FrontDoorStatistics:
        c = self._counters
        return FrontDoorStatistics(
            connections=len(self.connections),
            frames_sent=c.frames_sent,
            bytes_sent=c.bytes_sent,
            batches_sent=c.batches_sent,
            closed_slow=c.closed_slow,
            requests=c.requests,
            errors_sent=c.errors_sent,
        )

    async def run(
        self,
        *,
        listener: trio.SocketListener | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections until ``stop_accepting``; then wait for the open ones to end.
        ``listener``: a socket already bound (``serve`` binds before it opens the store);
        without it, one is bound on ``config.host:config.port``. Either is closed at the end.

        Cancellation: stops accepting and cancels every connection; jobs go on in the runtime.
        """
        listeners = [
            listener
            or await open_tcp_listener(
                self.config.host,
                self.config.port,
                reuse_port=self.config.reuse_port,
                send_buffer=self.config.socket_send_buffer,
            )
        ]
        self.port = listeners[0].socket.getsockname()[1]
        tracked: list[Any] = [
            TrackedListener(listener, self._streams, ssl_context=self.config.ssl_context)
            for listener in listeners
        ]
        async with trio.open_nursery() as heartbeat:
            await heartbeat.start(self._heartbeat.run)
            async with trio.open_nursery() as handlers:
                server = WebSocketServer(
                    self._handle,
                    tracked,
                    handler_nursery=handlers,
                    max_message_size=self.config.limits.max_message_bytes,
                    connect_timeout=self.config.handshake_timeout,
                    disconnect_timeout=self.config.limits.close_timeout,
                    send_timeout=self.config.limits.send_timeout,
                    first_message_cap=self._first_message_cap,
                    deflate=self.config.deflate,
                )
                with self._listen_scope:
                    await server.run(task_status=task_status)
                for listener in listeners:
                    await listener.aclose()
            heartbeat.cancel_scope.cancel()  # every connection has ended

    def _first_message_cap(self, target: str) -> int | None:
        """The hello of ``/v1`` is read before authentication: it gets ``MAX_HELLO_BYTES``.
        ``/v1/ai-sdk`` authenticates in the handshake, so its first frame gets the full limit."""
        return None if target.partition("?")[0] == self.config.ai_sdk_path else MAX_HELLO_BYTES

    def stop_accepting(self) -> None:
        self._listen_scope.cancel()

    def close_all(self, code: int, reason: str) -> None:
        for connection in list(self.connections):
            connection.close_soon(code, reason)

    async def wait_closed(self) -> None:
        """Wait until every connection has ended.

        Cancellation: safe.
        """
        await self._idle.wait()

    async def _handle(self, request: HandshakeRequest) -> None:
        admitted = await self._admit(request)
        if admitted is None:
            return
        ws = await request.accept()
        remote = request.remote
        del request  # nothing of the handshake is needed from here on: its memory goes
        stream = self._streams.pop((remote.address, remote.port)) if isinstance(remote, Endpoint) else None
        sock = stream.socket if stream is not None else None
        conn_id = f"c{next(self._ids)}"
        if admitted.ai_sdk:
            assert admitted.identity is not None
            ai_sdk = AiSdkConnection(
                ws,
                self._runtime,
                admitted.identity,
                self.config.limits,
                self._counters,
                conn_id=conn_id,
                default_model=self.config.default_model,
                sock=sock,
                coalesce_ms=admitted.coalesce_ms,
            )
            await self._run_seated(ws, ai_sdk, admitted.identity.user)
            return
        connection = Connection(
            ws,
            self._runtime,
            self._auth,
            self.config.limits,
            self._counters,
            conn_id=conn_id,
            sock=sock,
            header_identity=admitted.identity,
            features=self._features,
            server_version=self._version,
            frames=self.frames,
        )
        await self._run(connection, conn_id, ws)

    async def _admit(self, request: HandshakeRequest) -> _Admitted | None:
        """Check the handshake (path, origin, credentials); reject it and return None, or say
        which endpoint and user it is for."""
        path, _, query = request.path.partition("?")
        if path not in (self.config.path, self.config.ai_sdk_path):
            await request.reject(404, body=b"not found")
            return None
        headers = {name.lower(): value for name, value in request.headers}
        origin = headers.get(b"origin")
        allowed = self.config.allow_origins
        if origin is not None and allowed and origin.decode("latin-1") not in allowed:
            await request.reject(403, body=b"origin not allowed")
            return None
        header_identity: Identity | None = None
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        if authorization.lower().startswith("bearer "):
            try:
                header_identity = self._auth.authenticate(authorization[7:].strip())
            except UnauthorizedError:
                header_identity = None  # hello without a token will be refused
        if path != self.config.ai_sdk_path:
            return _Admitted(ai_sdk=False, identity=header_identity)
        # Browsers cannot send headers here: the token comes in the URL or a cookie.
        identity = self._query_identity(query) or header_identity
        if identity is None:
            identity = self._cookie_identity(headers)
            # Any page can make the browser send the cookie (cross-site WebSocket hijacking):
            # it counts only from an Origin the operator listed.
            if identity is not None and not self._origin_listed(origin):
                await request.reject(403, body=b"the auth cookie is accepted only from an allowed Origin")
                return None
        if identity is None:
            await self._refuse_after_upgrade(request, 4401, UNAUTHORIZED_REASON)
            return None
        try:
            coalesce_ms = coalesce_ms_of(query, self.config.ai_sdk_coalesce_ms)
        except ProtocolError as exc:
            await request.reject(400, body=exc.message.encode())
            return None
        return _Admitted(ai_sdk=True, identity=identity, coalesce_ms=coalesce_ms)

    async def _run_seated(self, ws: ServerWebSocket, connection: AiSdkConnection, user: str) -> None:
        """Run an AI SDK connection, whose user the handshake named, while it holds one of the
        user's connections (on any instance); refused, it is closed 4409 (1013 if the store is
        away) before it is served. ``/v1`` takes its seat after ``hello`` (``Connection``)."""
        limits = self.config.limits
        async with contextlib.AsyncExitStack() as seated:
            try:
                await seated.enter_async_context(
                    self._runtime.seats.hold(user, CONNECTIONS, limits.max_connections_per_user)
                )
            except BackstreamError as exc:
                refusal = seat_refusal(exc)
                log.info("conn %s: refused: %s", connection.conn_id, refusal.reason)
                await self._close_after_first_frame(ws, refusal.code, refusal.reason)
                return
            await self._run(connection, connection.conn_id, ws)

    async def _refuse_after_upgrade(self, request: HandshakeRequest, code: int, reason: str) -> None:
        """Accept the handshake only to close the socket with ``code`` and ``reason``: a
        browser's WebSocket reports a refused handshake as a bare error (close 1006), while a
        close code and reason reach the page. The close waits for the client's first frame
        (within ``handshake_timeout``; at most ``MAX_HELLO_BYTES``, discarded unread): the AI
        SDK's transport sends its request as soon as the socket opens, and a socket closed
        before that fails the request as "not open" instead of with the close.

        Cancellation: the socket is dropped."""
        request.cap_first_message(MAX_HELLO_BYTES)
        await self._close_after_first_frame(await request.accept(), code, reason)

    async def _close_after_first_frame(self, ws: ServerWebSocket, code: int, reason: str) -> None:
        """Close ``ws`` with ``code`` and ``reason`` once its first frame came (discarded
        unread) or ``handshake_timeout`` passed: see ``_refuse_after_upgrade``.

        Cancellation: the socket is dropped."""
        with trio.move_on_after(self.config.handshake_timeout), contextlib.suppress(ConnectionClosed):
            await ws.get_message()
        with trio.move_on_after(self.config.limits.close_timeout), contextlib.suppress(ConnectionClosed):
            await ws.aclose(code, reason)

    async def _run(self, connection: Connection | AiSdkConnection, conn_id: str, ws: ServerWebSocket) -> None:
        self.connections.add(connection)
        self._idle = trio.Event() if len(self.connections) == 1 else self._idle
        beat = self._heartbeat.add(ws, connection.close_soon)
        try:
            await connection.run()
        except Exception:
            log.exception("conn %s: connection failed", conn_id)
        finally:
            self._heartbeat.remove(beat)
            self.connections.discard(connection)
            if not self.connections:
                self._idle.set()

    def _query_identity(self, query: str) -> Identity | None:
        """The user of the URL's ``token`` parameter; None if none is given or valid."""
        for token in parse_qs(query).get("token", []):
            try:
                return self._auth.authenticate(token)
            except UnauthorizedError:
                continue
        return None

    def _cookie_identity(self, headers: dict[bytes, bytes]) -> Identity | None:
        """The user of the configured auth cookie; None if it is not set, given or valid.
        Only for a handshake whose Origin is listed (``_origin_listed``)."""
        cookie_name = self.config.auth_cookie
        if not cookie_name or b"cookie" not in headers:
            return None
        with contextlib.suppress(CookieError):
            morsel = SimpleCookie(headers[b"cookie"].decode("latin-1")).get(cookie_name)
            if morsel is not None:
                try:
                    return self._auth.authenticate(morsel.value)
                except UnauthorizedError:
                    return None
        return None

    def _origin_listed(self, origin: bytes | None) -> bool:
        """Whether ``origin`` is one of ``allow_origins`` (never when that is empty, nor
        without an Origin header: a browser always sends one on a WebSocket)."""
        return origin is not None and origin.decode("latin-1") in self.config.allow_origins
