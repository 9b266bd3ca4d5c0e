"""The Python client's connection to a server: one WebSocket at a time, replaced when it breaks.

``Transport`` connects (``hello`` -> ``welcome``), reconnects with backoff and full jitter
when asked for a session after the last one broke, matches replies to requests by ``id``,
and hands each watched job's pushes (``job.events``, and the ``error`` that ends a watch,
found by its ``job_id``) to that watch's bounded channel. Notifications go to a bounded
inbox. What to do with a broken watch (resume from its cursor) is the watch's business
(``watch.py``); the typed calls are ``api.py``'s.
"""

from __future__ import annotations

import itertools
import logging
import ssl
from collections import deque
from contextlib import suppress
from typing import TypeVar

import attrs
import trio
import wsproto.utilities
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection

from backstream.client.websocket import connect_websocket_url
from backstream.protocol.backoff import Backoff
from backstream.protocol.codec import ProtocolError, decode_server, encode
from backstream.protocol.errors import BackstreamError, RateLimitedError, UnavailableError, error_for_code
from backstream.protocol.messages import (
    PROTOCOL_VERSION,
    ClientMessage,
    ErrorMessage,
    Hello,
    JobEvents,
    Notification,
    NotificationPush,
    ServerMessage,
    Welcome,
)

__all__ = [
    "CLOSE_TIMEOUT",
    "INBOX_SIZE",
    "WATCH_BUFFER",
    "ConnectSettings",
    "Session",
    "Transport",
    "error_from_message",
]

# The client's one logger, whichever module of it logs.
log = logging.getLogger("backstream.client")

WATCH_BUFFER = 64
"""Batches buffered per watch; when full, the client stops reading its socket (backpressure)."""
INBOX_SIZE = 256
"""Notifications kept until read; when full, the oldest is dropped (the server keeps them all)."""
CLOSE_TIMEOUT = 2.0
"""Seconds for each step of closing a connection: the close handshake, then the server's TCP close."""
MAX_MESSAGE_SIZE = 64 * 1024 * 1024
"""The largest frame read from the server (a ``job.get`` page is far smaller)."""

_BROKEN_CONNECTION = (wsproto.utilities.ProtocolError, ConnectionClosed)
"""What trio-websocket's reader raises for a connection that broke (for example wsproto's
``LocalProtocolError`` when a ping arrives after our close frame and the reader answers it)."""
_CONNECT_FAILURES = (
    OSError,
    HandshakeError,
    ConnectionClosed,
    UnavailableError,
    RateLimitedError,  # the user's connections are all open (close 4409): one may close soon
    trio.TooSlowError,
    wsproto.utilities.ProtocolError,
)
"""Failures of one connection attempt that a reconnect retries, after its backoff."""

WatchItem = JobEvents | ErrorMessage
"""What a watch's channel carries: its batches, then perhaps the ``error`` that ended it."""

_Reply = TypeVar("_Reply")


@attrs.frozen
class ConnectSettings:
    """Where and how to connect; see ``open_client`` for each one's meaning."""

    url: str
    token: str
    client_name: str
    token_in_header: bool
    request_timeout: float
    connect_timeout: float
    reconnect_base: float
    reconnect_max: float
    max_reconnect_attempts: int
    ssl_context: ssl.SSLContext | None = attrs.field(default=None, eq=False)
    compression: bool = True


class Session:
    """One WebSocket connection and what waits on it.

    ``closed``: no more messages will come (requests and watches move to a new connection).
    ``stop``: the connection is to be closed. ``ended``: its tasks are all done.
    """

    def __init__(self, ws: WebSocketConnection, welcome: Welcome) -> None:
        self.ws = ws
        self.welcome = welcome
        self.pending: dict[str, trio.MemorySendChannel[ServerMessage]] = {}
        self.watches: dict[str, trio.MemorySendChannel[WatchItem]] = {}
        self.closed = trio.Event()
        self.stop = trio.Event()
        self.ended = trio.Event()
        self.close_code: int | None = None
        self.close_with: tuple[int, str | None] = (1000, None)

    def fail_all(self) -> None:
        for reply_slot in self.pending.values():
            reply_slot.close()
        for watch in self.watches.values():
            watch.close()
        self.pending.clear()
        self.watches.clear()

    def end_reading(self) -> None:
        """No more messages: fail what waits on this connection, and have it closed."""
        self.closed.set()
        self.stop.set()
        self.fail_all()

    async def close(self) -> None:
        """Have the connection closed and wait until its tasks are done, at most
        ``2 * CLOSE_TIMEOUT`` (they end by that bound themselves).

        Cancellation: shielded, so the connection is closed all the same; the wait is bounded.
        """
        self.stop.set()
        with trio.move_on_after(2 * CLOSE_TIMEOUT) as scope:
            scope.shield = True
            await self.ended.wait()


