"""The server side of a WebSocket connection, on wsproto: read by the task that serves it.

Reading: there is no reader task and no message queue. ``get_message`` reads the socket
in the task that asks for the next message, feeds wsproto, answers pings, tells the
heartbeat of pongs and handles a close on the way, and returns once a message is whole;
at most one task reads at a time. A client's bytes are read only when the connection
wants its next message (as a queue of one message would have held them), at most
``receive_buffer_size`` at a time, and a message may be at most ``max_message_size``
(1009 as soon as that much has arrived). An idle connection is then one task parked on
its socket's readability, with no task, channel or nursery beside it.

Sending: a frame the socket takes whole goes out in one non-blocking ``send(2)``, with no
schedule point and no cancel scope (``try_send_message``); only what it does not take
waits, in ``UnsentFrame.send``, under the caller's deadline (``send_text``). Frames reach
the socket in the order they were encoded: the send lock is FIFO. Control frames (the
handshake's answer, pongs, close frames, pings) wait at most ``send_timeout``; one that
does not go in time drops the connection.

Failing: a frame wsproto cannot accept (a text frame that is not UTF-8: 1007; a protocol
violation: 1002) is answered with a close frame with the code, then the connection is
closed (RFC 6455 7.1.7).

Capping the first message: a hello is read before the client has authenticated, so the
front door may cap the first message far below ``max_message_size``
(``cap_first_message``); a larger one closes with 1009 while the frame is still arriving.

Compressing: a client that offers permessage-deflate gets it when the server is given
``DeflateSettings`` (``server.deflate`` bounds its memory); wsproto compresses in ``send``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Generator

import trio
from trio_websocket import CloseReason, ConnectionClosed, Endpoint
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.extensions import Extension
from wsproto.utilities import RemoteProtocolError

from backstream.runtime.server.deflate import BoundedDeflate, DeflateSettings

__all__ = ["LeanWSConnection", "ServerWebSocket", "UnsentFrame", "send_text"]

RECEIVE_BYTES = 4 * 1024
"""The most bytes one read takes from a client's socket."""


class _Pending(list[Event]):
    """wsproto's queue of pending events as an empty list (56 bytes) instead of an empty
    deque (about 600): it queues one only for a connection lost without a close frame."""

    __slots__ = ()

    def popleft(self) -> Event:
        return self.pop(0)


class LeanWSConnection(WSConnection):
    """A server-side wsproto connection that lets go of its handshake once it accepted it:
    h11's parser and the request with its headers, about 3 KB a connection. After the accept,
    wsproto asks its handshake only for events, and it has none (the request was read before).
    Its frame connection's pending events are kept in a list (``_Pending``)."""

    def send(self, event: Event) -> bytes:
        data = super().send(event)
        if isinstance(event, AcceptConnection) and not self.handshake._events:
            self.handshake = None  # type: ignore[assignment]
            assert self.connection is not None
            pending = _Pending(self.connection._events)
            self.connection._events = pending  # type: ignore[assignment]
        return data

    def events(self) -> Generator[Event, None, None]:
        if self.handshake is None:
            assert self.connection is not None
            yield from self.connection.events()
        else:
            yield from super().events()


