"""A lean HTTP/1.1 client for the upstream's long streamed responses, on h11 and trio.

A chat stream is thousands of tiny HTTP chunks. Through httpx each one passes
httpcore's connection and pool streams, exception-mapping context managers and
a cancel scope per read: about three times the instructions of reading and
parsing the bytes (callgrind, docs/performance.md). This client keeps HTTP
parsing in h11, reads up to 64 KiB at a time, and returns all the body bytes
one socket read delivered. It does what the upstream path needs and no more:
POST with a body to one origin, a bounded keep-alive pool, TLS with httpx's
default context, and timeouts for connecting, idle reads and writes.

Through a proxy (``proxies.ProxyURL``, from the environment as httpx reads it): to an
``http://`` origin, requests go to the proxy in absolute form, with the proxy's
``Proxy-Authorization``; to an ``https://`` origin, a ``CONNECT`` tunnel through the
proxy, then TLS with the origin inside it. Either way the pool keeps the connections.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import h11
import httpx
import trio

from backstream.protocol.chunked import ChunkedBody, ChunkedBodyError
from backstream.runtime.models.proxies import ProxyURL

__all__ = [
    "HTTP1Pool",
    "PoolStatistics",
    "StreamingResponse",
    "UpstreamBroken",
    "UpstreamConnectError",
    "UpstreamConnectTimeout",
    "UpstreamReadTimeout",
]

_READ_SIZE = 65536
_KEEPALIVE_EXPIRY = 5.0  # seconds an idle connection is kept for reuse


@attrs.frozen
class PoolStatistics:
    """A snapshot of a pool's connections: ``opened`` since the start, ``reused`` (an idle
    one taken for a request), ``kept`` (returned to the pool after a response), ``closed``,
    and ``idle`` now."""

    opened: int
    reused: int
    kept: int
    closed: int
    idle: int


class UpstreamConnectError(Exception):
    """No connection: refused, unresolvable, or the TLS handshake failed."""


class UpstreamConnectTimeout(UpstreamConnectError):
    """Connecting (TCP and TLS) took longer than the connect timeout."""


class UpstreamReadTimeout(Exception):
    """No byte arrived for the idle timeout."""


class UpstreamBroken(Exception):
    """The connection closed or broke mid-exchange, or the peer broke HTTP/1.1."""


@attrs.frozen
class _Origin:
    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> _Origin:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return cls(parts.scheme, parts.hostname, port, path)

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.authority if self.port != default else self.authority.rpartition(":")[0]

    @property
    def authority(self) -> str:
        """``host:port``, as a CONNECT request names its target."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def absolute(self) -> str:
        """The URL, as a request to a proxy names its target."""
        return f"{self.scheme}://{self.host_header}{self.path}"


class _Connection:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self.reused = False
        # Plain TCP: wait for readability, then one read(2) takes what the socket has.
        # (trio's receive_some first tries a read that usually finds nothing, then waits.)
        self.socket = stream.socket if isinstance(stream, trio.SocketStream) else None

    async def receive(self) -> bytes:
        """What the socket has, once it has something; ``b""`` at EOF. No deadline of its
        own: the caller bounds the wait.

        Cancellation: nothing was read."""
        try:
            if self.socket is None:
                return bytes(await self.stream.receive_some(_READ_SIZE))  # no copy: it is bytes
            while True:
                await trio.lowlevel.wait_readable(self.socket)
                try:
                    return os.read(self.socket.fileno(), _READ_SIZE)
                except BlockingIOError:
                    continue  # a spurious wake-up
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise UpstreamBroken(f"the upstream connection broke: {exc!r}") from None

    async def receive_within(self, seconds: float) -> bytes:
        """``receive``, raising ``UpstreamReadTimeout`` after ``seconds`` without a byte."""
        with trio.move_on_after(seconds):
            return await self.receive()
        raise UpstreamReadTimeout


