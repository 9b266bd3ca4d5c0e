"""OpenAI's Responses API on the HTTP listener: a thin shell over the runtime and
``protocol.responses``.

``POST /v1/responses``, ``GET /v1/responses/{id}`` (``?stream=true&starting_after=N`` for
server-sent events; ``Last-Event-ID`` resumes too), ``POST /v1/responses/{id}/cancel``;
conversation state (``previous_response_id``, approvals, ``store``, ``input_items``,
``DELETE``) is ``server.responses_state``'s.
The response id is the job id. A stream goes through the replay driver (``server.replay``)
with a ``ResponsesProjection``; each event's ``id:`` is its offset ``"<epoch>_<n>"``, so an
EventSource reconnecting after the job was recovered at a new epoch is answered ``gone``
(410); ``starting_after`` takes a bare sequence number too.

A create's body is read by ``Request.json_body`` (checked as WebSocket frames are) and
``parse_create``. An ``Idempotency-Key`` header (at most 200 characters, else a 400) is the
job's message id: a retry with the same body (by canonical JSON, so key order and spacing do
not matter) answers the same response; the same key with another body is a 409
``conflict``. The body's fingerprint is kept with the job in the store, so this holds
across instances sharing a store.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

import trio

from backstream.protocol.errors import BackstreamError, BadRequestError, ConflictError, UnauthorizedError
from backstream.protocol.events import LogEvent
from backstream.protocol.ids import new_id
from backstream.protocol.offsets import NO_OFFSET, StreamOffset, parse_offset
from backstream.protocol.projections import ResponsesProjection
from backstream.protocol.records import JobRecord
from backstream.protocol.responses import ResponseSource, ResponsesTranslator
from backstream.protocol.responses_request import (
    BODY_SHA256,
    MAX_IDEMPOTENCY_KEY_CHARS,
    ResponseRequest,
    body_fingerprint,
    parse_create,
)
from backstream.protocol.responses_sse import sse_frame
from backstream.protocol.streams_wire import job_stream_path
from backstream.runtime.server.http_app import HttpApp, Request, error_response
from backstream.runtime.server.replay import Replay, open_replay
from backstream.runtime.server.responses_state import ResponsesState, awaits_approval
from backstream.runtime.server.session import frame_chars

__all__ = ["ResponsesApi"]

log = logging.getLogger("backstream.responses")

_ID = r"(?P<id>[A-Za-z0-9_\-]{1,256})"


class ResponsesApi:
    """Registers the Responses routes on an ``HttpApp``."""

    def __init__(self, app: HttpApp) -> None:
        self._app = app
        self._runtime = app.runtime
        app.route("POST", r"/v1/responses", self._create)
        app.route("GET", rf"/v1/responses/{_ID}", self._retrieve)
        app.route("POST", rf"/v1/responses/{_ID}/cancel", self._cancel)
        self._state = ResponsesState(app)

    # -- endpoints --------------------------------------------------------------------------

    async def _create(self, request: Request, _: re.Match[str]) -> None:
        """A create that streams or waits for the end holds one of the user's open streams
        from before its job starts (a refusal starts no job) until its reply is sent."""
        limits = self._app.limits
        body = await request.json_body(limits.max_body_bytes, limits.body_timeout)
        parsed = parse_create(body)
        if parsed.background and not parsed.stream:
            job_id = await self._start(request, body, parsed)
            response = await self._response_object(request.user, job_id)
            await self._app.send_json(request, 200, response, _stream_link(job_id))
            return
        # A response kept for nobody (store: false; an approval's answer resumes a stored
        # one) is deleted before its reply goes out, or once its stream or client is gone.
        forget = not parsed.store and not parsed.approvals
        async with self._app.stream_slot(request.user):
            job_id = await self._start(request, body, parsed)
            try:
                if parsed.stream:
                    await self._stream_events(request, job_id, NO_OFFSET, "starting_after")
                    return
                # Unstored, it waits for its real end: an approval it asked for is answered
                # over WebSocket (job.approve) meanwhile.
                await self._wait_for_end(request, job_id, until_approval=not forget)
                response = await self._response_object(request.user, job_id)
                if forget:
                    await self._state.forget(request.user, job_id)
                await self._app.send_json(request, 200, response)
            finally:
                if forget:
                    await self._state.forget(request.user, job_id)

    async def _start(self, request: Request, body: Any, parsed: ResponseRequest) -> str:
        """Start the create's job (or find the one its Idempotency-Key started); its id.
        ``mcp_approval_response`` items start none: the previous response resumes."""
        if parsed.approvals:
            return await self._state.answer_approvals(request.user, parsed)
        key = _idempotency_key(request)
        # With an Idempotency-Key a retried create finds the same job (its message id); the
        # body's fingerprint, kept with the job in the store, tells a retry from a reuse.
        fingerprint = body_fingerprint(body)
        start = await self._state.start_with(request.user, parsed)
        annotations = start.annotations if key is None else {**start.annotations, BODY_SHA256: fingerprint}
        started = await self._runtime.start_job(
            user=request.user,
            thread_id=start.thread_id or new_id("t_"),
            message_id=new_id("m_") if key is None else f"idem:{key}",
            model=parsed.model,
            messages=start.messages,
            params=parsed.params,
            tools=parsed.tools,
            annotations=annotations,
        )
        if started.existing:
            await self._check_same_request(request.user, started.job_id, fingerprint)
        return started.job_id

    async def _check_same_request(self, user: str, job_id: str, fingerprint: str) -> None:
        """Raise ``ConflictError`` (409) when the job an Idempotency-Key found was started
        with another body. A job that kept no fingerprint (started by an older version, or
        over WebSocket with an ``idem:`` message id) is taken as the same request."""
        record, _ = await self._runtime.job_log(job_id, user=user)
        kept = record.request.annotations.get(BODY_SHA256)
        if isinstance(kept, str) and kept != fingerprint:
            raise ConflictError(
                "this Idempotency-Key was used with a different request body; send a new key "
                "for a new request",
                param="Idempotency-Key",
            )

    async def _retrieve(self, request: Request, match: re.Match[str]) -> None:
        job_id = match["id"]
        if (request.query("stream") or "").lower() != "true":
            response = await self._response_object(request.user, job_id)
            await self._app.send_json(request, 200, response, _stream_link(job_id))
            return
        offset, name = _resume_point(request)
        await self._stream(request, job_id, offset=offset, cursor_name=name)

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

    async def _wait_for_end(self, request: Request, job_id: str, *, until_approval: bool = True) -> None:
        """Wait for the job's end, or (``until_approval``) until it waits for an approval
        (the reply then holds the ``mcp_approval_request`` item); if the client leaves
        meanwhile, the job goes on. At shutdown the wait ends early: the reply says
        ``in_progress``."""
        _, entries = await self._runtime.job_log(job_id, user=request.user)
        if until_approval and awaits_approval(entries):
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, request, nursery.cancel_scope)
            nursery.start_soon(_cancel_on_event, self._app.closing, nursery.cancel_scope)
            after = entries[-1].seq if entries else 0
            async with self._runtime.watch(job_id, user=request.user, after_seq=after) as batches:
                async for batch in batches:
                    if until_approval and awaits_approval(batch.events):
                        break
            nursery.cancel_scope.cancel()

    # -- streaming ----------------------------------------------------------------------------

    async def _stream(
        self, request: Request, job_id: str, *, offset: StreamOffset, cursor_name: str = "starting_after"
    ) -> None:
        """Server-sent events numbered from 0; only those after ``offset`` (sent as
        ``cursor_name``) are sent."""
        user = request.user
        async with self._app.stream_slot(user):
            await self._stream_events(request, job_id, offset, cursor_name)

    async def _stream_events(
        self, request: Request, job_id: str, offset: StreamOffset, cursor_name: str
    ) -> None:
        # The record says what the response object echoes (model, params, annotations).
        record, entries = await self._runtime.job_log(job_id, user=request.user)
        projection = ResponsesProjection(_source(record))
        # Opened before the headers: a missing job, a stale epoch or a cursor past the end
        # of a finished response is an HTTP status.
        async with open_replay(self._runtime, job_id, projection, user=request.user, offset=offset) as replay:
            _check_within_finished(record, entries, offset, cursor_name)
            headers = [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
                *((k.encode(), v.encode()) for k, v in self._app.stream_headers(request).items()),
            ]
            await request.send({"type": "http.response.start", "status": 200, "headers": headers})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_disconnect, request, nursery.cancel_scope)
                nursery.start_soon(_cancel_on_event, self._app.closing, nursery.cancel_scope)
                nursery.start_soon(self._keep_alive, request, nursery.cancel_scope)
                expires_at = request.identity.expires_at if request.identity else None
                if expires_at is not None:
                    nursery.start_soon(self._expire, request, projection, expires_at, nursery.cancel_scope)
                if await self._write(request, replay, projection.opening()):
                    await self._follow(request, replay, projection)
                nursery.cancel_scope.cancel()
        if not request.socket.cut:
            last = request.socket.last_chunk()  # the gzip trailer, if gzip'd
            await request.send({"type": "http.response.body", "body": last, "more_body": False})

    async def _keep_alive(self, request: Request, stream: trio.CancelScope) -> None:
        """A comment line whenever the stream has been silent for ``sse_keepalive``, so
        proxies that cut idle connections keep it (a job may wait minutes for an approval).
        A client cut off meanwhile ends the stream."""
        interval = self._app.limits.sse_keepalive
        while True:
            await trio.sleep_until(request.socket.last_write + interval)
            if trio.current_time() < request.socket.last_write + interval:
                continue  # an event went out meanwhile
            if not await self._app.send_stream_chunk(request, b": keep-alive\n\n"):
                stream.cancel()
                return

    async def _expire(
        self, request: Request, projection: ResponsesProjection, expires_at: float, stream: trio.CancelScope
    ) -> None:
        """End the stream when its token expires (wall time ``expires_at``), as a WebSocket
        session is closed 4401: an ``error`` event, unnumbered, then the end of the body."""
        await trio.sleep(max(0.0, expires_at - time.time()))
        expired = UnauthorizedError("the token expired: authenticate again and resume from your last event")
        await self._write(request, None, [_error_event(expired, projection)])
        stream.cancel()

    async def _follow(
        self, request: Request, replay: Replay[dict[str, Any]], projection: ResponsesProjection
    ) -> bool:
        try:
            async for events in replay:
                if not await self._write(request, replay, events):
                    return False
        except BackstreamError as exc:
            # The log can no longer be read (e.g. gone): say so in the stream, unnumbered for resumes.
            return await self._write(request, None, [_error_event(exc, projection)])
        return True

    async def _write(
        self, request: Request, replay: Replay[dict[str, Any]] | None, events: Iterable[dict[str, Any]]
    ) -> bool:
        """Send events in chunks of about ``frame_chars`` bytes (sized as the WebSocket front
        doors size frames; one chunk is what a stream holds unsent), each through the gate and within
        its deadline; False if the client was cut off. Each event's ``id:`` is the offset to
        resume after it (none without ``replay``)."""
        chunk: list[bytes] = []
        size = 0
        most = frame_chars(self._app.limits.max_unsent_bytes)
        for event in events:
            event_id = None if replay is None else replay.offset_of(event["sequence_number"]).encode()
            frame = sse_frame(event, event_id=event_id)
            chunk.append(frame)
            size += len(frame)
            if size >= most:
                if not await self._app.send_stream_chunk(request, b"".join(chunk)):
                    return False
                chunk, size = [], 0
        return await self._app.send_stream_chunk(request, b"".join(chunk)) if chunk else True


def _error_event(exc: BackstreamError, projection: ResponsesProjection) -> dict[str, Any]:
    """An ``error`` event as OpenAI streams one (``code``, ``message``, ``param``), numbered
    after the projection's last event and never resumed from."""
    _, body, _ = error_response(exc)
    fields = {key: value for key, value in body["error"].items() if key != "type"}
    return {"type": "error", "sequence_number": projection.next_sequence_number, **fields}


