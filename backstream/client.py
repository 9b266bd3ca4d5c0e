"""The Python client for the WebSocket protocol (trio).

    async with backstream.client.open_client("ws://127.0.0.1:8765/v1", token) as client:
        started = await client.start_job(thread_id="t1", message_id="m1", model="backstream/echo",
                                          messages=[{"role": "user", "content": "hello"}])
        async with client.watch(started.job.job_id) as batches:
            async for batch in batches:
                print(batch.text, end="")

Watches survive dropped connections: the client reconnects with backoff and
jitter and resumes from the last ``seq`` it delivered, so the batches it yields
join into the job's content with no gap and no repeat. Errors are the typed
exceptions of ``backstream`` (``NotFoundError``, ``CapacityError``, ...).
"""

from __future__ import annotations

import itertools
import logging
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

import attrs
import trio
import wsproto.utilities
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

from backstream.protocol.backoff import Backoff
from backstream.protocol.codec import ProtocolError, decode_server, encode
from backstream.protocol.errors import BackstreamError, UnavailableError, error_for_code
from backstream.protocol.events import Batch
from backstream.protocol.messages import (
    PROTOCOL_VERSION,
    ClientMessage,
    ErrorMessage,
    Hello,
    JobAbort,
    JobAbortResult,
    JobApprove,
    JobApproveResult,
    JobEvents,
    JobGet,
    JobInfoMessage,
    JobList,
    JobListResult,
    JobStart,
    JobStarted,
    JobUnwatch,
    JobWatch,
    JobWatching,
    Notification,
    NotificationPush,
    NotificationsList,
    NotificationsRead,
    NotificationsReadResult,
    NotificationsResult,
    Ping,
    Pong,
    ServerMessage,
    ThreadMute,
    ThreadMuteResult,
    Welcome,
)

__all__ = ["Client", "ClientWatch", "open_client"]

log = logging.getLogger("backstream.client")

WATCH_BUFFER = 64
"""Batches buffered per watch; when full, the client stops reading its socket (backpressure)."""
INBOX_SIZE = 256
"""Notifications kept until read; when full, the oldest is dropped (the server keeps them all)."""
CLOSE_TIMEOUT = 2.0
"""Seconds for each step of closing a connection: the close handshake, then the server's TCP close."""

_BROKEN_CONNECTION = (wsproto.utilities.ProtocolError, ConnectionClosed)
"""What trio-websocket's reader raises for a connection that broke (for example wsproto's
``LocalProtocolError`` when a ping arrives after our close frame and the reader answers it)."""

_Reply = TypeVar("_Reply")


class _Session:
    """One WebSocket connection and what waits on it.

    ``closed``: no more messages will come (requests and watches move to a new connection).
    ``stop``: the connection is to be closed. ``ended``: its tasks are all done.
    """

    def __init__(self, ws: WebSocketConnection, welcome: Welcome) -> None:
        self.ws = ws
        self.welcome = welcome
        self.pending: dict[str, trio.MemorySendChannel[ServerMessage]] = {}
        self.watches: dict[str, trio.MemorySendChannel[JobEvents | ErrorMessage]] = {}
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


