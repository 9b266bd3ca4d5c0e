"""The Vercel AI SDK endpoint (``/v1/ai-sdk``): one WebSocket client of ``WebSocketChatTransport``.

A thin shell: frames are decoded and UI messages converted in
``protocol.ui_messages``, a job's log becomes UI message chunks in
``protocol.ui_chunks`` (through the replay driver, ``server.replay``, and its
``UIChunkProjection``); limits and the send path are the session core's
(``server.session``); here they meet the runtime and the socket.

Each ``send`` or ``resume`` is a task of its own (at most ``max_watches`` at
once), so one connection carries many chats. A request reads the job's log
through a watch and sends one chunk per frame (the transport takes no more),
each with a deadline and only when the socket can take it (``SocketGate``): a
client behind for ``slow_client_timeout`` is closed 4429. A request's memory is
one batch, however slow the client. Closing the socket stops the streams,
never the jobs.

A connection opened with ``coalesce_ms`` (or the server's default) bounds its
text frames instead: adjacent deltas of one part merge while a frame is not
due, and each request sends at most one delta frame per ``coalesce_ms``. Its
sequences count the frames it sent, so they depend on timing: such a
connection answers a ``resume`` with ``lastSequence`` by an ``error`` (the AI
SDK's transport never sends one: it replays from ``start``). A ``lastSequence`` is fenced
by the log's epoch (sent in ``start``), as ``job.watch``'s cursor is.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable

import attrs
import trio
from trio_websocket import ConnectionClosed

from backstream.protocol.codec import ProtocolError
from backstream.protocol.errors import BackstreamError, ConflictError, GoneError
from backstream.protocol.events import AWAITING_APPROVAL, ApprovalEvent
from backstream.protocol.offsets import NO_OFFSET, StreamOffset
from backstream.protocol.projections import UIChunkProjection
from backstream.protocol.ui_chunks import DELTA_FIELDS, DeltaCoalescer, UIChunk, parse_approval_id
from backstream.protocol.ui_messages import (
    AbortRequest,
    ApprovalAnswer,
    ResumeRequest,
    SendRequest,
    approval_answers,
    chat_messages,
    decode_request,
    encode_frame,
    job_key,
    job_options,
    tool_outputs_given,
)
from backstream.runtime.api import Runtime
from backstream.runtime.server.auth import Identity
from backstream.runtime.server.peer import Close as _Close
from backstream.runtime.server.peer import close_at
from backstream.runtime.server.replay import open_replay
from backstream.runtime.server.session import ConnectionLimits, ConnectionStats, Session, peek_string_field
from backstream.runtime.server.websocket import ServerWebSocket

__all__ = ["AiSdkConnection"]

log = logging.getLogger("backstream.ai_sdk")

RESUME_ABORT_GRACE = 0.5
"""Seconds an ``abort`` of a ``resume`` waits before it aborts the job: the AI SDK's ``Chat``
aborts a resume it replaces just before it sends the new one, and that must not stop the job."""


@attrs.define
class _Active:
    """A ``send`` or ``resume`` being served."""

    kind: str
    chat_id: str
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    job_id: str | None = None
    aborted: bool = False
    started_at: float = attrs.Factory(trio.current_time)


class AiSdkConnection:
    """Run with ``await connection.run()`` once the WebSocket is accepted and its user known."""

    def __init__(
        self,
        ws: ServerWebSocket,
        runtime: Runtime,
        identity: Identity,
        limits: ConnectionLimits,
        stats: ConnectionStats,
        *,
        conn_id: str,
        default_model: str,
        sock: trio.socket.SocketType | None = None,
        coalesce_ms: int = 0,
    ) -> None:
        self._session = Session(
            ws, limits, stats, conn_id=conn_id, sock=sock, slow_reason="too slow: resume the chat"
        )
        self._ws = ws
        self._runtime = runtime
        self.identity = identity
        self._limits = limits
        self._stats = stats
        self.conn_id = conn_id
        self._default_model = default_model
        self._coalesce_s = coalesce_ms / 1000
        self._active: dict[str, _Active] = {}
        self._last_resume: dict[str, float] = {}  # chat id -> when its latest resume arrived

    @property
    def user(self) -> str:
        return self.identity.user

    def close_soon(self, code: int, reason: str) -> None:
        """Ask the connection to close with ``code`` (e.g. 1001 at shutdown). Returns at once."""
        self._session.close_soon(code, reason)

    async def run(self) -> None:
        """Serve the client until it leaves or is closed. Never raises for the client's faults;
        the jobs it started go on.

        Cancellation: the session ends and the socket is closed; the jobs go on."""
        await self._session.run(self._serve_session)

    async def _serve_session(self) -> None:
        async with trio.open_nursery() as nursery:
            if self.identity.expires_at is not None:
                nursery.start_soon(close_at, self.identity.expires_at, self.close_soon)
            try:
                await self._read_frames(nursery)
            except _Close as exc:
                self.close_soon(exc.code, exc.reason)
            except ConnectionClosed:
                pass  # the client left; its jobs go on
            finally:
                nursery.cancel_scope.cancel()

    # -- frames in ----------------------------------------------------------------------------

    async def _read_frames(self, nursery: trio.Nursery) -> None:
        while True:
            raw = await self._ws.get_message()
            # Charged before decoding: a flood of frames costs no more than the bucket allows.
            # An abort is never refused: stopping a stream must always get through.
            if not self._session.charge() and peek_string_field(raw, "type") != "abort":
                await self._refuse(peek_string_field(raw, "requestId"), "too many requests; slow down")
                continue
            try:
                request = decode_request(raw)
            except ProtocolError as exc:
                await self._refuse(exc.request_id, exc.message)
                continue
            if isinstance(request, AbortRequest):
                self._on_abort(request.request_id, nursery)
            elif request.request_id in self._active:
                await self._refuse(request.request_id, "this requestId is already in use")
            elif len(self._active) >= self._limits.max_watches:
                await self._refuse(
                    request.request_id, f"at most {self._limits.max_watches} requests at once per connection"
                )
            else:
                active = _Active(
                    kind="send" if isinstance(request, SendRequest) else "resume", chat_id=request.chat_id
                )
                if isinstance(request, ResumeRequest):
                    self._note_resume(request.chat_id, active.started_at)
                self._active[request.request_id] = active
                nursery.start_soon(self._serve, request, active)

    def _note_resume(self, chat_id: str, now: float) -> None:
        # Only resumes younger than the grace matter: older ones are forgotten (bounded).
        for chat, at in list(self._last_resume.items()):
            if now - at > RESUME_ABORT_GRACE:
                del self._last_resume[chat]
        self._last_resume[chat_id] = now

    async def _refuse(self, request_id: str | None, message: str) -> None:
        too_many = self._session.strike()
        if request_id is not None:
            await self._send_error(request_id, message)
        if request_id is None or too_many:
            raise _Close(1008, message[:120] if request_id is None else "too many refused requests")

    def _on_abort(self, request_id: str, nursery: trio.Nursery) -> None:
        active = self._active.get(request_id)
        if active is None or active.aborted:
            return  # it had ended, or is being stopped already
        active.aborted = True
        if active.job_id is None and active.kind == "send":
            return  # its job is being admitted: the request aborts it once it has it
        active.scope.cancel()  # the transport has closed its side of the stream
        if active.job_id is not None:
            nursery.start_soon(self._abort_job, active)

    async def _abort_job(self, active: _Active) -> None:
        """Abort the request's job, as ``job.abort``. A resume's abort waits a moment, and
        is dropped if a newer resume of the same chat arrived meanwhile on this connection."""
        assert active.job_id is not None
        # Shielded (and bounded): a client that stops and leaves at once still stops its job.
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + RESUME_ABORT_GRACE + self._runtime.config.remote_abort_wait
            if active.kind == "resume":
                await trio.sleep(RESUME_ABORT_GRACE)
                if self._last_resume.get(active.chat_id, 0.0) > active.started_at:
                    return
            try:
                await self._runtime.abort(active.job_id, user=self.user)
            except BackstreamError as exc:
                log.info("conn %s: abort of %s: %s", self.conn_id, active.job_id, exc.message)

    # -- requests --------------------------------------------------------------------------------

    async def _serve(self, request: SendRequest | ResumeRequest, active: _Active) -> None:
        request_id = request.request_id
        try:
            with active.scope:
                if isinstance(request, ResumeRequest):
                    await self._resume(request, active)
                else:
                    await self._send_messages(request, active)
        except (BackstreamError, ProtocolError) as exc:
            with contextlib.suppress(_Close, ConnectionClosed):
                await self._send_error(request_id, exc.message)
        except _Close as exc:
            self.close_soon(exc.code, exc.reason)
        except ConnectionClosed:
            pass  # the reader sees it too and ends the session
        except Exception:
            log.exception("conn %s: a request failed", self.conn_id)
            with contextlib.suppress(_Close, ConnectionClosed):
                await self._send_error(request_id, "the server failed on this request")
        finally:
            self._active.pop(request_id, None)

    async def _resume(self, request: ResumeRequest, active: _Active) -> None:
        jobs = await self._runtime.list_jobs(user=self.user, thread_id=request.chat_id, limit=1)
        if not jobs:
            await self._send(encode_frame("no-active", request.request_id))
            return
        if request.last_sequence is not None and self._coalesce_s > 0:
            raise ProtocolError(
                "bad_request",
                "resume: this connection coalesces text (coalesce_ms), so its sequences depend on "
                "timing and lastSequence cannot be honoured; resume without lastSequence to replay "
                "the whole message",
            )
        active.job_id = jobs[0].job_id
        if request.last_sequence is None:
            await self._stream(request.request_id, active.job_id)
            return
        offset = StreamOffset(request.last_sequence, request.epoch)
        await self._stream(request.request_id, active.job_id, after=offset)

    async def _send_messages(self, request: SendRequest, active: _Active) -> None:
        answers = approval_answers(request.messages)
        if answers:
            job_id, call_id = await self._apply_approvals(answers)
            active.job_id = job_id
            if active.aborted:  # the abort came while the decisions were applied
                await self._abort_job(active)
                return
            await self._stream(request.request_id, job_id, from_call=call_id)
            return
        options = job_options(request.body, self._default_model)
        regenerating = None
        if request.trigger == "regenerate-message":
            regenerating = request.message_id or await self._latest_job(request.chat_id) or ""
        key = job_key(request, regenerating=regenerating)
        # Outputs of client-side tools (addToolOutput): a new job goes on from the whole
        # conversation, in the same assistant message.
        continuing = tool_outputs_given(request.messages)
        if key is None:
            raise ProtocolError("bad_request", "send: the messages hold no user message")
        started = await self._runtime.start_job(
            user=self.user,
            thread_id=request.chat_id,
            message_id=key,
            model=options.model,
            messages=chat_messages(request.messages),
            params=options.params,
            tools=options.tools,
        )
        active.job_id = started.job_id
        if active.aborted:  # the abort came while the job was being admitted
            await self._abort_job(active)
            return
        await self._stream(
            request.request_id, started.job_id, message_id=continuing.message_id if continuing else None
        )

    async def _latest_job(self, chat_id: str) -> str | None:
        jobs = await self._runtime.list_jobs(user=self.user, thread_id=chat_id, limit=1)
        return jobs[0].job_id if jobs else None

    async def _apply_approvals(self, answers: list[ApprovalAnswer]) -> tuple[str, str]:
        """``job.approve`` each decision; return the job and the call whose decision the
        response continues from: the last, as a job asks one call at a time, in order, and
        the parts of the earlier ones still carry their decisions (already applied)."""
        last: tuple[str, str] | None = None
        for answer in answers:
            parsed = parse_approval_id(answer.approval_id)
            if parsed is None:
                raise ProtocolError("bad_request", f"unknown approvalId {answer.approval_id[:80]!r}")
            job_id, call_id = parsed
            try:
                await self._runtime.approve(job_id, call_id, answer.approved, user=self.user)
            except ConflictError:
                if not await self._decided(job_id, call_id):
                    raise
            last = parsed
        assert last is not None
        return last

    async def _decided(self, job_id: str, call_id: str) -> bool:
        """Whether the job's log holds a decision on the call (a repeated approval; a
        workflow's approval is no tool call, so the log itself is read)."""
        _, entries = await self._runtime.job_log(job_id, user=self.user)
        return any(isinstance(e, ApprovalEvent) and e.call_id == call_id for e in entries)

    async def _stream(
        self,
        request_id: str,
        job_id: str,
        *,
        after: StreamOffset = NO_OFFSET,
        from_call: str | None = None,
        message_id: str | None = None,
    ) -> None:
        """Send ``start`` (with the log's ``epoch``), the job's chunks as ``chunk`` frames,
        then ``end``.

        ``after``: the last sequence the client has and its epoch (a full replay numbers
        from 0); see ``_check_epoch``. ``from_call``: continue from the decision on that
        call, numbering from 0 there. ``message_id``: the assistant message the chunks
        belong to (the job's id by default). Stops at a wait for approval, so that the UI
        can ask the person.
        """
        frame_chars = self._session.frame_chars
        out = _ChunkFrames(
            self._send,
            request_id,
            next_sequence=after.seq + 1,
            interval=self._coalesce_s,
            max_chars=frame_chars,
        )
        projection = UIChunkProjection(
            job_id,
            from_call=from_call,
            approval_tools=self._runtime.tools.approval_names(),
            message_id=message_id,
        )
        async with open_replay(
            self._runtime,
            job_id,
            projection,
            user=self.user,
            offset=after,
            max_batch_chars=frame_chars,
        ) as replay:
            _check_epoch(after, replay.epoch)
            await self._send(encode_frame("start", request_id, epoch=replay.epoch))
            while True:
                # A held delta goes out when due even if the log is quiet: only the wait for
                # a batch is cancelled, which loses nothing.
                chunks: list[UIChunk] | None = None
                with trio.move_on_at(out.due_at()):
                    try:
                        chunks = await replay.__anext__()
                    except StopAsyncIteration:
                        break
                for chunk in chunks or ():
                    await out.put(chunk)
                if chunks is not None and projection.paused and await self._still_waiting(job_id):
                    break
                await out.flush(only_due=True)
        await out.flush(only_due=False)
        await self._send(encode_frame("end", request_id))

    async def _still_waiting(self, job_id: str) -> bool:
        info = await self._runtime.get_job(job_id, user=self.user)
        return info.job.status == AWAITING_APPROVAL

    # -- frames out ----------------------------------------------------------------------------

    async def _send_error(self, request_id: str, message: str) -> None:
        """The one place an ``error`` frame is made."""
        self._stats.errors_sent += 1
        await self._send(encode_frame("error", request_id, errorText=message))

    async def _send(self, text: str) -> None:
        """Send one frame once the socket can take it, within ``send_timeout``. A client
        behind for ``slow_client_timeout``, or a send past its deadline, is too slow: the
        connection is closed 4429 (its jobs go on).

        Cancellation: the frame may be cut; the session ends."""
        await self._session.send(text)