def _check_within_finished(
    record: JobRecord, entries: Sequence[LogEvent], offset: StreamOffset, cursor_name: str
) -> None:
    """Raise ``BadRequestError`` (400) for a cursor beyond the last event of a finished
    response, as ``/v1`` answers a cursor beyond a finished job's end; a running response's
    stream waits for events ahead of what exists."""
    if offset.seq < 0:
        return
    translator = ResponsesTranslator(_source(record))
    translator.start()
    translator.feed_all(entries)
    last = translator.next_sequence_number - 1
    if translator.finished and offset.seq > last:
        raise BadRequestError(
            f"{cursor_name} {offset.seq} is beyond the response's last event {last}", param=cursor_name
        )


def _source(record: JobRecord) -> ResponseSource:
    return ResponseSource(
        response_id=record.job_id,
        created_at=record.created_at,
        model=record.model,
        params=record.request.params,
        annotations=record.request.annotations,
        thread_id=record.thread_id,
    )


def _idempotency_key(request: Request) -> str | None:
    """The ``Idempotency-Key`` header (None if absent or empty); a 400 past
    ``MAX_IDEMPOTENCY_KEY_CHARS``: a key cut or ignored would let a retry start a second job."""
    key = request.header("idempotency-key")
    if not key:
        return None
    if len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise BadRequestError(
            f"Idempotency-Key may be at most {MAX_IDEMPOTENCY_KEY_CHARS} characters", param="Idempotency-Key"
        )
    return key


def _resume_point(request: Request) -> tuple[StreamOffset, str]:
    """Where the client is, and the name it was sent as: ``Last-Event-ID`` (an EventSource
    reconnecting) over ``starting_after``; either an offset ``"<epoch>_<seq>"`` or a bare
    sequence number (as OpenAI's SDK sends ``starting_after``)."""
    last_event_id = request.header("last-event-id")
    if last_event_id:
        return parse_offset(last_event_id, name="Last-Event-ID"), "Last-Event-ID"
    return parse_offset(request.query("starting_after"), name="starting_after"), "starting_after"


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


def _stream_link(job_id: str) -> dict[str, str]:
    """The job's durable stream (docs/durable-streams.md), as an RFC 8288 link."""
    return {"link": f'<{job_stream_path(job_id)}>; rel="durable-stream"'}
