"""Durable Streams reads: HEAD, catch-up GET (ETag, 304, cache headers), long-poll and SSE
(PROTOCOL.md sections 5.5 to 5.8, 8 and 10)."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping

import attrs
import trio

from backstream.protocol.streams_state import (
    CLOSED,
    OFFSET,
    Message,
    StreamRefusal,
    StreamState,
    format_offset,
    is_json,
    json_messages,
)
from backstream.protocol.streams_wire import (
    CURSOR,
    SECURITY_HEADERS,
    SSE_ENCODING,
    UP_TO_DATE,
    ReadQuery,
    control_event,
    data_event,
    next_cursor,
    read_etag,
    read_query,
    sse_base64,
)
from backstream.runtime.server.http_app import HttpApp, Request
from backstream.runtime.server.streams_ops import StreamOps

__all__ = ["StreamReader", "StreamsSettings"]

log = logging.getLogger("backstream.streams")

Reply = Callable[[Request, int, bytes, Mapping[str, str] | None], Awaitable[None]]
Cors = Callable[[Request], dict[str, str]]
CACHEABLE = "private, max-age=60, stale-while-revalidate=300"
"""Catch-up ranges never change; ``private``: streams belong to their users (section 10.1)."""


@attrs.frozen(kw_only=True)
class StreamsSettings:
    long_poll_timeout: float = 20.0
    """A long-poll read with nothing new answers 204 after this."""
    sse_max_duration: float = 60.0
    """An SSE response ends after this (the client reconnects; CDNs collapse the reconnects)."""
    rate_per_s: float = 200.0
    rate_burst: int = 400
    max_body_bytes: int = 1024 * 1024
    body_timeout: float = 10.0
    signing_key: bytes | None = None
    """Signs capability URLs; without one, none are accepted or minted."""
    auth_cookie: str | None = None
    allow_origins: tuple[str, ...] = ()


def _cursor(client: str | None) -> str:
    return next_cursor(time.time(), client, random.randint(1, 3600))


class StreamReader:
    def __init__(
        self, app: HttpApp, ops: StreamOps, settings: StreamsSettings, reply: Reply, cors: Cors
    ) -> None:
        self._app = app
        self._cors = cors
        self._ops = ops
        self._settings = settings
        self._reply = reply

    async def head(self, request: Request, key: str) -> None:
        state = await self._ops.live(key)
        headers = {
            "content-type": state.content_type,
            OFFSET: format_offset(state.tail),
            "cache-control": "no-store",
            "etag": read_etag(state.incarnation, "-1", format_offset(state.tail), state.closed),
        }
        if state.closed:
            headers[CLOSED] = "true"
        if state.ttl_seconds is not None:
            headers["Stream-TTL"] = str(state.ttl_seconds)
        if state.expires_at is not None:
            headers["Stream-Expires-At"] = state.expires_at
        await self._reply(request, 200, b"", headers)

    async def get(self, request: Request, key: str, params: dict[str, list[str]]) -> None:
        query = read_query(params)
        state = await self._ops.live(key)
        await self._ops.touch(key, state)
        if query.live == "sse":
            async with self._app.stream_slot(request.user):
                await self._sse(request, key, state, query)
            return
        if query.offset == "now" and query.live is None:
            await self._now(request, state)
            return
        after = state.tail if query.offset == "now" else (query.position if query.position is not None else 0)
        if query.live == "long-poll":
            await self._long_poll(request, key, state, query, after)
            return
        messages = await self._ops.read(key, state, after)
        await self._send_range(request, state, query, after, messages, live=False)

    async def _now(self, request: Request, state: StreamState) -> None:
        headers = {
            "content-type": state.content_type,
            OFFSET: format_offset(state.tail),
            UP_TO_DATE: "true",
            "cache-control": "no-store",
        }
        if state.closed:
            headers[CLOSED] = "true"
        await self._reply(request, 200, b"[]" if is_json(state.content_type) else b"", headers)

    async def _send_range(
        self,
        request: Request,
        state: StreamState,
        query: ReadQuery,
        after: int,
        messages: list[Message],
        *,
        live: bool,
    ) -> None:
        end = messages[-1][0] if messages else state.tail
        up_to_date = end >= state.tail
        closed = state.closed and up_to_date
        end_offset = format_offset(end)
        headers = {"content-type": state.content_type, OFFSET: end_offset}
        if up_to_date:
            headers[UP_TO_DATE] = "true"
        if closed:
            headers[CLOSED] = "true"
        if live and not closed:
            headers[CURSOR] = _cursor(query.cursor)
        etag = read_etag(state.incarnation, query.offset or "-1", end_offset, closed)
        headers["etag"] = etag
        headers["cache-control"] = CACHEABLE
        if request.header("if-none-match") == etag:
            await self._reply(request, 304, b"", {"etag": etag, "cache-control": CACHEABLE})
            return
        data = [chunk for _, chunk in messages]
        body = json_messages(data) if is_json(state.content_type) else b"".join(data)
        await self._reply(request, 200, body, headers)

    async def _long_poll(
        self, request: Request, key: str, state: StreamState, query: ReadQuery, after: int
    ) -> None:
        with self._ops.store.changes.watch(key) as watch:
            state = await self._ops.live(key)  # watched from here: no change is missed
            messages = await self._ops.read(key, state, after)
            if messages or (after < state.tail):
                await self._send_range(request, state, query, after, messages, live=True)
                return
            if state.closed:
                await self._reply(request, 204, b"", _closed_headers(state))
                return
            found = None
            async with self._app.stream_slot(request.user):
                # Only waiting is under the deadline: a reply must never be cut in the middle.
                with trio.move_on_after(self._settings.long_poll_timeout):
                    while found is None:
                        await watch.wait()
                        watch.arm()
                        state = await self._ops.live(key)
                        messages = await self._ops.read(key, state, after)
                        if messages or state.closed:
                            found = state, messages
            if found is not None:
                state, messages = found
                if messages:
                    await self._send_range(request, state, query, after, messages, live=True)
                else:
                    await self._reply(request, 204, b"", _closed_headers(state))
                return
            state = await self._ops.live(key)
            messages = await self._ops.read(key, state, after)
            if messages:  # arrived as the wait ended
                await self._send_range(request, state, query, after, messages, live=True)
                return
            headers = {OFFSET: format_offset(max(after, state.tail)), UP_TO_DATE: "true"}
            if state.closed:
                headers[CLOSED] = "true"
            else:
                headers[CURSOR] = _cursor(query.cursor)
            await self._reply(request, 204, b"", headers)

    async def _sse(self, request: Request, key: str, state: StreamState, query: ReadQuery) -> None:
        encoded = sse_base64(state.content_type)
        headers = {
            "content-type": "text/event-stream",
            "cache-control": "no-cache",
            **SECURITY_HEADERS,
            **self._cors(request),
        }
        if encoded:
            headers[SSE_ENCODING] = "base64"
        head = [(k.encode(), v.encode()) for k, v in headers.items()]
        await request.send({"type": "http.response.start", "status": 200, "headers": head})
        after = state.tail if query.offset == "now" else (query.position if query.position is not None else 0)
        try:
            await self._sse_events(request, key, after, encoded, query)
        except Exception:  # the reply has started: end it (the client resumes), never answer twice
            log.exception("a durable stream's SSE reply failed")
        with contextlib.suppress(OSError, trio.BrokenResourceError):
            await request.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _sse_events(
        self, request: Request, key: str, after: int, encoded: bool, query: ReadQuery
    ) -> None:
        told = False  # whether a control event has told where the stream is
        with self._ops.store.changes.watch(key) as watch, trio.move_on_after(self._settings.sse_max_duration):
            while not self._app.closing.is_set():
                watch.arm()
                try:
                    state = await self._ops.live(key)
                except StreamRefusal:
                    break
                messages = await self._ops.read(key, state, after)
                if messages or not told or state.closed:
                    if not await self._sse_batch(request, state, messages, after, encoded, query):
                        break
                    told = True
                if messages:
                    after = messages[-1][0]
                    continue
                with trio.move_on_after(self._settings.long_poll_timeout) as waited:
                    await watch.wait()
                if waited.cancelled_caught:
                    beat = control_event(
                        format_offset(after), closed=False, up_to_date=True, cursor=_cursor(query.cursor)
                    )
                    if not await self._app.send_stream_chunk(request, beat):
                        break

    async def _sse_batch(
        self,
        request: Request,
        state: StreamState,
        messages: list[Message],
        after: int,
        encoded: bool,
        query: ReadQuery,
    ) -> bool:
        """The data event of ``messages`` (if any) and its control event; False if the client
        was cut off, or once the stream's closure has been told."""
        chunks = b""
        if messages:
            data = [chunk for _, chunk in messages]
            payload = json_messages(data) if is_json(state.content_type) else b"".join(data)
            chunks += data_event(payload, base64_encoded=encoded)
        end = messages[-1][0] if messages else state.tail
        up_to_date = end >= state.tail
        closed = state.closed and up_to_date
        chunks += control_event(
            format_offset(end), closed=closed, up_to_date=up_to_date, cursor=_cursor(query.cursor)
        )
        sent = await self._app.send_stream_chunk(request, chunks)
        return sent and not closed


def _closed_headers(state: StreamState) -> dict[str, str]:
    return {OFFSET: format_offset(state.tail), UP_TO_DATE: "true", CLOSED: "true"}
