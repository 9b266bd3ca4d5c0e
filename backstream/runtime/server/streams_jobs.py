"""Every job as a read-only durable stream: ``/v1/streams/jobs/{job_id}`` (or under a capability
URL that covers ``jobs/``), JSON mode, one message per AI SDK UI message chunk of the job (the
translation ``/v1/ai-sdk`` uses, ``UIChunkProjection``), closed once the job has ended.

An offset is ``EPOCH_COUNT`` (16 digits each): the chunks a reader has, in the log's epoch; a
job recovered at another epoch since answers an old offset 410. Each request translates the
log from its start (the chunks' numbering is a pure function of the log: the same on every
instance, on every read). Appends, creates and deletes are refused: 405.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress

import trio

from backstream.actors.watcher import Watcher
from backstream.protocol.errors import BadRequestError, GoneError, NotFoundError
from backstream.protocol.events import Batch, StatusEvent
from backstream.protocol.projections import UIChunkProjection
from backstream.protocol.streams_state import CLOSED, OFFSET, StreamRefusal, json_messages
from backstream.protocol.streams_wire import (
    CURSOR,
    SECURITY_HEADERS,
    UP_TO_DATE,
    ReadQuery,
    control_event,
    data_event,
    next_cursor,
    read_query,
)
from backstream.runtime.api import Runtime
from backstream.runtime.server.http_app import HttpApp, Request

__all__ = ["JOB_PREFIX", "JobStreams"]

JOB_PREFIX = "jobs/"
Reply = Callable[[Request, int, bytes, Mapping[str, str] | None], Awaitable[None]]
Cors = Callable[[Request], dict[str, str]]
MAX_CHUNKS_PER_READ = 4096


def _offset(epoch: int, count: int) -> str:
    return f"{epoch:016d}_{count:016d}"


class _JobView:
    """A job's chunks so far, read incrementally from one watch."""

    def __init__(self, watcher: Watcher, projection: UIChunkProjection) -> None:
        self._watcher = watcher
        self._projection = projection
        self.chunks: list[bytes] = []
        self.seq = 0
        self.ended = False

    @property
    def epoch(self) -> int:
        return self._watcher.epoch

    async def catch_up(self) -> None:
        """Translate what the log holds now."""
        while not self.ended:
            try:
                events = await self._watcher.read(self.seq)
            except BadRequestError:  # at the end of a finished job
                self.ended = True
                break
            if not events:
                break
            last = events[-1]
            batch = Batch(self._watcher.job_id, self.epoch, self.seq + 1, last.seq, events)
            for chunk in self._projection.project(batch):
                self.chunks.append(json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode())
            self.seq = last.seq
            self.ended = isinstance(last, StatusEvent) and last.is_terminal

    async def wait(self) -> None:
        await self._watcher.wait_beyond(self.seq)


