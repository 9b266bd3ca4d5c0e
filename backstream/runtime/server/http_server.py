"""The HTTP listener: hypercorn's trio server running an ASGI app.

hypercorn parses HTTP/1.1 and runs the app; this module owns the listening socket
so that the app can find the socket of each request (``PeerStreams``). hypercorn writes responses
with the socket send shielded from cancellation, so a deadline on a write cannot be a cancel
scope: a stream that falls behind is cut by shutting its socket down, which makes the pending
write fail at once (``http_app.StreamSocket``).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app

from backstream.runtime.server.listeners import PeerStreams, TrackedListener, open_tcp_listener

__all__ = ["HttpServer", "HttpServerConfig"]

log = logging.getLogger("backstream.http")

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


@attrs.frozen(kw_only=True)
class HttpServerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    reuse_port: bool = False
    keep_alive_timeout: float = 5.0
    """An idle keep-alive connection is closed after this long."""
    graceful_timeout: float = 3.0
    """At shutdown, requests still running get this long once the listener has closed."""
    max_request_head_bytes: int = 16 * 1024
    socket_send_buffer: int = 256 * 1024
    ssl_context: ssl.SSLContext | None = attrs.field(default=None, eq=False)
    """With a context, the port speaks HTTPS only (``serve``: the ``--tls-cert`` of wss://)."""
    tls_handshake_timeout: float = 10.0
    """A client that has not finished its TLS handshake after this long is dropped."""


class HttpServer:
    """Start with ``await nursery.start(server.run)`` (reports the bound port); ``stop_accepting``
    closes the listener, lets running requests finish within ``graceful_timeout``, and ``run``
    returns."""

    def __init__(self, app: ASGIApp, config: HttpServerConfig, *, streams: PeerStreams) -> None:
        self.config = config
        self._app = app
        self._streams = streams  # the app's: it finds each request's socket there
        self._stop = trio.Event()
        self._closed = trio.Event()
        self.port = 0

    def stop_accepting(self) -> None:
        self._stop.set()

    async def wait_closed(self) -> None:
        """Wait until ``run`` has returned: every connection has ended.

        Cancellation: stops waiting; the server is not affected."""
        await self._closed.wait()

    async def run(
        self,
        *,
        listener: trio.SocketListener | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until ``stop_accepting``, on ``listener`` if given (a socket already bound;
        ``serve`` binds before it opens the store), else on ``config.host:config.port``.

        Cancellation: the listener closes and every connection ends at once."""
        listener = listener or await open_tcp_listener(
            self.config.host,
            self.config.port,
            reuse_port=self.config.reuse_port,
            send_buffer=self.config.socket_send_buffer,
        )
        self.port = listener.socket.getsockname()[1]
        tracked = TrackedListener(listener, self._streams, ssl_context=self.config.ssl_context)
        try:
            await self._serve(listener, tracked, task_status)
        finally:
            self._closed.set()

    async def _serve(
        self, listener: trio.SocketListener, tracked: TrackedListener, task_status: trio.TaskStatus[int]
    ) -> None:
        hyper = HypercornConfig()
        hyper.keep_alive_timeout = self.config.keep_alive_timeout
        hyper.ssl_handshake_timeout = self.config.tls_handshake_timeout
        hyper.graceful_timeout = self.config.graceful_timeout
        hyper.h11_max_incomplete_size = self.config.max_request_head_bytes
        hyper.include_server_header = False
        hyper.accesslog = None
        hyper.errorlog = log
        context = WorkerContext(None)
        app = wrap_app(self._app, hyper.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
        server = partial(TCPServer, app, hyper, context, {})
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as accepting:
                await accepting.start(
                    partial(trio.serve_listeners, server, [tracked], handler_nursery=handlers)
                )
                task_status.started(self.port)
                await self._stop.wait()
                accepting.cancel_scope.cancel()
            await listener.aclose()
            await context.terminated.set()  # idle keep-alive connections close now
            handlers.cancel_scope.deadline = trio.current_time() + self.config.graceful_timeout