class StreamingResponse:
    """The status, headers and body of one response, read as it arrives.

    The body's idle timeout is the deadline of one cancel scope around the whole body
    (``HTTP1Pool.stream_post`` holds it), pushed forward as bytes arrive rather than a
    cancel scope per read: at most once per ``slack`` seconds, to ``idle_timeout + slack``
    ahead, so a silent upstream times out between ``idle_timeout`` and ``idle_timeout +
    slack`` after its last byte.
    """

    def __init__(
        self, connection: _Connection, head: h11.Response, idle_timeout: float, idle_scope: trio.CancelScope
    ) -> None:
        self.status_code = head.status_code
        self.headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in head.headers}
        self._connection = connection
        self._idle_timeout = idle_timeout
        self._slack = min(1.0, idle_timeout / 10)
        self._idle_scope = idle_scope
        self.complete = False  # the whole body was read
        self._starved = False
        idle_scope.deadline = trio.current_time() + idle_timeout + self._slack
        # A chunked body (a stream's usual framing) is split by ChunkedBody rather than h11's
        # event machinery: several times fewer instructions per chunk. h11 parsed the head.
        self._chunked: ChunkedBody | None = None
        self._unparsed = b""
        # Decided here, not by h11: it never sees a chunked body's end (see below).
        self._keep_alive = _keeps_alive(head)
        parser = connection.h11
        if parser.their_state is h11.SEND_BODY and _is_chunked(head):
            self._chunked = ChunkedBody()
            self._unparsed = parser.trailing_data[0]

    def _push_deadline(self) -> None:
        now = trio.current_time()
        if self._idle_scope.deadline - now < self._idle_timeout:
            self._idle_scope.deadline = now + self._idle_timeout + self._slack

    async def _receive(self) -> bytes:
        data = await self._connection.receive()
        self._push_deadline()
        return data

    async def receive_some(self) -> bytes:
        """The body bytes that the next socket read brings (several HTTP chunks joined);
        ``b""`` at the end of the body. Raises ``UpstreamBroken`` if the connection breaks;
        an idle upstream cancels the body's scope (``stream_post`` raises
        ``UpstreamReadTimeout``).

        Cancellation: the connection is left mid-response; the pool closes it.
        """
        if self.complete:
            return b""
        if self._chunked is not None:
            return await self._receive_chunked(self._chunked)
        parser = self._connection.h11
        parts: list[bytes] = []
        if self._starved:  # h11 said NEED_DATA last time: read before asking it again
            self._starved = False
            parser.receive_data(await self._receive())
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamBroken(f"invalid HTTP from the upstream: {exc}") from None
            kind = type(event)
            if kind is h11.Data:
                parts.append(event.data)  # type: ignore[union-attr]
            elif event is h11.NEED_DATA:
                if parts:
                    self._starved = True
                    return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
                parser.receive_data(await self._receive())
            elif kind is h11.EndOfMessage:
                self.complete = True
                return b"".join(parts)
            else:  # ConnectionClosed or PAUSED mid-body
                raise UpstreamBroken(f"unexpected {event!r} in the response body")

    async def _receive_chunked(self, body: ChunkedBody) -> bytes:
        while True:
            if self._unparsed:
                data, self._unparsed = self._unparsed, b""
            else:
                data = await self._receive()
                if not data:
                    raise UpstreamBroken("the upstream closed the connection mid-body")
            try:
                out = body.feed(data)
            except ChunkedBodyError as exc:
                raise UpstreamBroken(f"invalid HTTP from the upstream: {exc}") from None
            if body.done:
                self.complete = True
                return out
            if out:
                return out

    @property
    def reusable(self) -> bool:
        """The whole response was read, nothing followed it, and the server keeps the
        connection open: it may serve another request."""
        if not self.complete or not self._keep_alive:
            return False
        if self._chunked is not None:
            return not self._chunked.leftover
        parser = self._connection.h11
        return parser.our_state is h11.DONE and parser.their_state is h11.DONE


def _is_chunked(head: h11.Response) -> bool:
    for name, value in head.headers:
        if name == b"transfer-encoding":
            return value.lower() == b"chunked"
    return False


def _keeps_alive(head: h11.Response) -> bool:
    """Whether the server keeps the connection after this response (RFC 9112, 9.3): not
    with ``Connection: close``, not from an HTTP/1.0 server (as h11 decides: it never
    keeps those), not when the body ends where the connection does (neither length nor
    chunked framing)."""
    if head.http_version != b"1.1":
        return False
    framed = head.status_code in (204, 304)
    for name, value in head.headers:
        if name == b"connection" and b"close" in (token.strip() for token in value.lower().split(b",")):
            return False
        if name in (b"content-length", b"transfer-encoding"):
            framed = True
    return framed


