"""OpenAI's Responses API on the HTTP listener: a thin shell over the runtime and
``protocol.responses``.

``POST /v1/responses``, ``GET /v1/responses/{id}`` (``?stream=true&starting_after=N`` for
server-sent events; ``Last-Event-ID`` resumes too), ``POST /v1/responses/{id}/cancel``.
The response id is the job id.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

import trio

from backstream.protocol.errors import BackstreamError, BadRequestError
from backstream.protocol.events import LogEvent
from backstream.protocol.ids import new_id
from backstream.protocol.records import JobRecord
from backstream.protocol.responses import (
    ResponseSource,
    ResponsesTranslator,
    parse_create,
    sse_frame,
)
from backstream.runtime.server.http_app import HttpApp, Request, StreamSocket, error_response

__all__ = ["ResponsesApi"]

log = logging.getLogger("backstream.responses")

_MAX_CHUNK_BYTES = 64 * 1024
"""A stream is written in chunks of about this size: one chunk is what a stream holds unsent."""
_ID = r"(?P<id>[A-Za-z0-9_\-]{1,256})"


class ResponsesApi:
    """Registers the Responses routes on an ``HttpApp``."""

    def __init__(self, app: HttpApp) -> None:
        self._app = app
        self._runtime = app.runtime
        app.route("POST", r"/v1/responses", self._create)
        app.route("GET", rf"/v1/responses/{_ID}", self._retrieve)
        app.route("POST", rf"/v1/responses/{_ID}/cancel", self._cancel)

    # -- endpoints --------------------------------------------------------------------------

    async def _create(self, request: Request, _: re.Match[str]) -> None:
        limits = self._app.limits
        parsed = parse_create(await request.json_body(limits.max_body_bytes, limits.body_timeout))
        if parsed.stream:
            self._app.check_stream_slot(request.user)  # before the job starts, not after
        # A client may send an Idempotency-Key: a retried create then finds the same job.
        key = request.header("idempotency-key")
        message_id = f"idem:{key}" if key and len(key) <= 200 else new_id("m_")
        started = await self._runtime.start_job(
            user=request.user,
            thread_id=parsed.thread_id or new_id("t_"),
            message_id=message_id,
            model=parsed.model,
            messages=parsed.messages,
            params=parsed.params,
            tools=parsed.tools,
            annotations=parsed.annotations,
        )
        job_id = started.job_id
        if parsed.stream:
            await self._stream(request, job_id, after=-1)
            return
        if not parsed.background:
            await self._wait_for_end(request, job_id)
        await self._app.send_json(request, 200, await self._response_object(request.user, job_id))

    async def _retrieve(self, request: Request, match: re.Match[str]) -> None:
        job_id = match["id"]
        if (request.query("stream") or "").lower() != "true":
            await self._app.send_json(request, 200, await self._response_object(request.user, job_id))
            return
        await self._stream(request, job_id, after=_resume_point(request))

    async def _cancel(self, request: Request, match: re.Match[str]) -> None:
        job_id = match["id"]
        await self._runtime.abort(job_id, user=request.user)
        await self._app.send_json(request, 200, await self._response_object(request.user, job_id))

    # -- the response object -----------------------------------------------------------------

    async def _response_object(self, user: str, job_id: str) -> dict[str, Any]:
        record, entries = await self._runtime.job_log(job_id, user=user)
        translator = ResponsesTranslator(_source(record))
        translator.feed_all(entries)
        response = translator.snapshot()
        if translator.finished:
            info = await self._runtime.get_job(job_id, user=user)
            if info.job.finished_at is not None:
                response["completed_at"] = _unix(info.job.finished_at)
        return response

    async def _wait_for_end(self, request: Request, job_id: str) -> None:
        """Wait for the job's end; if the client leaves meanwhile, the job goes on. At shutdown
        the wait ends early: the reply says ``in_progress``."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, request, nursery.cancel_scope)
            nursery.start_soon(_cancel_on_event, self._app.closing, nursery.cancel_scope)
            async with self._runtime.watch(job_id, user=request.user) as batches:
                async for _ in batches:
                    pass
            nursery.cancel_scope.cancel()

    # -- streaming ----------------------------------------------------------------------------

    async def _stream(self, request: Request, job_id: str, *, after: int) -> None:
        """Server-sent events numbered from 0; only those after ``after`` are sent."""
        user = request.user
        with self._app.stream_slot(user):
            await self._stream_events(request, job_id, after=after)

    async def _stream_events(self, request: Request, job_id: str, *, after: int) -> None:
        record, entries = await self._runtime.job_log(job_id, user=request.user)
        translator = ResponsesTranslator(_source(record))
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            *((k.encode(), v.encode()) for k, v in self._app.cors_headers(request).items()),
        ]
        await request.send({"type": "http.response.start", "status": 200, "headers": headers})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, request, nursery.cancel_scope)
            nursery.start_soon(_cancel_on_event, self._app.closing, nursery.cancel_scope)
            sent = await self._write(request, _after(after, translator.start(), translator, entries))
            if sent and not translator.finished:
                await self._follow(request, job_id, len(entries), translator, after)
            nursery.cancel_scope.cancel()
        if not request.socket.cut:
            await request.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _follow(
        self, request: Request, job_id: str, seq: int, translator: ResponsesTranslator, after: int
    ) -> bool:
        try:
            async with self._runtime.watch(
                job_id, user=request.user, after_seq=seq, merge_text=False
            ) as batches:
                async for batch in batches:
                    if not await self._write(request, _after(after, [], translator, batch.events)):
                        return False
        except BackstreamError as exc:
            # The log can no longer be read (e.g. gone): say so in the stream, unnumbered for resumes.
            _, body, _ = error_response(exc)
            error = {"type": "error", "sequence_number": translator.next_sequence_number, **body["error"]}
            return await self._write(request, [error], with_id=False)
        return True

    async def _write(
        self, request: Request, events: Iterable[dict[str, Any]], *, with_id: bool = True
    ) -> bool:
        """Send events in chunks of about ``max_chunk_bytes``, each within the deadlines;
        False if the client was cut off. Events are made as chunks go out, not before."""
        chunk: list[bytes] = []
        size = 0
        for event in events:
            frame = sse_frame(event, with_id=with_id)
            chunk.append(frame)
            size += len(frame)
            if size >= _MAX_CHUNK_BYTES:
                if not await self._send_chunk(request, b"".join(chunk)):
                    return False
                chunk, size = [], 0
        return await self._send_chunk(request, b"".join(chunk)) if chunk else True

    async def _send_chunk(self, request: Request, body: bytes) -> bool:
        limits = self._app.limits
        sock = request.socket
        deadline = trio.current_time() + limits.slow_client_timeout
        while not sock.gate.keeps_up():
            if trio.current_time() >= deadline:
                log.info("a stream's client is too slow: cut off (it can resume)")
                sock.shut()
                self._app.stream_cut()
                return False
            await trio.sleep(0.02)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cut_after, sock, limits.send_timeout)
            await request.send({"type": "http.response.body", "body": body, "more_body": True})
            nursery.cancel_scope.cancel()
        if sock.cut:
            self._app.stream_cut()
        return not sock.cut


