"""The Python client's calls: ``Client`` (one method per request of the protocol) and
``open_client``, which connects and closes. Connections are ``transport.py``'s; a watch that
resumes is ``watch.py``'s.
"""

from __future__ import annotations

import ssl
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import attrs
import trio
from trio_websocket import ConnectionRejected

from backstream.client.transport import ConnectSettings, Transport
from backstream.client.watch import ClientWatch
from backstream.protocol.codec import ProtocolError
from backstream.protocol.errors import UnavailableError
from backstream.protocol.messages import (
    ClientMessage,
    JobAbort,
    JobAbortResult,
    JobApprove,
    JobApproveResult,
    JobGet,
    JobInfoMessage,
    JobList,
    JobListResult,
    JobStart,
    JobStarted,
    Notification,
    NotificationsList,
    NotificationsRead,
    NotificationsReadResult,
    NotificationsResult,
    Ping,
    Pong,
    ThreadMute,
    ThreadMuteResult,
    Welcome,
)

__all__ = ["Client", "check_endpoint_url", "open_client"]

_Reply = TypeVar("_Reply")

UNWATCH_TIMEOUT = 2.0
"""Seconds that leaving a ``watch`` block waits for ``job.unwatch`` (the connection's end unwatches too)."""


class Client:
    """Use through ``open_client``."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    @property
    def user(self) -> str:
        """The user the server welcomed this client as ("" before the first welcome)."""
        current = self._transport.current
        return current.welcome.user if current else ""

    @property
    def welcome(self) -> Welcome | None:
        """The current connection's ``welcome``."""
        current = self._transport.current
        return current.welcome if current else None

    @property
    def reconnects(self) -> int:
        """How many times the client connected again after a connection ended."""
        return self._transport.reconnects

    async def aclose(self) -> None:
        """Close the client and its connection, waiting at most ``2 * CLOSE_TIMEOUT``.

        Cancellation: shielded; the connection is closed all the same (bounded).
        """
        await self._transport.aclose()

    async def drop_connection(self) -> None:
        """Close the current connection; watches resume on a new one (demos and tests use this).
        Waits at most ``2 * CLOSE_TIMEOUT``.

        Cancellation: shielded; the connection is dropped all the same (bounded).
        """
        await self._transport.drop()

    async def _request(self, message: ClientMessage, expect: type[_Reply]) -> _Reply:
        return await self._transport.request(message, expect)

    def _id(self) -> str:
        return self._transport.next_id()

    async def start_job(
        self,
        *,
        thread_id: str,
        message_id: str,
        model: str = "",
        messages: Sequence[dict[str, Any]] = (),
        params: dict[str, Any] | None = None,
        tools: Sequence[str] | None = None,
        previous_job_id: str | None = None,
        workflow: str | None = None,
        workflow_input: dict[str, Any] | None = None,
    ) -> JobStarted:
        """Start a job (``job.start``): a ``model`` with ``messages``, or a ``workflow`` with
        its ``workflow_input`` (docs/workflows.md). With ``previous_job_id`` (an ended job of
        the same thread) the job continues that one's conversation: ``messages`` hold only
        what is new. Cancellation: the job may still have started; a retry with the same
        ``message_id`` returns it."""
        message = JobStart(
            id=self._id(),
            thread_id=thread_id,
            message_id=message_id,
            model=model,
            messages=list(messages),
            params=dict(params or {}),
            tools=list(tools or []),
            previous_job_id=previous_job_id,
            workflow=workflow,
            input=workflow_input,
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
        watch = ClientWatch(self._transport, job_id, after_seq, epoch)
        try:
            yield watch
        finally:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + UNWATCH_TIMEOUT
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
        return await self._transport.next_notification()


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
    ssl_context: ssl.SSLContext | None = None,
    compression: bool = True,
) -> AsyncIterator[Client]:
    """Connect to ``url`` (``ws://HOST:PORT/v1``) as the owner of ``token``.

    For ``wss://``, ``ssl_context`` says which certificates to trust (e.g.
    ``ssl.create_default_context(cafile=...)`` for a private CA); None: the system's.
    ``compression`` offers permessage-deflate (the server compresses its frames if it agrees).

    The first connection's failure raises here (``UnauthorizedError`` for a bad
    token). Later drops are retried, up to ``max_reconnect_attempts`` times in a
    row, with exponential backoff from ``reconnect_base`` to ``reconnect_max``
    seconds and full jitter.
    Cancellation: the connection is closed; nothing is left running.
    """
    check_endpoint_url(url)
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:  # each connection's tasks run in a nursery of their own
        settings = ConnectSettings(
            url,
            token,
            client_name=client_name,
            token_in_header=token_in_header,
            request_timeout=request_timeout,
            connect_timeout=connect_timeout,
            reconnect_base=reconnect_base,
            reconnect_max=reconnect_max,
            max_reconnect_attempts=max_reconnect_attempts,
            ssl_context=ssl_context,
            compression=compression,
        )
        transport = Transport(nursery, settings)
        client = Client(transport)
        try:
            try:
                await transport.open()
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
