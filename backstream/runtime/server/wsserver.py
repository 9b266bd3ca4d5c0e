"""Accepting WebSocket clients: one task per connection, from the handshake to the close.

``trio.serve_listeners`` starts one task per accepted socket; that task reads the opening
handshake (within ``connect_timeout``), runs the handler with a ``HandshakeRequest``, and
closes the connection after it (within ``disconnect_timeout``). The handler reads the
connection's messages itself (``ServerWebSocket.get_message``): no reader task and no
nursery per connection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio
from trio_websocket import ConnectionClosed, Endpoint
from wsproto.events import Request

from backstream.runtime.server.deflate import DeflateSettings
from backstream.runtime.server.websocket import RECEIVE_BYTES, ServerWebSocket

__all__ = ["HandshakeRequest", "WebSocketServer"]


class HandshakeRequest:
    """A client's opening handshake, for the handler to accept or reject."""

    __slots__ = ("_event", "_ws")

    def __init__(self, ws: ServerWebSocket, event: Request) -> None:
        self._ws = ws
        self._event = event

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return list(self._event.extra_headers)

    @property
    def path(self) -> str:
        """The request's target: its path, query included."""
        return self._event.target

    @property
    def proposed_subprotocols(self) -> tuple[str, ...]:
        return tuple(self._event.subprotocols)

    @property
    def remote(self) -> Endpoint | str:
        return self._ws.remote

    def cap_first_message(self, max_size: int | None) -> None:
        """``ServerWebSocket.cap_first_message``, before the handshake is accepted."""
        self._ws.cap_first_message(max_size)

    async def accept(
        self, *, subprotocol: str | None = None, extra_headers: list[tuple[bytes, bytes]] | None = None
    ) -> ServerWebSocket:
        """Accept the handshake; the connection. Raises ``ConnectionClosed`` if the client left."""
        await self._ws.accept(self._event, subprotocol, extra_headers or [])
        return self._ws

    async def reject(
        self,
        status_code: int,
        *,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes | None = None,
    ) -> None:
        """Answer the handshake with an HTTP error. Raises ``ConnectionClosed`` if the client left."""
        await self._ws.reject(status_code, list(extra_headers or []), body or b"")


class WebSocketServer:
    """Serves ``listeners``: ``handler`` runs once per handshake, in ``handler_nursery`` (or one
    of the server's own). ``first_message_cap`` maps a request's path (query included) to a cap
    on its first message, or None (e.g. a hello read before the client has authenticated)."""

    def __init__(
        self,
        handler: Callable[[HandshakeRequest], Awaitable[None]],
        listeners: Sequence[trio.abc.Listener[Any]],
        *,
        handler_nursery: trio.Nursery | None = None,
        max_message_size: int = 1024 * 1024,
        receive_buffer_size: int = RECEIVE_BYTES,
        connect_timeout: float = 60.0,
        disconnect_timeout: float = 60.0,
        send_timeout: float = 10.0,
        first_message_cap: Callable[[str], int | None] = lambda path: None,
        deflate: DeflateSettings | None = None,
    ) -> None:
        if not listeners:
            raise ValueError("at least one listener is needed")
        self._handler = handler
        self._listeners = list(listeners)
        self._handler_nursery = handler_nursery
        self._max_message_size = max_message_size
        self._receive_buffer_size = receive_buffer_size
        self._connect_timeout = connect_timeout
        self._disconnect_timeout = disconnect_timeout
        self._send_timeout = send_timeout
        self._first_message_cap = first_message_cap
        self._deflate = deflate

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections until cancelled; started once every listener listens.

        Cancellation: stops accepting (and, without a ``handler_nursery``, ends every connection)."""
        await trio.serve_listeners(
            self._handle_connection,
            self._listeners,
            handler_nursery=self._handler_nursery,
            task_status=task_status,
        )

    async def _handle_connection(self, stream: trio.abc.Stream) -> None:
        ws = ServerWebSocket(
            stream,
            max_message_size=self._max_message_size,
            receive_buffer_size=self._receive_buffer_size,
            send_timeout=self._send_timeout,
            deflate=self._deflate,
        )
        try:
            event: Request | None = None
            with trio.move_on_after(self._connect_timeout):
                event = await ws.read_request()
            if event is None:
                return
            # Frames are read only once the handshake is accepted: the cap is in time.
            ws.cap_first_message(self._first_message_cap(event.target))
            handling = self._handler(HandshakeRequest(ws, event))
            del event  # the handler may let go of it once accepted (its headers are ~1 KB)
            await handling
        except ConnectionClosed:
            pass  # the client left; nothing more to do
        finally:
            with trio.move_on_after(self._disconnect_timeout):
                await ws.aclose()