def _after(
    after: int, first: list[dict[str, Any]], translator: ResponsesTranslator, entries: Iterable[LogEvent]
) -> Iterator[dict[str, Any]]:
    """The events of ``first`` and then of each entry, made one entry at a time, numbered
    beyond ``after``."""
    for event in first:
        if event["sequence_number"] > after:
            yield event
    for entry in entries:
        for event in translator.feed(entry):
            if event["sequence_number"] > after:
                yield event


def _source(record: JobRecord) -> ResponseSource:
    return ResponseSource(
        response_id=record.job_id,
        created_at=record.created_at,
        model=record.model,
        params=record.request.params,
        annotations=record.request.annotations,
        thread_id=record.thread_id,
    )


def _resume_point(request: Request) -> int:
    """The last sequence number the client has: ``Last-Event-ID`` (an EventSource
    reconnecting) over ``starting_after``; -1 for none."""
    for raw, name in (
        (request.header("last-event-id"), "Last-Event-ID"),
        (request.query("starting_after"), "starting_after"),
    ):
        if raw is None or raw == "":
            continue
        try:
            value = int(raw)
        except ValueError:
            raise BadRequestError(f"{name} must be an integer", param=name) from None
        if value < -1:
            raise BadRequestError(f"{name} must be -1 or more", param=name)
        return value
    return -1


def _unix(stamp: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())


async def _cancel_on_disconnect(request: Request, scope: trio.CancelScope) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def _cancel_on_event(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _cut_after(sock: StreamSocket, seconds: float) -> None:
    await trio.sleep(seconds)
    log.info("a stream write did not go out within %gs: cut off", seconds)
    sock.shut()