class Client:
    """Use through ``open_client``."""

    def __init__(
        self,
        nursery: trio.Nursery,
        url: str,
        token: str,
        *,
        client_name: str,
        token_in_header: bool,
        request_timeout: float,
        connect_timeout: float,
        reconnect_base: float,
        reconnect_max: float,
        max_reconnect_attempts: int,
    ) -> None:
        self._nursery = nursery
        self._url = url
        self._token = token
        self._client_name = client_name
        self._token_in_header = token_in_header
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._reconnect_base = reconnect_base
        self._reconnect_max = reconnect_max
        self._max_reconnect_attempts = max_reconnect_attempts
        self._ids = itertools.count(1)
        self._current: _Session | None = None
        self._connect_lock = trio.Lock()
        self._inbox: deque[Notification] = deque(maxlen=INBOX_SIZE)
        self._inbox_changed = trio.Event()
        self._closed = False
        self.reconnects = 0

    # -- connection --------------------------------------------------------------------

    @property
    def user(self) -> str:
        return self._current.welcome.user if self._current else ""

    @property
    def welcome(self) -> Welcome | None:
        return self._current.welcome if self._current else None

    async def _session(self) -> _Session:
        """The live session, connecting (with backoff) if there is none."""
        async with self._connect_lock:
            if self._current is not None and not self._current.closed.is_set():
                return self._current
            if self._closed:
                raise UnavailableError("the client is closed")
            backoff = Backoff(self._reconnect_base, self._reconnect_max, jitter="full")
            had_session = self._current is not None
            while True:
                try:
                    self._current = await self._connect()
                    if had_session:
                        self.reconnects += 1
                    return self._current
                except (
                    OSError,
                    HandshakeError,
                    ConnectionClosed,
                    UnavailableError,
                    trio.TooSlowError,
                    wsproto.utilities.ProtocolError,
                ) as exc:
                    if backoff.attempt >= self._max_reconnect_attempts:
                        raise UnavailableError(
                            f"could not connect after {backoff.attempt} retries: {exc}"
                        ) from None
                    await trio.sleep(backoff.next_delay())

    async def _connect(self) -> _Session:
        """A new connection; its tasks run in a nursery of their own (see ``_connection``).

        Raises the failure bare (``OSError``, ``ConnectionRejected``, a typed error for the
        ``hello``, ``trio.TooSlowError`` after ``connect_timeout``).
        """
        try:
            with trio.fail_after(self._connect_timeout):
                session: _Session = await self._nursery.start(self._connection)
        except BaseExceptionGroup as group:
            raise _sole_error(group) from None
        return session

    async def _connection(self, *, task_status: trio.TaskStatus[_Session] = trio.TASK_STATUS_IGNORED) -> None:
        """One connection's life, in a nursery of its own: trio-websocket's reader, ``_read``,
        and the close.

        Once welcomed, a connection that breaks (``_BROKEN_CONNECTION``, raised by
        trio-websocket's reader) ends here: its requests fail and its watches resume on a new
        connection. Other errors propagate. Cancellation: the connection's tasks end.
        """
        session: _Session | None = None
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

    async def _open_session(self, nursery: trio.Nursery) -> _Session:
        """Connect, with trio-websocket's reader in ``nursery``, and say ``hello``."""
        headers = [(b"authorization", f"Bearer {self._token}".encode())] if self._token_in_header else None
        ws = await connect_websocket_url(
            nursery,
            self._url,
            extra_headers=headers,
            message_queue_size=WATCH_BUFFER,
            max_message_size=64 * 1024 * 1024,
        )
        hello = Hello(
            id="hello",
            protocol=PROTOCOL_VERSION,
            token=None if self._token_in_header else self._token,
            client=self._client_name,
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
                raise error_for_code(reply.code, reply.message)
            raise UnavailableError(f"expected welcome, got {type(reply).TYPE}")
        return _Session(ws, reply)

    @staticmethod
    async def _close_when_stopped(session: _Session, tasks: trio.CancelScope) -> None:
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

    async def _read(self, session: _Session) -> None:
        try:
            while True:
                message = decode_server(await session.ws.get_message())
                if isinstance(message, JobEvents):
                    channel = session.watches.get(message.job_id)
                    if channel is not None:
                        try:
                            await channel.send(message)  # waits while the consumer is behind
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            session.watches.pop(message.job_id, None)
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

    async def _watch_ended(self, session: _Session, error: ErrorMessage) -> None:
        """An ``error`` without ``id``: the server ended the watch of its ``job_id`` (the watch
        decides what next)."""
        channel = session.watches.pop(error.job_id, None) if error.job_id is not None else None
        if channel is None:
            log.warning("server error: %s: %s", error.code, error.message)
            return
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await channel.send(error)  # after the batches already queued for it
        channel.close()

    async def _request(
        self, message: ClientMessage, expect: type[_Reply], session: _Session | None = None
    ) -> _Reply:
        session = session or await self._session()
        send, receive = trio.open_memory_channel[ServerMessage](1)
        session.pending[message.id] = send
        try:
            with trio.fail_after(self._request_timeout):
                try:
                    await session.ws.send_message(encode(message))
                    reply = await receive.receive()
                except (ConnectionClosed, trio.EndOfChannel):
                    raise UnavailableError("the connection was lost before the reply") from None
        except trio.TooSlowError:
            raise UnavailableError(f"no reply within {self._request_timeout:g} s") from None
        finally:
            session.pending.pop(message.id, None)
        if isinstance(reply, ErrorMessage):
            extra = {"retry_after_ms": reply.retry_after_ms} if reply.retry_after_ms is not None else {}
            raise error_for_code(reply.code, reply.message, **extra)
        if not isinstance(reply, expect):
            raise UnavailableError(f"unexpected reply {type(reply).TYPE}")
        return reply

    def _id(self) -> str:
        return f"r{next(self._ids)}"

    async def aclose(self) -> None:
        """Close the client and its connection, waiting at most ``2 * CLOSE_TIMEOUT``.

        Cancellation: shielded; the connection is closed all the same (bounded).
        """
        self._closed = True
        if self._current is not None:
            await self._current.close()

    async def drop_connection(self) -> None:
        """Close the current connection; watches resume on a new one (demos and tests use this).
        Waits at most ``2 * CLOSE_TIMEOUT``.

        Cancellation: shielded; the connection is dropped all the same (bounded).
        """
        if self._current is not None:
            await self._current.close()

    # -- requests -------------------------------------------------------------------------

    async def start_job(
        self,
        *,
        thread_id: str,
        message_id: str,
        model: str,
        messages: Sequence[dict[str, Any]],
        params: dict[str, Any] | None = None,
        tools: Sequence[str] | None = None,
    ) -> JobStarted:
        """Start a job (``job.start``). Cancellation: the job may still have started; a retry
        with the same ``message_id`` returns it."""
        message = JobStart(
            id=self._id(),
            thread_id=thread_id,
            message_id=message_id,
            model=model,
            messages=list(messages),
            params=dict(params or {}),
            tools=list(tools or []),
        )
        return await self._request(message, JobStarted)

    @asynccontextmanager
    async def watch(
        self, job_id: str, *, after_seq: int = 0, epoch: int | None = None
    ) -> AsyncIterator[ClientWatch]:
        """Watch a job from ``after_seq``; iterate for batches. Reconnects and resumes by itself.

        Cancellation: the watch ends on the server (``job.unwatch``) when the connection allows
        it; the job goes on.
        """
        watch = ClientWatch(self, job_id, after_seq, epoch)
        try:
            yield watch
        finally:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + 2
                await watch.aclose()

    async def abort(self, job_id: str) -> JobAbortResult:
        """Abort a job (``job.abort``). Cancellation: the abort may still have been requested."""
        return await self._request(JobAbort(id=self._id(), job_id=job_id), JobAbortResult)

    async def get(self, job_id: str, *, include_content: bool = False, offset: int = 0) -> JobInfoMessage:
        """The job's summary; with ``include_content`` its content from ``offset`` and its
        tool calls, fetched page by page when they do not fit in one frame (``job.get``).
        Cancellation: safe; nothing is changed on the server."""
        pages: list[JobInfoMessage] = []
        calls_offset = 0
        while True:
            message = JobGet(
                id=self._id(),
                job_id=job_id,
                include_content=include_content,
                offset=offset,
                tool_calls_offset=calls_offset,
            )
            page = await self._request(message, JobInfoMessage)
            pages.append(page)
            if page.next_offset is None and page.next_tool_calls_offset is None:
                break
            offset = page.next_offset if page.next_offset is not None else offset + len(page.content or "")
            calls_offset = page.next_tool_calls_offset or calls_offset + len(page.tool_calls)
        if len(pages) == 1:
            return pages[0]
        return attrs.evolve(
            pages[-1],
            content="".join(p.content or "" for p in pages) if include_content else None,
            tool_calls=[call for p in pages for call in p.tool_calls],
        )

    async def list_jobs(
        self, *, thread_id: str | None = None, status: Sequence[str] | None = None, limit: int = 50
    ) -> JobListResult:
        """The user's jobs, newest first (``job.list``). Cancellation: safe."""
        message = JobList(
            id=self._id(),
            thread_id=thread_id,
            status=list(status) if status is not None else None,
            limit=limit,
        )
        return await self._request(message, JobListResult)

    async def approve(self, job_id: str, call_id: str, approved: bool) -> JobApproveResult:
        """Decide on a tool call (``job.approve``). Cancellation: the decision may still stand."""
        message = JobApprove(id=self._id(), job_id=job_id, call_id=call_id, approved=approved)
        return await self._request(message, JobApproveResult)

    async def notifications_list(self, *, unread_only: bool = False, limit: int = 50) -> NotificationsResult:
        """The user's notifications (``notifications.list``). Cancellation: safe."""
        message = NotificationsList(id=self._id(), unread_only=unread_only, limit=limit)
        return await self._request(message, NotificationsResult)

    async def notifications_read(
        self, ids: Sequence[str] = (), *, all: bool = False
    ) -> NotificationsReadResult:
        """Mark notifications read. Cancellation: the marks may still have been written."""
        message = NotificationsRead(id=self._id(), ids=list(ids), all=all)
        return await self._request(message, NotificationsReadResult)

    async def mute_thread(self, thread_id: str, muted: bool = True) -> ThreadMuteResult:
        """Mute or unmute a thread. Cancellation: the change may still have been written."""
        return await self._request(
            ThreadMute(id=self._id(), thread_id=thread_id, muted=muted), ThreadMuteResult
        )

    async def ping(self) -> Pong:
        """A round trip (``ping``). Cancellation: safe."""
        return await self._request(Ping(id=self._id()), Pong)

    async def next_notification(self) -> Notification:
        """The next pushed notification (the oldest kept).

        Cancellation: safe; no notification is lost (it stays queued).
        """
        while not self._inbox:
            await self._inbox_changed.wait()
        return self._inbox.popleft()


class ClientWatch:
    """An async iterator of ``Batch`` that reconnects and resumes from its cursor.

    ``cursor`` is the last ``seq`` delivered. Raises ``GoneError`` if the log
    moved to another epoch while disconnected, and the other typed errors of
    ``job.watch``.
    """

    def __init__(self, client: Client, job_id: str, after_seq: int, epoch: int | None) -> None:
        self._client = client
        self.job_id = job_id
        self.cursor = after_seq
        self.epoch = epoch
        self.ended = False
        self._channel: trio.MemoryReceiveChannel[JobEvents | ErrorMessage] | None = None
        self._outages = Backoff(0.2, 5.0, jitter="full")
        self._session: _Session | None = None

    def __aiter__(self) -> ClientWatch:
        return self

    async def __anext__(self) -> Batch:
        while not self.ended:
            if self._channel is None:
                await self._subscribe()
                continue
            try:
                message = await self._channel.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                self._channel = None  # the connection dropped: resubscribe from the cursor
                continue
            if isinstance(message, ErrorMessage):
                await self._ended_by_server(message)
                continue
            if message.from_seq != self.cursor + 1:
                raise UnavailableError(f"batch starts at {message.from_seq}, expected {self.cursor + 1}")
            batch = Batch(
                message.job_id, message.epoch, message.from_seq, message.to_seq, tuple(message.events)
            )
            self.cursor, self.epoch = batch.to_seq, batch.epoch
            if batch.terminal is not None:
                self.ended = True
            return batch
        raise StopAsyncIteration

    async def _ended_by_server(self, error: ErrorMessage) -> None:
        """The server ended this watch: a passing outage (``unavailable``) is resumed from the
        cursor after a pause; anything else (``gone``: reload the job) is raised, typed."""
        self._channel = None
        if error.code != "unavailable":
            raise error_for_code(error.code, error.message)
        self._outages.attempt = min(self._outages.attempt, 8)
        await trio.sleep(self._outages.next_delay())

    async def _subscribe(self) -> None:
        while True:
            session = await self._client._session()
            send, receive = trio.open_memory_channel[JobEvents | ErrorMessage](WATCH_BUFFER)
            session.watches[self.job_id] = send
            message = JobWatch(
                id=self._client._id(), job_id=self.job_id, after_seq=self.cursor, epoch=self.epoch
            )
            try:
                reply = await self._client._request(message, JobWatching, session)
            except UnavailableError:
                session.watches.pop(self.job_id, None)
                continue  # lost the connection meanwhile; the next session resumes
            except BackstreamError:
                session.watches.pop(self.job_id, None)
                raise
            self._channel, self._session = receive, session
            self._outages.reset()
            if reply.job.is_terminal and reply.job.seq <= self.cursor:
                self.ended = True  # nothing after the cursor: the job is complete
            return

    async def aclose(self) -> None:
        """End this watch on the server (``job.unwatch``) if its connection is still open.

        Cancellation: the server may not have ended the watch; it does when the connection ends.
        """
        session, self._session = self._session, None
        if session is None or session.closed.is_set():
            return
        session.watches.pop(self.job_id, None)
        if not self.ended:
            with suppress(BackstreamError, trio.TooSlowError):
                await self._client._request(
                    JobUnwatch(id=self._client._id(), job_id=self.job_id), object, session
                )


def _sole_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside ``group`` (through nested groups), else the group itself."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def check_endpoint_url(url: str) -> None:
    """Raise ``ValueError`` unless ``url`` looks like a backstream endpoint (``ws://HOST:PORT/v1``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(
            f"{url!r} is not a backstream endpoint: expected ws://HOST:PORT/v1 or wss://HOST:PORT/v1"
        )


@asynccontextmanager
async def open_client(
    url: str,
    token: str,
    *,
    client_name: str = "backstream-python/0.1",
    token_in_header: bool = False,
    request_timeout: float = 30.0,
    connect_timeout: float = 10.0,
    reconnect_base: float = 0.2,
    reconnect_max: float = 10.0,
    max_reconnect_attempts: int = 30,
) -> AsyncIterator[Client]:
    """Connect to ``url`` (``ws://HOST:PORT/v1``) as the owner of ``token``.

    The first connection's failure raises here (``UnauthorizedError`` for a bad
    token). Later drops are retried, up to ``max_reconnect_attempts`` times in a
    row, with exponential backoff from ``reconnect_base`` to ``reconnect_max``
    seconds and full jitter.
    Cancellation: the connection is closed; nothing is left running.
    """
    check_endpoint_url(url)
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:  # each connection's tasks run in a nursery of their own
        client = Client(
            nursery,
            url,
            token,
            client_name=client_name,
            token_in_header=token_in_header,
            request_timeout=request_timeout,
            connect_timeout=connect_timeout,
            reconnect_base=reconnect_base,
            reconnect_max=reconnect_max,
            max_reconnect_attempts=max_reconnect_attempts,
        )
        try:
            try:
                client._current = await client._connect()
            except ConnectionRejected as exc:
                raise UnavailableError(
                    f"{url} is not a backstream endpoint: the server answered HTTP {exc.status_code}"
                ) from None
            except ProtocolError:
                raise UnavailableError(f"{url} is not a backstream endpoint: hello got no welcome") from None
            except OSError as exc:
                raise UnavailableError(f"cannot connect to {url}: {exc.strerror or exc}") from None
            yield client
        except Exception as exc:
            # Raised bare after the nursery, not wrapped in an ExceptionGroup.
            failure = exc
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