class Transport:
    """The current ``Session``, a new one when it broke, requests over it, and the inbox.

    Each connection's tasks run in a nursery of their own, started in ``nursery``.
    """

    def __init__(self, nursery: trio.Nursery, settings: ConnectSettings) -> None:
        self._nursery = nursery
        self.settings = settings
        self._ids = itertools.count(1)
        self.current: Session | None = None
        self._connect_lock = trio.Lock()
        self._inbox: deque[Notification] = deque(maxlen=INBOX_SIZE)
        self._inbox_changed = trio.Event()
        self._closed = False
        self.reconnects = 0

    def next_id(self) -> str:
        """A request ``id`` not used before on this client."""
        return f"r{next(self._ids)}"

    async def open(self) -> None:
        """The first connection. Raises its failure bare (see ``_connect``); no retry.

        Cancellation: no connection is left open.
        """
        self.current = await self._connect()

    async def session(self) -> Session:
        """The live session, connecting (with backoff) if there is none.

        Raises ``UnavailableError`` once the client is closed or after
        ``max_reconnect_attempts`` failed attempts in a row. Cancellation: safe; a connection
        that was being opened is closed with its nursery's tasks.
        """
        async with self._connect_lock:
            if self.current is not None and not self.current.closed.is_set():
                return self.current
            if self._closed:
                raise UnavailableError("the client is closed")
            settings = self.settings
            backoff = Backoff(settings.reconnect_base, settings.reconnect_max, jitter="full")
            had_session = self.current is not None
            while True:
                try:
                    self.current = await self._connect()
                    if had_session:
                        self.reconnects += 1
                    return self.current
                except _CONNECT_FAILURES as exc:
                    if backoff.attempt >= settings.max_reconnect_attempts:
                        raise UnavailableError(
                            f"could not connect after {backoff.attempt} retries: {exc}"
                        ) from None
                    await trio.sleep(backoff.next_delay())

    async def request(
        self, message: ClientMessage, expect: type[_Reply], session: Session | None = None
    ) -> _Reply:
        """Send ``message`` on ``session`` (default: the live one) and return its reply.

        An ``error`` reply raises its typed error; no reply within ``request_timeout`` or a
        connection lost first raises ``UnavailableError``. Cancellation: the request may still
        have reached the server; its reply is dropped.
        """
        session = session or await self.session()
        send, receive = trio.open_memory_channel[ServerMessage](1)
        session.pending[message.id] = send
        timeout = self.settings.request_timeout
        try:
            with trio.fail_after(timeout):
                try:
                    await session.ws.send_message(encode(message))
                    reply = await receive.receive()
                except (ConnectionClosed, trio.EndOfChannel):
                    raise UnavailableError("the connection was lost before the reply") from None
        except trio.TooSlowError:
            raise UnavailableError(f"no reply within {timeout:g} s") from None
        finally:
            session.pending.pop(message.id, None)
        if isinstance(reply, ErrorMessage):
            raise error_from_message(reply)
        if not isinstance(reply, expect):
            raise UnavailableError(f"unexpected reply {type(reply).TYPE}")
        return reply

    async def next_notification(self) -> Notification:
        """The next pushed notification (the oldest kept).

        Cancellation: safe; no notification is lost (it stays queued).
        """
        while not self._inbox:
            await self._inbox_changed.wait()
        return self._inbox.popleft()

    async def aclose(self) -> None:
        """No more connections; close the current one, waiting at most ``2 * CLOSE_TIMEOUT``.

        Cancellation: shielded; the connection is closed all the same (bounded).
        """
        self._closed = True
        await self.drop()

    async def drop(self) -> None:
        """Close the current connection (the next ``session()`` opens another). Waits at most
        ``2 * CLOSE_TIMEOUT``.

        Cancellation: shielded; the connection is dropped all the same (bounded).
        """
        if self.current is not None:
            await self.current.close()

    # -- one connection -------------------------------------------------------------------

    async def _connect(self) -> Session:
        """A new connection; its tasks run in a nursery of their own (see ``_connection``).

        Raises the failure bare (``OSError``, ``ConnectionRejected``, a typed error for the
        ``hello``, ``trio.TooSlowError`` after ``connect_timeout``).
        """
        try:
            with trio.fail_after(self.settings.connect_timeout):
                session: Session = await self._nursery.start(self._connection)
        except BaseExceptionGroup as group:
            raise _sole_error(group) from None
        return session

    async def _connection(self, *, task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED) -> None:
        """One connection's life, in a nursery of its own: trio-websocket's reader, ``_read``,
        and the close.

        Once welcomed, a connection that breaks (``_BROKEN_CONNECTION``, raised by
        trio-websocket's reader) ends here: its requests fail and its watches resume on a new
        connection. Other errors propagate. Cancellation: the connection's tasks end.
        """
        session: Session | None = None
        try:
            async with trio.open_nursery() as nursery:
                session = await self._open_session(nursery)
                task_status.started(session)
                nursery.start_soon(self._read, session)
                await self._close_when_stopped(session, nursery.cancel_scope)
        except* _BROKEN_CONNECTION as group:
            if session is None:
                raise  # no welcome yet: the caller of _connect gets it
            log.warning("connection lost: %s", "; ".join(repr(exc) for exc in group.exceptions))
        finally:
            if session is not None:
                session.end_reading()
                session.ended.set()

    async def _open_session(self, nursery: trio.Nursery) -> Session:
        """Connect, with trio-websocket's reader in ``nursery``, and say ``hello``."""
        settings = self.settings
        bearer = [(b"authorization", f"Bearer {settings.token}".encode())]
        ws = await connect_websocket_url(
            nursery,
            settings.url,
            extra_headers=bearer if settings.token_in_header else None,
            message_queue_size=WATCH_BUFFER,
            max_message_size=MAX_MESSAGE_SIZE,
            ssl_context=settings.ssl_context,
            deflate=settings.compression,
        )
        hello = Hello(
            id="hello",
            protocol=PROTOCOL_VERSION,
            token=None if settings.token_in_header else settings.token,
            client=settings.client_name,
        )
        try:
            await ws.send_message(encode(hello))
            reply = decode_server(await ws.get_message())
        except ConnectionClosed:
            raise UnavailableError("the server closed the connection during hello") from None
        if not isinstance(reply, Welcome):
            with trio.move_on_after(CLOSE_TIMEOUT):
                await ws.aclose()
            if isinstance(reply, ErrorMessage):
                raise error_from_message(reply)
            raise UnavailableError(f"expected welcome, got {type(reply).TYPE}")
        return Session(ws, reply)

    @staticmethod
    async def _close_when_stopped(session: Session, tasks: trio.CancelScope) -> None:
        """Once the connection is to stop, close it (``CLOSE_TIMEOUT`` for the handshake; a
        close already under way returns at once), then give the reader ``CLOSE_TIMEOUT`` to
        see the server's TCP close before ``tasks`` is cancelled.

        Cancellation: the close is cut short (trio-websocket closes the socket of a close
        handshake it was waiting on).
        """
        await session.stop.wait()
        with trio.move_on_after(CLOSE_TIMEOUT):
            await session.ws.aclose(*session.close_with)
        tasks.deadline = min(tasks.deadline, trio.current_time() + CLOSE_TIMEOUT)

    async def _read(self, session: Session) -> None:
        """Route each message: batches to their watch, notifications to the inbox, replies to
        their request, an ``error`` without a waiting request to the watch it ended."""
        try:
            while True:
                message = decode_server(await session.ws.get_message())
                if isinstance(message, JobEvents):
                    await self._to_watch(session, message)
                elif isinstance(message, NotificationPush):
                    self._inbox.append(message.notification)
                    self._inbox_changed.set()
                    self._inbox_changed = trio.Event()
                else:
                    request_id = getattr(message, "id", None)
                    slot = session.pending.pop(request_id, None) if request_id else None
                    if slot is not None:
                        slot.send_nowait(message)
                    elif isinstance(message, ErrorMessage):
                        await self._watch_ended(session, message)
        except ConnectionClosed as exc:
            session.close_code = exc.reason.code if exc.reason else None
        except ProtocolError as exc:
            log.error("unreadable server message: %s", exc)
            session.close_with = (1002, "unreadable message")
        finally:
            session.end_reading()

    @staticmethod
    async def _to_watch(session: Session, batch: JobEvents) -> None:
        channel = session.watches.get(batch.job_id)
        if channel is None:
            return  # unwatched meanwhile
        try:
            await channel.send(batch)  # waits while the consumer is behind
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            session.watches.pop(batch.job_id, None)

    @staticmethod
    async def _watch_ended(session: Session, error: ErrorMessage) -> None:
        """An ``error`` without ``id``: the server ended the watch of its ``job_id`` (the watch
        decides what next)."""
        channel = session.watches.pop(error.job_id, None) if error.job_id is not None else None
        if channel is None:
            log.warning("server error: %s: %s", error.code, error.message)
            return
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await channel.send(error)  # after the batches already queued for it
        channel.close()


def _sole_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside ``group`` (through nested groups), else the group itself."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


_EXTRA_FIELDS = ("retry_after_ms", "valid_through", "content_length", "epoch")


def error_from_message(reply: ErrorMessage) -> BackstreamError:
    """The typed error an ``error`` frame stands for, its optional fields in ``extra``."""
    extra = {name: getattr(reply, name) for name in _EXTRA_FIELDS if getattr(reply, name) is not None}
    return error_for_code(reply.code, reply.message, **extra)