def _check_epoch(after: StreamOffset, log_epoch: int) -> None:
    """Raise ``GoneError`` for a ``lastSequence`` without its epoch on a job recovered since
    (epoch above 1): it may have been counted in the log before the recovery, whose tail is
    not this one. (One with another epoch than the log's is refused by ``open_replay``.)"""
    if after.seq >= 0 and after.epoch is None and log_epoch > 1:
        raise GoneError(
            f"resume: the job's log is at epoch {log_epoch} (it was recovered), so lastSequence "
            "needs the epoch it was counted in; resume with epoch, or without lastSequence to "
            "replay the whole message"
        )


class _ChunkFrames:
    """The ``chunk`` frames of one request, numbered from ``next_sequence`` in the order sent.

    With ``interval`` (seconds) above zero, deltas pass through a ``DeltaCoalescer`` and a
    delta frame goes out at most once per ``interval``; ``due_at`` says when the held one is.
    """

    def __init__(
        self,
        send: Callable[[str], Awaitable[None]],
        request_id: str,
        *,
        next_sequence: int,
        interval: float,
        max_chars: int,
    ) -> None:
        self._send_frame = send
        self._request_id = request_id
        self._next_sequence = next_sequence
        self._interval = interval
        self._coalescer = DeltaCoalescer(max_chars=max_chars) if interval > 0 else None
        self._next_delta_at = -math.inf

    def due_at(self) -> float:
        """When the held delta is due; infinity when none is held."""
        if self._coalescer is None or self._coalescer.pending is None:
            return math.inf
        return self._next_delta_at

    async def put(self, chunk: UIChunk) -> None:
        """Send the chunk, or hold it to merge with what follows. Cancellation: what was
        held or not yet sent is lost with the stream (a resume replays it)."""
        for ready in [chunk] if self._coalescer is None else self._coalescer.add(chunk):
            await self._send(ready)

    async def flush(self, *, only_due: bool) -> None:
        """Send the held delta (``only_due``: only if it is due). Cancellation: as ``put``."""
        if self._coalescer is not None and (not only_due or trio.current_time() >= self.due_at()):
            for ready in self._coalescer.flush():
                await self._send(ready)

    async def _send(self, chunk: UIChunk) -> None:
        if self._coalescer is not None and chunk["type"] in DELTA_FIELDS:
            if trio.current_time() < self._next_delta_at:
                await trio.sleep_until(self._next_delta_at)
            self._next_delta_at = trio.current_time() + self._interval
        sequence, self._next_sequence = self._next_sequence, self._next_sequence + 1
        await self._send_frame(encode_frame("chunk", self._request_id, sequence=sequence, chunk=chunk))
