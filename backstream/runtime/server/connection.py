"""The connection actor: one WebSocket client speaking PROTOCOL.md.

It owns its socket and its watches. Requests are handled one at a time, in
order, so replies go out in request order; each watch is a task of its own
that sends batches as the socket can take them. Nothing is queued per
connection beyond one batch per watch: a watch reads the next batch only
after the previous one was sent.

Every frame sent has a deadline (``send_timeout``). Before a batch, unsent
bytes in the socket are checked: a client that leaves more than
``max_unsent_bytes`` unread for ``slow_client_timeout`` is closed with 4429,
and the close frame still fits in the socket's buffer. Its jobs go on. Limits,
refusals, the send path and closing are the session core's (``server.session``);
a watch streams through the replay driver (``server.replay``) with a
``BatchProjection``.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed

from backstream.actors.clock import format_time
from backstream.actors.notifier import SUBSCRIBER_BUFFER
from backstream.actors.seats import CONNECTIONS
from backstream.protocol.codec import (
    ProtocolError,
    decode_client,
    encode,
    error_message,
    peek_request_id,
)
from backstream.protocol.errors import (
    BackstreamError,
    BadRequestError,
    UnauthorizedError,
)
from backstream.protocol.messages import (
    PROTOCOL_VERSION,
    ClientMessage,
    Hello,
    JobAbort,
    JobAbortResult,
    JobApprove,
    JobApproveResult,
    JobGet,
    JobList,
    JobListResult,
    JobStart,
    JobStarted,
    JobUnwatch,
    JobUnwatched,
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
    ServerInfo,
    ServerMessage,
    ThreadMute,
    ThreadMuteResult,
    Welcome,
    watch_ended_message,
)
from backstream.protocol.offsets import StreamOffset
from backstream.protocol.projections import BatchProjection
from backstream.protocol.records import NotificationRecord
from backstream.protocol.streams_wire import job_stream_path
from backstream.runtime.api import Runtime
from backstream.runtime.server.auth import Authenticator, Identity
from backstream.runtime.server.continued import continue_job
from backstream.runtime.server.frames import FrameCache
from backstream.runtime.server.paging import job_info_page
from backstream.runtime.server.peer import Close as _Close
from backstream.runtime.server.peer import close_at, seat_refusal
from backstream.runtime.server.replay import open_replay
from backstream.runtime.server.session import ConnectionLimits, ConnectionStats, Session
from backstream.runtime.server.websocket import ServerWebSocket

__all__ = ["MAX_HELLO_BYTES", "Connection", "ConnectionLimits", "ConnectionStats"]

MAX_HELLO_BYTES = 8 * 1024
"""The largest first frame (the ``hello``) of a ``/v1`` connection. It is read before the client
has authenticated, so it is capped far below ``max_message_bytes``: a larger one closes the
connection with 1009 while it is still arriving, never decoded. A hello with a long JWT fits."""

log = logging.getLogger("backstream.connection")


@attrs.define
class _Watch:
    scope: trio.CancelScope
    done: trio.Event = attrs.Factory(trio.Event)
    cleared_to_send: trio.Event = attrs.Factory(trio.Event)


class Connection:
    """Run with ``await connection.run()`` once the WebSocket is accepted."""

    def __init__(
        self,
        ws: ServerWebSocket,
        runtime: Runtime,
        authenticator: Authenticator,
        limits: ConnectionLimits,
        stats: ConnectionStats,
        *,
        conn_id: str,
        sock: trio.socket.SocketType | None = None,
        header_identity: Identity | None = None,
        features: dict[str, Any] | None = None,
        server_version: str = "0",
        frames: FrameCache | None = None,
    ) -> None:
        self._session = Session(
            ws,
            limits,
            stats,
            conn_id=conn_id,
            sock=sock,
            slow_reason="too slow: reconnect and resume from your last seq",
        )
        self._ws = ws
        self._runtime = runtime
        self._auth = authenticator
        self._limits = limits
        self._stats = stats
        self.conn_id = conn_id
        # The front door's: the watchers of a job on any of its connections share its frames.
        self._frames = frames if frames is not None else FrameCache()
        self._header_identity = header_identity
        self._features = features or {}
        self._server_version = server_version
        self.identity: Identity | None = None
        self._watches: dict[str, _Watch] = {}
        self._nursery: trio.Nursery | None = None

    # -- lifecycle ------------------------------------------------------------------

    def close_soon(self, code: int, reason: str) -> None:
        """Ask the connection to close with ``code`` (e.g. 1001 at shutdown). Returns at once."""
        self._session.close_soon(code, reason)

    async def run(self) -> None:
        """Serve the client until it leaves or is closed. Never raises for the client's faults.

        Cancellation: the session ends and the socket is closed; the user's jobs go on.
        """
        await self._session.run(self._serve)

    async def _serve(self) -> None:
        hello, identity = await self._hello()
        most = self._limits.max_connections_per_user
        seated = False
        try:  # one of the user's connections, on any instance, for as long as this one lasts
            async with self._runtime.seats.hold(identity.user, CONNECTIONS, most):
                seated = True
                self.identity = identity
                await self._welcome(hello, identity)
                await self._serve_requests()
        except BackstreamError as exc:
            if seated:
                raise
            await self._send_error(hello.id, exc.code, exc.message)
            raise seat_refusal(exc) from None

    async def _serve_requests(self) -> None:
        assert self.identity is not None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.identity.expires_at is not None:
                nursery.start_soon(self._expire, self.identity.expires_at)
            pusher = _NotificationPusher(nursery, self._push_notification)
            try:
                with self._runtime.follow_notifications(self.user, pusher):
                    await self._read_requests()
            except _Close as exc:
                self.close_soon(exc.code, exc.reason)
            except ConnectionClosed:
                pass  # the client left; nothing more to send
            finally:
                nursery.cancel_scope.cancel()

    async def _hello(self) -> tuple[Hello, Identity]:
        """The client's ``hello`` and whom it authenticates; a refusal raises ``Close``."""
        with trio.move_on_after(self._limits.hello_timeout) as waited:
            raw = await self._ws.get_message()
        if waited.cancelled_caught:
            raise _Close(4408, "no hello in time")
        try:
            message = decode_client(raw)
        except ProtocolError as exc:
            await self._send_error(exc.request_id, "unauthorized", "the first message must be hello")
            raise _Close(4401, "no hello") from None
        if not isinstance(message, Hello):
            await self._send_error(message.id, "unauthorized", "the first message must be hello")
            raise _Close(4401, "no hello")
        if message.protocol != PROTOCOL_VERSION:
            await self._send_error(
                message.id, "unsupported_protocol", f"this server speaks protocol {PROTOCOL_VERSION}"
            )
            raise _Close(4400, "unsupported protocol")
        try:
            if message.token is not None:
                identity = self._auth.authenticate(message.token)
            elif self._header_identity is not None:
                identity = self._header_identity
            else:
                raise UnauthorizedError("a token is required")
        except UnauthorizedError as exc:
            await self._send_error(message.id, "unauthorized", str(exc))
            raise _Close(4401, "unauthorized") from None
        return message, identity

    async def _welcome(self, message: Hello, identity: Identity) -> None:
        config = self._runtime.config
        await self._reply(
            Welcome(
                id=message.id,
                protocol=PROTOCOL_VERSION,
                user=identity.user,
                session_id="s_" + secrets.token_hex(8),
                server=ServerInfo(name="backstream", version=self._server_version),
                features=self._features,
                limits={
                    "max_message_bytes": self._limits.max_message_bytes,
                    "max_jobs_per_user": config.max_jobs_per_user,
                    "batch_ms": int(config.batch_ms)
                    if float(config.batch_ms).is_integer()
                    else config.batch_ms,
                },
                models=self._runtime.allowed_models(),
            )
        )
        log.info(
            "conn %s: user %s connected (socket %s)",
            self.conn_id,
            identity.user,
            "known" if self._session.gate.watches_a_socket else "unknown",
        )

    async def _push_notification(self, record: NotificationRecord) -> bool:
        """Push one notification; False once the connection cannot take more."""
        try:
            await self._send(encode(NotificationPush(notification=_wire(record))))
        except _Close as exc:
            self.close_soon(exc.code, exc.reason)
            return False
        except ConnectionClosed:
            return False
        return True

    async def _expire(self, expires_at: float) -> None:
        await close_at(expires_at, self.close_soon)

    # -- requests -------------------------------------------------------------------

    async def _read_requests(self) -> None:
        while True:
            raw = await self._ws.get_message()
            # Charged before decoding: a flood of frames costs no more than the bucket allows.
            if not self._session.charge():
                await self._refuse(peek_request_id(raw), "rate_limited", "too many requests; slow down")
                continue
            try:
                message = decode_client(raw)
            except ProtocolError as exc:
                await self._refuse(exc.request_id, exc.code, exc.message)
                continue
            await self._handle(message)

    async def _refuse(self, request_id: str | None, code: str, message: str) -> None:
        too_many = self._session.strike()
        await self._send_error(request_id, code, message)
        if too_many:
            raise _Close(1008, "too many refused requests")

    async def _handle(self, message: ClientMessage) -> None:
        handler = self._handlers.get(type(message))
        try:
            if handler is None:
                raise BadRequestError(f"{type(message).TYPE} is not allowed here")
            await handler(self, message)
        except BackstreamError as exc:
            retry = exc.extra.get("retry_after_ms")
            await self._send_error(
                message.id,
                exc.code,
                exc.message,
                retry if isinstance(retry, int) else None,
                job_id=getattr(message, "job_id", None),  # the job a job.* request named
                extra=exc.extra,
            )
        except (ConnectionClosed, _Close):
            raise
        except Exception:
            log.exception("conn %s: request %s failed", self.conn_id, type(message).TYPE)
            await self._send_error(
                message.id,
                "internal",
                "the server failed on this request",
                job_id=getattr(message, "job_id", None),
            )

    @property
    def user(self) -> str:
        assert self.identity is not None
        return self.identity.user

    async def _on_ping(self, message: Ping) -> None:
        await self._reply(Pong(id=message.id))

    async def _on_start(self, message: JobStart) -> None:
        if message.workflow is not None and message.model:
            raise BadRequestError("job.start names a model or a workflow, not both")
        if message.workflow is None and not message.model:
            raise BadRequestError("job.start needs a model (or a workflow)")
        messages, annotations = await self._continued(message)
        started = await self._runtime.start_job(
            user=self.user,
            thread_id=message.thread_id,
            message_id=message.message_id,
            model=message.model_name,
            messages=messages,
            params=message.params,
            tools=message.tools,
            annotations=annotations,
            workflow_input=message.input,
        )
        reply = JobStarted(
            id=message.id, job=started.job, existing=started.existing, stream=job_stream_path(started.job_id)
        )
        if message.watch:
            await self._start_watch(started.job_id, 0, None, reply, deltas=message.tool_call_deltas)
        else:
            await self._reply(reply)

    async def _continued(self, message: JobStart) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The job's messages and chain annotations: with ``previous_job_id``, that job's
        conversation (of this user, on this thread) and then the new messages."""
        if message.previous_job_id is None:
            return list(message.messages), {}
        continued = await continue_job(
            self._runtime,
            message.previous_job_id,
            message.messages,
            user=self.user,
            param="previous_job_id",
            what="Previous job",
        )
        if continued.thread_id != message.thread_id:
            raise BadRequestError(
                f"previous job {message.previous_job_id!r} is of thread {continued.thread_id!r}, "
                f"not {message.thread_id!r}"
            )
        return continued.messages, continued.annotations

    async def _on_watch(self, message: JobWatch) -> None:
        m = message
        await self._start_watch(m.job_id, m.after_seq, m.epoch, None, m.id, deltas=m.tool_call_deltas)

    async def _start_watch(
        self,
        job_id: str,
        after_seq: int,
        epoch: int | None,
        reply: JobStarted | None,
        request_id: str = "",
        *,
        deltas: bool = False,
    ) -> None:
        await self._stop_watch(job_id)  # watching again restarts from the new cursor
        if len(self._watches) >= self._limits.max_watches:
            raise BadRequestError(f"at most {self._limits.max_watches} watches per connection")
        assert self._nursery is not None
        watch = _Watch(scope=trio.CancelScope())
        # A start's reply carries its job already: the watch need not read it again.
        summary = await self._nursery.start(
            self._run_watch, job_id, after_seq, epoch, deltas, watch, reply is None
        )
        self._watches[job_id] = watch
        try:
            await self._reply(reply if reply is not None else JobWatching(id=request_id, job=summary))
        finally:
            watch.cleared_to_send.set()  # batches only after the reply

    async def _run_watch(
        self,
        job_id: str,
        after_seq: int,
        epoch: int | None,
        deltas: bool,
        watch: _Watch,
        with_summary: bool,
        *,
        task_status: trio.TaskStatus[Any],
    ) -> None:
        try:
            with watch.scope:
                async with open_replay(
                    self._runtime,
                    job_id,
                    BatchProjection(tool_call_deltas=deltas),
                    user=self.user,
                    offset=StreamOffset(after_seq, epoch),
                    max_batch_chars=self._session.frame_chars,
                ) as batches:
                    if with_summary:
                        task_status.started((await self._runtime.get_job(job_id, user=self.user)).job)
                    else:
                        task_status.started(None)
                    await watch.cleared_to_send.wait()
                    async for (batch,) in batches:
                        # Gated: a batch goes out only once the socket keeps up (4429 if never).
                        await self._session.send(self._frames.frame(batch))
                        self._stats.batches_sent += 1
        except BackstreamError as exc:
            if not watch.cleared_to_send.is_set():
                raise  # before started(): the request handler reports it
            with contextlib.suppress(_Close, ConnectionClosed):
                await self._send_error(
                    None, exc.code, watch_ended_message(job_id, exc.message), job_id=job_id, extra=exc.extra
                )
        except _Close as exc:
            self.close_soon(exc.code, exc.reason)
        except ConnectionClosed:
            pass  # the reader sees the close too and ends the session
        finally:
            if self._watches.get(job_id) is watch:
                del self._watches[job_id]
            watch.done.set()

    async def _stop_watch(self, job_id: str) -> None:
        watch = self._watches.pop(job_id, None)
        if watch is not None:
            watch.scope.cancel()
            await watch.done.wait()

    async def _on_unwatch(self, message: JobUnwatch) -> None:
        await self._stop_watch(message.job_id)
        await self._reply(JobUnwatched(id=message.id, job_id=message.job_id))

    async def _on_abort(self, message: JobAbort) -> None:
        result = await self._runtime.abort(message.job_id, user=self.user)
        await self._reply(JobAbortResult(id=message.id, aborted=result.aborted, job=result.job))

    async def _on_get(self, message: JobGet) -> None:
        info = await self._runtime.get_job(
            message.job_id, user=self.user, include_content=message.include_content, offset=message.offset
        )
        page = job_info_page(
            message.id,
            info,
            offset=message.offset,
            tool_calls_offset=message.tool_calls_offset,
            max_bytes=self._limits.max_message_bytes,
        )
        await self._reply(page)

    async def _on_list(self, message: JobList) -> None:
        jobs = await self._runtime.list_jobs(
            user=self.user, thread_id=message.thread_id, statuses=message.status, limit=message.limit
        )
        await self._reply(JobListResult(id=message.id, jobs=jobs))

    async def _on_approve(self, message: JobApprove) -> None:
        job = await self._runtime.approve(message.job_id, message.call_id, message.approved, user=self.user)
        await self._reply(JobApproveResult(id=message.id, job=job))

    async def _on_notifications_list(self, message: NotificationsList) -> None:
        items, unread = await self._runtime.notifications_list(
            user=self.user, unread_only=message.unread_only, limit=message.limit
        )
        await self._reply(
            NotificationsResult(id=message.id, notifications=[_wire(n) for n in items], unread=unread)
        )

    async def _on_notifications_read(self, message: NotificationsRead) -> None:
        if not message.all and not message.ids:
            raise BadRequestError("give ids, or all: true")
        unread = await self._runtime.notifications_read(
            user=self.user, ids=message.ids, everything=message.all
        )
        await self._reply(NotificationsReadResult(id=message.id, unread=unread))

    async def _on_mute(self, message: ThreadMute) -> None:
        await self._runtime.mute_thread(user=self.user, thread_id=message.thread_id, muted=message.muted)
        await self._reply(ThreadMuteResult(id=message.id, thread_id=message.thread_id, muted=message.muted))

    _handlers: dict[type[Any], Callable[[Connection, Any], Any]] = {
        Ping: _on_ping,
        JobStart: _on_start,
        JobWatch: _on_watch,
        JobUnwatch: _on_unwatch,
        JobAbort: _on_abort,
        JobGet: _on_get,
        JobList: _on_list,
        JobApprove: _on_approve,
        NotificationsList: _on_notifications_list,
        NotificationsRead: _on_notifications_read,
        ThreadMute: _on_mute,
    }

    # -- sending --------------------------------------------------------------------------

    async def _reply(self, message: ServerMessage) -> None:
        await self._send(encode(message))

    async def _send_error(
        self,
        request_id: str | None,
        code: str,
        message: str,
        retry_after_ms: int | None = None,
        *,
        job_id: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self._stats.errors_sent += 1
        await self._send(error_message(request_id, code, message, retry_after_ms, job_id=job_id, extra=extra))

    async def _send(self, text: str) -> None:
        """Send one reply within ``send_timeout`` (replies are not gated: they are small and
        answer the client); past it the client is too slow and the connection is dropped.

        Cancellation: the frame may be cut; the session ends."""
        await self._session.send(text, gated=False)


class _NotificationPusher:
    """The user's new notifications on their way to one connection (``Notifier.follow``'s
    sink): at most ``SUBSCRIBER_BUFFER`` wait (past it, ``send_nowait`` says full and the
    notifier drops and counts the notification, as for a full channel). A task pushes them
    only while some wait, so an idle connection holds no task and no channel for them."""

    __slots__ = ("_nursery", "_push", "_sending", "_waiting")

    def __init__(self, nursery: trio.Nursery, push: Callable[[NotificationRecord], Awaitable[bool]]) -> None:
        self._nursery = nursery
        self._push = push
        self._waiting: list[NotificationRecord] = []
        self._sending = False

    def send_nowait(self, record: NotificationRecord) -> None:
        if len(self._waiting) >= SUBSCRIBER_BUFFER:
            raise trio.WouldBlock
        self._waiting.append(record)
        if not self._sending:
            self._sending = True
            self._nursery.start_soon(self._push_waiting)

    async def _push_waiting(self) -> None:
        try:
            while self._waiting:
                if not await self._push(self._waiting.pop(0)):
                    self._waiting.clear()
        finally:
            self._sending = False


def _wire(record: NotificationRecord) -> Notification:
    return Notification(
        notification_id=record.notification_id,
        type=record.type,  # type: ignore[arg-type]
        job_id=record.job_id,
        thread_id=record.thread_id,
        title=record.title,
        body=record.body,
        created_at=format_time(record.created_at) or "",
        read=record.read,
    )