class UnsentFrame:
    """What of a frame the socket did not take at once. The connection's send lock is
    held for it (or still to be taken) until ``send`` returns or is cancelled."""

    __slots__ = ("_data", "_locked", "_ws")

    def __init__(self, ws: ServerWebSocket, data: bytes | memoryview, *, locked: bool) -> None:
        self._ws = ws
        self._data = data
        self._locked = locked

    async def send(self) -> None:
        """Send the rest. Raises ``ConnectionClosed`` if the connection broke.

        Cancellation: the frame may be cut; the connection must then be closed."""
        ws = self._ws
        lock = ws._send_lock
        try:
            if not self._locked:
                await lock.acquire()
                self._locked = True
                if ws._broken:
                    raise ConnectionClosed(ws._close_reason)
            try:
                await ws._stream.send_all(self._data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await ws._abort()
                raise ConnectionClosed(ws._close_reason) from None
        finally:
            if self._locked:
                lock.release()


class ServerWebSocket:
    """One accepted client (or a handshake still to accept). Made by ``WebSocketServer``."""

    __slots__ = (
        "_broken",
        "_close_reason",
        "_deflate_settings",
        "_events",
        "_first_message_cap",
        "_max_message_size",
        "_message_parts",
        "_message_size",
        "_path",
        "_reading",
        "_receive_size",
        "_send_lock",
        "_send_timeout",
        "_socket",
        "_stream",
        "_subprotocol",
        "_wsproto",
        "deflate",
        "on_pong",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        max_message_size: int,
        receive_buffer_size: int = RECEIVE_BYTES,
        send_timeout: float = 10.0,
        deflate: DeflateSettings | None = None,
    ) -> None:
        self._stream = stream
        # TLS streams are read and written through trio: their bytes are not the socket's.
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._wsproto = LeanWSConnection(ConnectionType.SERVER)
        self._send_lock = trio.StrictFIFOLock()
        self._close_reason: CloseReason | None = None
        self._broken = False  # the stream is closed, or a frame on it was cut
        self._events: Generator[Event, None, None] | None = None  # wsproto's, while it may hold more
        self._reading = False
        self._message_parts: list[str | bytes | bytearray] = []
        self._message_size = 0
        self._max_message_size = max_message_size
        self._first_message_cap: int | None = None
        self._receive_size = receive_buffer_size
        self._send_timeout = send_timeout
        self._deflate_settings = deflate
        self._path = ""
        self._subprotocol: str | None = None
        self.deflate: BoundedDeflate | None = None
        """permessage-deflate, once the handshake accepted a client's offer of it."""
        self.on_pong: Callable[[], None] | None = None
        """Called for every pong (the front door's ``Heartbeat``)."""

    # -- what the connection is ---------------------------------------------------------

    @property
    def closed(self) -> CloseReason | None:
        """Why the connection closed (or is closing); None while it is open."""
        return self._close_reason

    @property
    def path(self) -> str:
        return self._path

    @property
    def subprotocol(self) -> str | None:
        return self._subprotocol

    @property
    def local(self) -> Endpoint | str:
        return _endpoint(self._stream, local=True)

    @property
    def remote(self) -> Endpoint | str:
        return _endpoint(self._stream, local=False)

    # -- the opening handshake ------------------------------------------------------------

    async def read_request(self) -> Request | None:
        """The client's opening handshake; None if the client left or sent no valid one (a
        malformed request is answered 400). Cancellation: the handshake is left unread."""
        while True:
            for event in self._wsproto.events():
                if isinstance(event, Request):
                    return event
            try:
                data = await self._receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None  # e.g. a reset, or a TLS handshake that failed
            if not data:
                return None
            try:
                self._wsproto.receive_data(data)
            except RemoteProtocolError as err:
                if err.event_hint is not None:
                    with contextlib.suppress(ConnectionClosed):
                        await self._send_event(err.event_hint)
                return None

    async def accept(
        self, request: Request, subprotocol: str | None, extra_headers: list[tuple[bytes, bytes]]
    ) -> None:
        """Accept the handshake (with permessage-deflate if the client offered it and the server
        allows it). Raises ``ConnectionClosed`` if the client left."""
        extensions: list[Extension] = []
        if self._deflate_settings is not None:
            extensions.append(BoundedDeflate(self._deflate_settings, self._message_limit))
        self._subprotocol = subprotocol
        self._path = request.target
        await self._send_event(
            AcceptConnection(subprotocol=subprotocol, extra_headers=extra_headers, extensions=extensions)
        )
        accepted = [e for e in extensions if isinstance(e, BoundedDeflate) and e.enabled()]
        self.deflate = accepted[0] if accepted else None
        self._events = self._wsproto.events()  # frames that came with the handshake

    async def reject(self, status_code: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Answer the handshake with ``status_code`` (and ``body``). Raises ``ConnectionClosed``."""
        if body:
            headers = [*headers, (b"Content-length", str(len(body)).encode("ascii"))]
        await self._send_event(
            RejectConnection(status_code=status_code, headers=headers, has_body=bool(body))
        )
        if body:
            await self._send_event(RejectData(data=body))
        self._close_reason = CloseReason(1006, "Rejected WebSocket handshake")

    def cap_first_message(self, max_size: int | None) -> None:
        """The first message may be at most ``max_size`` (counted as ``max_message_size`` is);
        a larger one closes the connection with 1009 as soon as that much has arrived, unread.
        None: no cap beyond ``max_message_size``."""
        self._first_message_cap = max_size

    def _message_limit(self) -> int:
        cap = self._first_message_cap
        return self._max_message_size if cap is None else min(cap, self._max_message_size)

    # -- reading ----------------------------------------------------------------------------

    async def get_message(self) -> str | bytes:
        """The next message. Messages that arrived before the client's close are still returned;
        then ``ConnectionClosed``. Raises ``trio.BusyResourceError`` if another task is reading.

        Cancellation: nothing is lost; the next call goes on where this one stopped (a pong
        or close frame under way is sent first, shielded, within ``send_timeout``)."""
        if self._reading:
            raise trio.BusyResourceError("another task is reading this WebSocket")
        self._reading = True
        try:
            while True:
                message = await self._dispatch(keep=True)
                if message is not None:
                    return message
                if self._close_reason is not None:
                    raise ConnectionClosed(self._close_reason)
                await self._read_more()
        finally:
            self._reading = False

    async def _dispatch(self, *, keep: bool) -> str | bytes | None:
        """Handle wsproto's events until a message is whole (returned; the events that follow
        it wait for the next call) or there are none left (None). ``keep=False``: messages
        are dropped (the connection is closing)."""
        while self._events is not None:
            event = next(self._events, None)
            if event is None:
                self._events = None
            elif isinstance(event, (TextMessage, BytesMessage)):
                if not keep:
                    continue
                message = await self._on_message(event)
                if message is not None:
                    return message
            elif isinstance(event, Ping):
                if self._wsproto.state is ConnectionState.OPEN:
                    await self._send_control(event.response())
            elif isinstance(event, Pong):
                if self.on_pong is not None:
                    self.on_pong()
            elif isinstance(event, CloseConnection):
                await self._on_close(event)
        return None

    async def _read_more(self) -> None:
        """Read what the client sent next into wsproto; at its end, the connection is aborted."""
        try:
            data = await self._receive()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            await self._abort()
            raise ConnectionClosed(self._close_reason)
        if self._wsproto.state is ConnectionState.CLOSED:
            return
        try:
            self._wsproto.receive_data(data)
        except RemoteProtocolError:  # only in a handshake, which is read elsewhere
            await self._abort()
            raise ConnectionClosed(self._close_reason) from None
        self._events = self._wsproto.events()

    async def _receive(self) -> bytes:
        """The client's next bytes (b"" at its end). A schedule point, as trio's reads are.
        Raises ``trio.BrokenResourceError`` or ``trio.ClosedResourceError``."""
        sock = self._socket
        if sock is None:
            return bytes(await self._stream.receive_some(self._receive_size))
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            fd = sock.fileno()  # asked each time: a closed socket says -1
            if fd < 0:
                raise trio.ClosedResourceError("the socket was closed")
            try:
                data = os.read(fd, self._receive_size)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError from exc
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def _on_message(self, event: TextMessage | BytesMessage) -> str | bytes | None:
        limit = self._message_limit()
        self._message_size += len(event.data)
        self._message_parts.append(event.data)
        if self._message_size > limit:
            err = f"Exceeded maximum message size: {limit} bytes"
            self._message_parts = []
            self._message_size = 0
            self._close_reason = CloseReason(1009, err)
            await self._send_control(CloseConnection(code=1009, reason=err))
            raise ConnectionClosed(self._close_reason)
        if not event.message_finished:
            return None
        self._first_message_cap = None  # from the next message on, the full limit
        parts, self._message_parts, self._message_size = self._message_parts, [], 0
        if isinstance(event, BytesMessage):
            return b"".join(parts)  # type: ignore[arg-type]
        return "".join(parts)  # type: ignore[arg-type]

    async def _on_close(self, event: CloseConnection) -> None:
        state = self._wsproto.state
        if state is ConnectionState.OPEN:  # not a close frame: wsproto failed a frame
            with contextlib.suppress(ConnectionClosed):
                await self._send_control(CloseConnection(code=event.code, reason=event.reason))
        elif state is ConnectionState.REMOTE_CLOSING:  # the client's close: answer it
            self._close_reason = CloseReason(event.code, event.reason or None)
            with contextlib.suppress(ConnectionClosed):
                await self._send_control(event.response())
        self._close_reason = CloseReason(event.code, event.reason or None)
        self._events = None
        await self._close_stream()  # RFC 6455 7.1.1: the server closes the TCP connection first

    # -- sending ----------------------------------------------------------------------------

    def try_send_message(self, message: str, *, compress: bool = True) -> UnsentFrame | None:
        """Write a text message without waiting: None once the socket took all of it; else
        what is left to send, which must be sent (``UnsentFrame.send``) before this task
        sends anything else. Raises ``ConnectionClosed`` if the connection is closed.
        ``compress=False`` sends it uncompressed on a permessage-deflate connection.

        Never a schedule point: the caller checkpoints."""
        if self._close_reason is not None or self._broken:
            raise ConnectionClosed(self._close_reason)
        if self.deflate is not None and not compress:
            self.deflate.plain_next = True
        return self._try_write(self._wsproto.send(TextMessage(data=message)))

    def _try_write(self, data: bytes) -> UnsentFrame | None:
        lock = self._send_lock
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
            sent = 0  # broken: trio's send_all reports it in its own terms
        if sent == len(data):
            lock.release()
            return None
        return UnsentFrame(self, memoryview(data)[sent:], locked=True)

    async def send_message(self, message: str | bytes) -> None:
        """Send a message within ``send_timeout`` (else the connection is dropped). Raises
        ``ConnectionClosed``. Cancellation: the frame may be cut; close the connection."""
        if self._close_reason is not None or self._broken:
            raise ConnectionClosed(self._close_reason)
        event = TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message)
        await self._send_event(event)

    async def send_ping(self) -> None:
        """Send a ping; its pong calls ``on_pong``. Raises ``ConnectionClosed``.

        Cancellation: the frame may be cut; the connection must then be closed."""
        if self._close_reason is not None or self._broken:
            raise ConnectionClosed(self._close_reason)
        if self._wsproto.state is not ConnectionState.OPEN:  # closing: a ping cannot go out now
            raise ConnectionClosed(CloseReason(1000, "closing"))
        await self._send_event(Ping(payload=os.urandom(4)))

    async def _send_event(self, event: Event) -> None:
        """Send ``event`` within ``send_timeout``; past it the connection is dropped. Raises
        ``ConnectionClosed``. Cancellation: the frame may be cut; close the connection."""
        if self._broken:
            raise ConnectionClosed(self._close_reason)
        unsent = self._try_write(self._wsproto.send(event))
        if unsent is None:
            return
        with trio.move_on_after(self._send_timeout) as deadline:
            await unsent.send()
        if deadline.cancelled_caught:
            await self._abort()
            raise ConnectionClosed(self._close_reason)

    async def _send_control(self, event: Event) -> None:
        """``_send_event``, shielded: a pong or close frame read on the way to a message goes out
        whole (or the connection is dropped) even if the reader is cancelled meanwhile."""
        with trio.CancelScope(shield=True):
            await self._send_event(event)

    # -- closing ----------------------------------------------------------------------------

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close: send a close frame with ``code`` and ``reason``, wait for the client's (its
        messages meanwhile are dropped), then close the socket. Idempotent.

        Cancellation: the socket is closed all the same."""
        try:
            if self._close_reason is None and self._wsproto.state is ConnectionState.OPEN:
                # Set first: sends from now on raise ConnectionClosed.
                self._close_reason = CloseReason(1000, None)
                await self._send_event(CloseConnection(code=code, reason=reason))
                if not self._reading:  # another task reading would take the client's close
                    self._reading = True
                    try:
                        await self._await_close()
                    finally:
                        self._reading = False
        except ConnectionClosed:
            pass
        finally:
            await self._close_stream()

    async def _await_close(self) -> None:
        while True:
            await self._dispatch(keep=False)
            if self._closing_done():
                return
            await self._read_more()

    def _closing_done(self) -> bool:
        return self._broken or self._wsproto.state is ConnectionState.CLOSED

    async def _abort(self) -> None:
        """The stream broke or ended before a close handshake: 1006, and close it."""
        if self._close_reason is None:
            self._close_reason = CloseReason(1006, None)
        await self._close_stream()

    async def _close_stream(self) -> None:
        self._broken = True
        self._events = None
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await trio.aclose_forcefully(self._stream)

    def release_idle_compressor(self) -> bool:
        """Drop the permessage-deflate compressor if nothing was sent since the last call (a
        keep-alive timer calls it): an idle connection holds none. True if dropped."""
        return self.deflate is not None and self.deflate.release_if_idle()


def _endpoint(stream: trio.abc.Stream, *, local: bool) -> Endpoint | str:
    sock = None
    if isinstance(stream, trio.SocketStream):
        sock = stream.socket
    elif isinstance(stream, trio.SSLStream) and isinstance(stream.transport_stream, trio.SocketStream):
        sock = stream.transport_stream.socket
    if sock is None:
        return repr(stream)
    try:
        address = sock.getsockname() if local else sock.getpeername()
    except OSError:
        return repr(stream)
    return Endpoint(address[0], address[1], isinstance(stream, trio.SSLStream))


async def send_text(ws: ServerWebSocket, text: str, seconds: float, *, compress: bool = True) -> bool:
    """Send a text message within ``seconds``; False if it did not all go in time (the
    frame may be cut: close the connection without another frame). Raises
    ``ConnectionClosed``. Without a cancel scope when the socket takes the frame at once.
    ``compress=False``: uncompressed even on a permessage-deflate connection.

    Cancellation: as for a timeout, the frame may be cut."""
    unsent = ws.try_send_message(text, compress=compress)
    if unsent is None:
        await trio.lowlevel.checkpoint_if_cancelled()
        return True
    with trio.move_on_after(seconds) as deadline:
        await unsent.send()
    return not deadline.cancelled_caught