class JobStreams:
    def __init__(
        self, app: HttpApp, runtime: Runtime, reply: Reply, cors: Cors, *, long_poll: float, sse_max: float
    ) -> None:
        self._app = app
        self._runtime = runtime
        self._reply = reply
        self._cors = cors
        self._long_poll_timeout = long_poll
        self._sse_max = sse_max

    @asynccontextmanager
    async def _view(self, user: str, job_id: str) -> AsyncIterator[_JobView]:
        projection = UIChunkProjection(job_id, approval_tools=self._runtime.tools.approval_names())
        projection.begin(-1)
        try:
            async with self._runtime.watch(
                job_id, user=user, after_seq=0, tool_call_deltas=True, merge_text=False
            ) as watcher:
                view = _JobView(watcher, projection)
                await view.catch_up()
                yield view
        except NotFoundError:
            raise StreamRefusal(404, "no such stream") from None
        except GoneError:
            raise StreamRefusal(410, "the job's log is gone") from None

    async def handle(self, request: Request, job_id: str, params: dict[str, list[str]]) -> None:
        if request.method not in ("GET", "HEAD"):
            raise StreamRefusal(405, "a job's stream is read-only", {"allow": "GET, HEAD"})
        async with self._view(request.user, job_id) as view:
            if request.method == "HEAD":
                await self._head(request, view)
                return
            query = read_query(params)
            start = self._start(query.offset, view)
            if query.live == "sse":
                async with self._app.stream_slot(request.user):
                    await self._sse(request, view, start, query.cursor)
            elif query.live == "long-poll":
                await self._long_poll(request, view, start, query)
            else:
                await self._send(request, view, start, query.offset, query.cursor, live=False)

    def _start(self, offset: str | None, view: _JobView) -> int:
        if offset is None or offset == "-1":
            return 0
        if offset == "now":
            return len(view.chunks)
        epoch_text, _, count_text = offset.partition("_")
        if not (epoch_text.isdigit() and count_text.isdigit()) or len(offset) > 40:
            raise StreamRefusal(400, "invalid offset")
        if int(epoch_text) != view.epoch:
            raise StreamRefusal(410, "the job was recovered since: read it again from -1")
        return min(int(count_text), len(view.chunks))

    async def _head(self, request: Request, view: _JobView) -> None:
        headers = {"content-type": "application/json", OFFSET: _offset(view.epoch, len(view.chunks))}
        headers["cache-control"] = "no-store"
        if view.ended:
            headers[CLOSED] = "true"
        await self._reply(request, 200, b"", headers)

    async def _send(
        self,
        request: Request,
        view: _JobView,
        start: int,
        given: str | None,
        cursor: str | None,
        *,
        live: bool,
    ) -> None:
        end = min(len(view.chunks), start + MAX_CHUNKS_PER_READ)
        up_to_date = end == len(view.chunks)
        closed = view.ended and up_to_date
        next_offset = _offset(view.epoch, end)
        etag = f'"job:{view.epoch}:{given or "-1"}:{next_offset}{":c" if closed else ""}"'
        headers = {"content-type": "application/json", OFFSET: next_offset, "etag": etag}
        headers["cache-control"] = "private, max-age=60, stale-while-revalidate=300"
        if up_to_date:
            headers[UP_TO_DATE] = "true"
        if closed:
            headers[CLOSED] = "true"
        elif live:
            headers[CURSOR] = next_cursor(time.time(), cursor, random.randint(1, 3600))
        if request.header("if-none-match") == etag:
            await self._reply(request, 304, b"", {"etag": etag})
            return
        await self._reply(request, 200, json_messages([c + b"," for c in view.chunks[start:end]]), headers)

    async def _long_poll(self, request: Request, view: _JobView, start: int, query: ReadQuery) -> None:
        cursor, given = query.cursor, query.offset
        if start >= len(view.chunks) and not view.ended:
            async with self._app.stream_slot(request.user):
                with trio.move_on_after(self._long_poll_timeout):
                    while start >= len(view.chunks) and not view.ended:
                        await view.wait()
                        await view.catch_up()
        if start < len(view.chunks):
            await self._send(request, view, start, given, cursor, live=True)
            return
        headers = {OFFSET: _offset(view.epoch, start), UP_TO_DATE: "true"}
        if view.ended:  # at the end of a finished job: EOF at once (section 5.7)
            headers[CLOSED] = "true"
        else:
            headers[CURSOR] = next_cursor(time.time(), cursor, random.randint(1, 3600))
        await self._reply(request, 204, b"", headers)

    async def _sse(self, request: Request, view: _JobView, start: int, cursor: str | None) -> None:
        head = {
            "content-type": "text/event-stream",
            "cache-control": "no-cache",
            **SECURITY_HEADERS,
            **self._cors(request),
        }
        await request.send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(k.encode(), v.encode()) for k, v in head.items()],
            }
        )
        sent = start
        told = False
        try:
            with trio.move_on_after(self._sse_max):
                while True:
                    chunks = b""
                    if sent < len(view.chunks):
                        batch = view.chunks[sent : sent + MAX_CHUNKS_PER_READ]
                        chunks += data_event(json_messages([c + b"," for c in batch]), base64_encoded=False)
                        sent += len(batch)
                    closed = view.ended and sent == len(view.chunks)
                    if chunks or closed or not told:
                        chunks += control_event(
                            _offset(view.epoch, sent),
                            closed=closed,
                            up_to_date=sent == len(view.chunks),
                            cursor=next_cursor(time.time(), cursor, random.randint(1, 3600)),
                        )
                        if not await self._app.send_stream_chunk(request, chunks) or closed:
                            break
                        told = True
                    if sent < len(view.chunks):
                        continue
                    await view.wait()
                    await view.catch_up()
        except (GoneError, BadRequestError):
            pass  # the reply has started: it ends; the client resumes and learns why
        with suppress(OSError, trio.BrokenResourceError):
            await request.send({"type": "http.response.body", "body": b"", "more_body": False})
