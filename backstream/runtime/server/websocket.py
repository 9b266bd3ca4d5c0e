"""trio-websocket's server, with a direct send path and a close frame for a bad frame.

Sending: ``send_message`` takes a lock, serializes, and calls trio's ``send_all``,
which yields to the scheduler on every call; the caller's send deadline adds a cancel
scope per frame. Most frames fit in the socket's buffer at once, so
``ServerWebSocket.try_send_message`` writes a frame with one non-blocking ``send(2)``
and no schedule point; only what the socket did not take waits, in
``UnsentFrame.send``, under the caller's deadline (``send_text``).

Failing: wsproto reports a frame it cannot accept (a text frame that is not UTF-8: 1007; a
protocol violation: 1002) as if the peer had closed, and trio-websocket then drops
the TCP connection without a close frame, so the client learns nothing. RFC 6455
(7.1.7) asks to fail the connection: send a close frame with the code, then close.

Capping the first message: a hello is read before the client has authenticated, so
before the handshake is accepted the front door may cap the first message far below
``max_message_size`` (``cap_first_message``); the library's own size check then closes
with 1009 while the frame is still arriving.

Compressing: a client that offers permessage-deflate gets it (``ServerWebSocket._accept``,
as the library's own but with the extension; ``server.deflate`` bounds its memory), when the
server is given ``DeflateSettings``. The direct send path compresses as the library's does
(wsproto compresses in ``send``), and in the order frames reach the socket: the send lock is FIFO.

All four reach into trio-websocket's private state (its send lock, close reason, stream,
wsproto connection, send/abort methods, close-event and message-event handlers, message
size limit, a handshake request's connection, the server's connection handler and its
handshake acceptance, copied from 0.12), so pyproject.toml pins
its minor version and ``tests/test_trio_websocket_internals.py`` fails when a release moves
any of them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Generator
from typing import Any

import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    WebSocketServer,
)
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.extensions import Extension

from backstream.runtime.server.deflate import BoundedDeflate, DeflateSettings

__all__ = ["FailingWebSocketServer", "ServerWebSocket", "UnsentFrame", "cap_first_message_of", "send_text"]


class UnsentFrame:
    """What of a frame the socket did not take at once. The connection's send lock is
    held for it (or still to be taken) until ``send`` returns or is cancelled."""

    def __init__(self, ws: ServerWebSocket, data: bytes | memoryview, *, locked: bool) -> None:
        self._ws = ws
        self._data = data
        self._locked = locked

    async def send(self) -> None:
        """Send the rest. Raises ``ConnectionClosed`` if the connection broke.

        Cancellation: the frame may be cut; the connection must then be closed."""
        ws = self._ws
        lock = ws._stream_lock
        try:
            if not self._locked:
                await lock.acquire()
                self._locked = True
                if ws._close_reason:
                    raise ConnectionClosed(ws._close_reason)
            try:
                await ws._stream.send_all(self._data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await ws._abort_web_socket()
                assert ws._close_reason is not None
                raise ConnectionClosed(ws._close_reason) from None
        finally:
            if self._locked:
                lock.release()


class ServerWebSocket(WebSocketConnection):
    """A server connection that writes frames straight to a plain TCP socket when it can,
    and answers a bad frame with a close frame."""

    def __init__(
        self, stream: trio.abc.Stream, *args: object, deflate: DeflateSettings | None = None, **kwargs: object
    ) -> None:
        super().__init__(stream, *args, **kwargs)  # type: ignore[arg-type]
        # TLS streams take the library's path: their bytes are not the socket's.
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._first_message_cap: int | None = None
        self._deflate_settings = deflate
        self.deflate: BoundedDeflate | None = None
        """permessage-deflate, once the handshake accepted a client's offer of it."""
        self.on_pong: Callable[[], None] | None = None
        """Called for every pong (the front door's ``Heartbeat``)."""

    async def _accept(
        self, request: Request, subprotocol: str | None, extra_headers: list[tuple[bytes, bytes]]
    ) -> None:
        # As trio-websocket 0.12's own, offering permessage-deflate (wsproto answers an offer
        # of it, and ignores it for a client that made none).
        extensions: list[Extension] = []
        if self._deflate_settings is not None:
            extensions.append(BoundedDeflate(self._deflate_settings, self._inflate_limit))
        self._subprotocol = subprotocol
        self._path = request.target
        await self._send(
            AcceptConnection(subprotocol=subprotocol, extra_headers=extra_headers, extensions=extensions)
        )
        accepted = [e for e in extensions if isinstance(e, BoundedDeflate) and e.enabled()]
        self.deflate = accepted[0] if accepted else None
        self._open_handshake.set()

    def _inflate_limit(self) -> int:
        cap = self._first_message_cap
        return self._max_message_size if cap is None else min(cap, self._max_message_size)

    def release_idle_compressor(self) -> bool:
        """Drop the permessage-deflate compressor if nothing was sent since the last call (a
        keep-alive timer calls it): an idle connection holds none. True if dropped."""
        return self.deflate is not None and self.deflate.release_if_idle()

    def cap_first_message(self, max_size: int | None) -> None:
        """Before the handshake is accepted: the first message may be at most ``max_size``
        (counted as ``max_message_size`` is); a larger one closes the connection with 1009 as
        soon as that much has arrived, unread. None: no cap beyond ``max_message_size``."""
        self._first_message_cap = max_size

    async def _handle_message_event(self, event: BytesMessage | TextMessage) -> None:
        cap = self._first_message_cap
        if cap is None or cap >= self._max_message_size:
            await super()._handle_message_event(event)
            return
        if event.message_finished:
            self._first_message_cap = None  # from the next message on, the full limit
        limit, self._max_message_size = self._max_message_size, cap
        try:
            await super()._handle_message_event(event)
        finally:
            self._max_message_size = limit

    def try_send_message(self, message: str, *, compress: bool = True) -> UnsentFrame | None:
        """Write a text message without waiting: None once the socket took all of it; else
        what is left to send, which must be sent (``UnsentFrame.send``) before this task
        sends anything else. Raises ``ConnectionClosed`` if the connection is closed.
        ``compress=False`` sends it uncompressed on a permessage-deflate connection.

        Never a schedule point: the caller checkpoints."""
        if self._close_reason:
            raise ConnectionClosed(self._close_reason)
        if self.deflate is not None and not compress:
            self.deflate.plain_next = True
        data = self._wsproto.send(TextMessage(data=message))
        lock = self._stream_lock
        # Asked each time: a closed socket says -1, and its old number may be another's now.
        fd = self._socket.fileno() if self._socket is not None else -1
        if fd < 0 or lock.locked():
            return UnsentFrame(self, data, locked=False)
        lock.acquire_nowait()
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = 0  # broken: the library's send_all reports it in its own terms
        if sent == len(data):
            lock.release()
            return None
        return UnsentFrame(self, memoryview(data)[sent:], locked=True)

    async def send_ping(self) -> None:
        """Send a ping; its pong calls ``on_pong``. Raises ``ConnectionClosed``.

        Cancellation: the frame may be cut; the connection must then be closed."""
        if self._close_reason:
            raise ConnectionClosed(self._close_reason)
        if self._wsproto.state is not ConnectionState.OPEN:  # closing: a ping cannot go out now
            raise ConnectionClosed(CloseReason(1000, "closing"))
        await self._send(Ping(payload=os.urandom(4)))

    async def _handle_pong_event(self, event: Pong) -> None:
        if self.on_pong is not None:
            self.on_pong()
        await super()._handle_pong_event(event)

    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        if self._wsproto.state == ConnectionState.OPEN:  # not a close frame: wsproto failed a frame
            with contextlib.suppress(ConnectionClosed):
                await self._send(CloseConnection(code=event.code, reason=event.reason))
        await super()._handle_close_connection_event(event)