class HTTP1Pool:
    """Connections to one origin, through ``proxy`` if given: at most ``max_connections``
    in use (others wait, with no deadline of their own), at most ``max_keepalive`` idle
    ones kept for reuse."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float,
        idle_timeout: float,
        max_connections: int,
        max_keepalive: int,
        proxy: ProxyURL | None = None,
    ) -> None:
        self.origin = _Origin.parse(url)
        self.proxy = proxy
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._limiter = trio.CapacityLimiter(max_connections)
        self._idle: deque[_Connection] = deque()
        self._max_keepalive = max_keepalive
        self._ssl: ssl.SSLContext | None = None
        self._closed = False
        self._opened = self._reused = self._kept = self._closed_count = 0

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            opened=self._opened,
            reused=self._reused,
            kept=self._kept,
            closed=self._closed_count,
            idle=len(self._idle),
        )

    @asynccontextmanager
    async def stream_post(self, body: bytes, headers: dict[str, str]) -> AsyncIterator[StreamingResponse]:
        """POST ``body`` to the URL and yield the response once its head arrived.

        Raises ``UpstreamConnectError``/``UpstreamConnectTimeout`` (nothing sent),
        ``UpstreamBroken``, ``UpstreamReadTimeout``. A connection the server had
        closed while idle in the pool is replaced by a new one, once, silently.
        Cancellation: the connection is closed at once.
        """
        async with self._limiter:
            connection, head = await self._exchange(body, headers)
            response: StreamingResponse | None = None
            try:
                with trio.CancelScope() as idle_scope:
                    response = StreamingResponse(connection, head, self._idle_timeout, idle_scope)
                    yield response
            finally:
                self._release(connection, response is not None and response.reusable)
            if idle_scope.cancelled_caught:
                raise UpstreamReadTimeout

    async def _exchange(self, body: bytes, headers: dict[str, str]) -> tuple[_Connection, h11.Response]:
        origin, proxy = self.origin, self.proxy
        forwarded = proxy is not None and origin.scheme == "http"  # not tunnelled: the proxy reads it
        request = h11.Request(
            method="POST",
            target=origin.absolute if forwarded else origin.path,
            headers=[
                ("host", origin.host_header),
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
                *headers.items(),
                *_proxy_authorization(proxy if forwarded else None),
            ],
        )
        while True:
            connection = self._take_idle() or await self._connect()
            try:
                return connection, await self._send_and_read_head(connection, request, body)
            except UpstreamBroken:
                self._close(connection)
                if not connection.reused:
                    raise
            except BaseException:
                self._close(connection)
                raise

    async def _send_and_read_head(
        self, connection: _Connection, request: h11.Request, body: bytes
    ) -> h11.Response:
        parser = connection.h11
        wire = parser.send(request) + parser.send(h11.Data(data=body)) + parser.send(h11.EndOfMessage())
        with trio.move_on_after(self._idle_timeout) as write_deadline:
            try:
                await connection.stream.send_all(wire)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise UpstreamBroken(f"the upstream connection broke: {exc!r}") from None
        if write_deadline.cancelled_caught:
            raise UpstreamReadTimeout
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamBroken(f"invalid HTTP from the upstream: {exc}") from None
            if event is h11.NEED_DATA:
                parser.receive_data(await connection.receive_within(self._idle_timeout))
            elif type(event) is h11.Response:
                return event
            elif type(event) is not h11.InformationalResponse:
                raise UpstreamBroken(f"unexpected {event!r} before the response")

    def _take_idle(self) -> _Connection | None:
        now = trio.current_time()
        while self._idle:
            connection = self._idle.pop()  # the most recently used: least likely to be stale
            if now - connection.idle_since < _KEEPALIVE_EXPIRY:
                connection.reused = True
                self._reused += 1
                return connection
            self._close(connection)
        return None

    async def _connect(self) -> _Connection:
        origin, proxy = self.origin, self.proxy
        via = "" if proxy is None else f" through the proxy {proxy.address}"
        try:
            with trio.fail_after(self._connect_timeout):
                first = origin if proxy is None else proxy
                stream: trio.abc.Stream = await _open_tcp(first.host, first.port)
                try:
                    if first.scheme == "https":
                        stream = await self._tls(stream, first.host)
                    if proxy is not None and origin.scheme == "https":
                        await _open_tunnel(stream, proxy, origin)
                        stream = await self._tls(stream, origin.host)
                except BaseException:
                    _close_stream(stream)
                    raise
        except trio.TooSlowError:
            raise UpstreamConnectTimeout(f"connecting to the upstream{via} timed out") from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise UpstreamConnectError(f"could not connect to the upstream{via}: {exc!r}") from None
        self._opened += 1
        return _Connection(stream)

    async def _tls(self, stream: trio.abc.Stream, hostname: str) -> trio.SSLStream[trio.abc.Stream]:
        """TLS over ``stream``, handshake done. Cancellation: the caller closes ``stream``."""
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()
        tls = trio.SSLStream(stream, self._ssl, server_hostname=hostname, https_compatible=True)
        await tls.do_handshake()
        return tls

    def _release(self, connection: _Connection, reusable: bool) -> None:
        if reusable and not self._closed and len(self._idle) < self._max_keepalive:
            if connection.h11.their_state is h11.DONE:
                connection.h11.start_next_cycle()
            else:  # the body was decoded outside h11, which still expects it
                connection.h11 = h11.Connection(h11.CLIENT)
            connection.idle_since = trio.current_time()
            self._idle.append(connection)
            self._kept += 1
        else:
            self._close(connection)

    def _close(self, connection: _Connection) -> None:
        _close(connection)
        self._closed_count += 1

    async def aclose(self) -> None:
        """Close the idle connections; those in use close when their requests end.

        Cancellation: not a schedule point; always done."""
        self._closed = True
        while self._idle:
            self._close(self._idle.pop())


async def _open_tcp(host: str, port: int) -> trio.SocketStream:
    """A TCP connection. An IP address (a local vLLM, llama.cpp or Ollama) is connected to
    directly: a third of the cost of ``open_tcp_stream``, whose name resolution and
    happy eyeballs serve host names.

    Cancellation: nothing is left open."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def _open_tunnel(stream: trio.abc.Stream, proxy: ProxyURL, origin: _Origin) -> None:
    """Ask the proxy on ``stream`` for a tunnel to ``origin`` (``CONNECT``); its bytes are
    the origin's once this returns. Raises ``UpstreamConnectError`` if the proxy refuses.

    Cancellation: the stream is left mid-handshake; the caller closes it."""
    parser = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="CONNECT",
        target=origin.authority,
        headers=[("host", origin.authority), *_proxy_authorization(proxy)],
    )
    await stream.send_all(parser.send(request) + parser.send(h11.EndOfMessage()))
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            raise UpstreamConnectError(f"invalid HTTP from the proxy {proxy.address}: {exc}") from None
        if event is h11.NEED_DATA:
            parser.receive_data(bytes(await stream.receive_some(_READ_SIZE)))
        elif type(event) is h11.Response:
            break
        elif type(event) is not h11.InformationalResponse:
            raise UpstreamConnectError(f"the proxy {proxy.address} closed the connection to CONNECT")
    if not 200 <= event.status_code < 300:
        raise UpstreamConnectError(
            f"the proxy {proxy.address} answered CONNECT {origin.authority} with HTTP {event.status_code}"
        )
    if parser.trailing_data[0]:  # the origin speaks only after our TLS hello
        raise UpstreamConnectError(f"the proxy {proxy.address} sent bytes before the tunnel's TLS")


def _proxy_authorization(proxy: ProxyURL | None) -> list[tuple[str, str]]:
    if proxy is None or proxy.authorization is None:
        return []
    return [("proxy-authorization", proxy.authorization)]


def _close(connection: _Connection) -> None:
    """Close at once, without waiting for the peer (no TLS close_notify round trip)."""
    _close_stream(connection.stream)


def _close_stream(stream: trio.abc.Stream) -> None:
    while isinstance(stream, trio.SSLStream):  # TLS in TLS through an https:// proxy
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream):
        stream.socket.close()