class LeanWSConnection(WSConnection):
    """A server-side wsproto connection that lets go of its handshake once it accepted it:
    h11's parser and the request with its headers, about 3 KB a connection. After the accept,
    wsproto asks its handshake only for events, and it has none (the request was read before)."""

    def send(self, event: Event) -> bytes:
        data = super().send(event)
        if isinstance(event, AcceptConnection) and not self.handshake._events:
            self.handshake = None  # type: ignore[assignment]
        return data

    def events(self) -> Generator[Event, None, None]:
        if self.handshake is None:
            assert self.connection is not None
            yield from self.connection.events()
        else:
            yield from super().events()


class FailingWebSocketServer(WebSocketServer):
    """A ``WebSocketServer`` whose connections answer a bad frame with a close frame, and whose
    first message may be capped by request path (``first_message_cap``: the path, query
    included, to a cap or None), e.g. a hello read before the client has authenticated."""

    def __init__(
        self,
        *args: Any,
        first_message_cap: Callable[[str], int | None] = lambda path: None,
        deflate: DeflateSettings | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._first_message_cap = first_message_cap
        self._deflate = deflate

    async def _handle_connection(self, stream: trio.abc.Stream) -> None:
        # As trio-websocket 0.12's own, with the connection class above.
        async with trio.open_nursery() as nursery:
            connection = ServerWebSocket(
                stream,
                LeanWSConnection(ConnectionType.SERVER),
                message_queue_size=self._message_queue_size,
                max_message_size=self._max_message_size,
                receive_buffer_size=self._receive_buffer_size,
                deflate=self._deflate,
            )
            nursery.start_soon(connection._reader_task)
            with trio.move_on_after(self._connect_timeout) as connect_scope:
                request = await connection._get_request()
            if connect_scope.cancelled_caught:
                nursery.cancel_scope.cancel()
                await stream.aclose()
                return
            # Frames are read only once the handshake is accepted: the cap is in time.
            connection.cap_first_message(self._first_message_cap(request.path))
            handling = self._handler(request)
            del request  # the handler may let go of it once accepted (its headers are ~1 KB)
            try:
                await handling
            finally:
                with trio.move_on_after(self._disconnect_timeout):
                    await connection.aclose()  # shuts the reader task down even if cancelled


def cap_first_message_of(request: WebSocketRequest, max_size: int | None) -> None:
    """``ServerWebSocket.cap_first_message`` on the connection of a handshake not yet
    accepted (from the handler: e.g. once it knows the client did not authenticate)."""
    connection = request._connection
    assert isinstance(connection, ServerWebSocket), "a FailingWebSocketServer's request"
    connection.cap_first_message(max_size)


async def send_text(ws: WebSocketConnection, text: str, seconds: float, *, compress: bool = True) -> bool:
    """Send a text message within ``seconds``; False if it did not all go in time (the
    frame may be cut: close the connection without another frame). Raises
    ``ConnectionClosed``. Without a cancel scope when the socket takes the frame at once.
    ``compress=False``: uncompressed even on a permessage-deflate connection.

    Cancellation: as for a timeout, the frame may be cut."""
    if not isinstance(ws, ServerWebSocket):  # another connection class: the library's path
        with trio.move_on_after(seconds) as deadline:
            await ws.send_message(text)
        return not deadline.cancelled_caught
    unsent = ws.try_send_message(text, compress=compress)
    if unsent is None:
        await trio.lowlevel.checkpoint_if_cancelled()
        return True
    with trio.move_on_after(seconds) as deadline:
        await unsent.send()
    return not deadline.cancelled_caught
