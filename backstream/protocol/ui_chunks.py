"""A job's log as the Vercel AI SDK's UI message stream: a sans-IO, incremental translator.

``UIChunkTranslator`` takes a job's log entries in order (as the log holds them:
text entries unmerged, ``tool_call_delta`` entries included) and returns the
``UIMessageChunk`` objects (plain JSON-ready dicts) that the AI SDK's
``readUIMessageStream`` and ``useChat`` assemble into one assistant message.

The chunks are a pure function of the entries, so their numbering (``index``:
0, 1, 2, ... over the whole job) is the same on every server instance and on
every replay. One log entry gives a fixed list of chunks; the translator never
coalesces text across entries, because where coalescing would cut depends on
timing. ``DeltaCoalescer`` does, for a connection that opts in and gives up
that numbering: it merges adjacent deltas of one part.

The stream of a job is made of segments, each a well-formed UI message
stream (``start`` ... ``finish``): the first from the job's start, and one
more after every approval decision. A segment ends at a wait for approval
(``finish`` with ``finishReason`` ``"tool-calls"``), so that the UI can ask
the person; the next ``send`` carrying the decision continues the same
message from the following segment.

A call that will wait for approval is shown only when it is asked, in a step of
its own if the step already shows a call (``approval_tools`` names the tools that
ask). The job runs a turn's other calls only once every decision is in, so the
last step must hold nothing but the call being asked: the AI SDK's
``lastAssistantMessageIsCompleteWithApprovalResponses`` sends the decision only
when every tool part of the last step is decided or done. Such a call's argument
fragments are therefore not streamed: its input comes whole with the request.
"""

from __future__ import annotations

import json
from typing import Any, Final

import attrs

from backstream.protocol.events import (
    AWAITING_APPROVAL,
    RUNNING,
    ApprovalEvent,
    ApprovalRequiredEvent,
    LogEvent,
    ReasoningEvent,
    RewindEvent,
    StatusEvent,
    StepEvent,
    TextEvent,
    ToolCallDeltaEvent,
    ToolCallEvent,
    ToolResultEvent,
    step_call_id,
)

__all__ = [
    "DELTA_FIELDS",
    "FINISH_REASONS",
    "DeltaCoalescer",
    "UIChunk",
    "UIChunkTranslator",
    "approval_id",
    "parse_approval_id",
]

UIChunk = dict[str, Any]

FINISH_REASONS: Final[dict[str, str]] = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content-filter",
    "tool_calls": "tool-calls",
    "function_call": "tool-calls",
}
"""OpenAI finish reasons and the AI SDK's; any other becomes ``"other"``."""

_APPROVAL_SEPARATOR = "/"

DELTA_FIELDS: Final[dict[str, tuple[str, str]]] = {
    "text-delta": ("id", "delta"),
    "reasoning-delta": ("id", "delta"),
    "tool-input-delta": ("toolCallId", "inputTextDelta"),
}
"""The chunks that carry a piece of a part: type -> (the field naming the part, the piece).
Two adjacent ones of the same type and part say what one chunk with both pieces says."""


def approval_id(job_id: str, call_id: str) -> str:
    """The ``approvalId`` of a tool call waiting for approval: it names the job and the call."""
    return f"{job_id}{_APPROVAL_SEPARATOR}{call_id}"


def parse_approval_id(value: str) -> tuple[str, str] | None:
    """``(job_id, call_id)`` from an ``approvalId``, or None if it is not one of ours."""
    job_id, sep, call_id = value.partition(_APPROVAL_SEPARATOR)
    if not sep or not job_id or not call_id:
        return None
    return job_id, call_id


class UIChunkTranslator:
    """Feed the log's entries in order; each ``feed`` returns the chunks that entry adds.

    ``emitted`` counts the chunks so far: the index of the next chunk. ``paused`` is true
    while the last entry fed left the job waiting for an approval. ``segment_starts``
    maps a call id to the index of the first chunk after its approval decision.
    """

    def __init__(self, *, message_id: str, job_id: str, approval_tools: frozenset[str] = frozenset()) -> None:
        self._message_id = message_id
        self._job_id = job_id
        self._approval_tools = approval_tools
        self.emitted = 0
        self.paused = False
        self.finished = False
        self.segment_starts: dict[str, int] = {}
        self._parts = 0  # ids of text and reasoning parts: text-1, reasoning-2, ...
        self._text: str | None = None  # the open text part
        self._reasoning: str | None = None  # the open reasoning part
        self._started = False
        self._in_step = False
        self._after_tools = False  # tool results came in this step: the next model output starts one
        self._inputs_started: set[str] = set()
        self._denied: set[str] = set()
        self._held: dict[str, _HeldCall] = {}  # calls of approval tools, not shown yet
        self._step_shows_call = False  # the open step holds a tool part

    def feed(self, entry: LogEvent) -> list[UIChunk]:
        out: list[UIChunk] = []
        if isinstance(entry, TextEvent):
            self._model_output(out)
            self._close_reasoning(out)
            if self._text is None:
                self._text = self._new_part("text")
                out.append({"type": "text-start", "id": self._text})
            out.append({"type": "text-delta", "id": self._text, "delta": entry.text})
        elif isinstance(entry, ReasoningEvent):
            self._model_output(out)
            self._close_text(out)
            if self._reasoning is None:
                self._reasoning = self._new_part("reasoning")
                out.append({"type": "reasoning-start", "id": self._reasoning})
            out.append({"type": "reasoning-delta", "id": self._reasoning, "delta": entry.text})
        elif isinstance(entry, ToolCallDeltaEvent | ToolCallEvent):
            self._model_output(out)
            self._close_parts(out)
            self._tool_call(entry, out)
        elif isinstance(entry, ApprovalRequiredEvent):
            self._close_parts(out)
            if entry.call_id not in self._held and entry.call_id not in self._inputs_started:
                self._workflow_approval(entry, out)
            self._show_held(entry.call_id, out, own_step=True)
            out.append(
                {
                    "type": "tool-approval-request",
                    "approvalId": approval_id(self._job_id, entry.call_id),
                    "toolCallId": entry.call_id,
                }
            )
        elif isinstance(entry, ApprovalEvent):
            self.segment_starts[entry.call_id] = self.emitted
            self.paused = False
            out.append({"type": "start", "messageId": self._message_id})
            out.append(
                {
                    "type": "tool-approval-response",
                    "approvalId": approval_id(self._job_id, entry.call_id),
                    "approved": entry.approved,
                }
            )
            if not entry.approved:
                self._denied.add(entry.call_id)
        elif isinstance(entry, ToolResultEvent):
            self._close_parts(out)
            self._show_held(entry.call_id, out, own_step=False)  # a call that never asked
            out.append(self._tool_output(entry))
            self._after_tools = True
        elif isinstance(entry, RewindEvent):
            # The UI message stream cannot take text back: the parts so far end, and a data
            # part tells a page that knows it to drop the turn's text before the next part.
            self._close_parts(out)
            data = {"toSeq": entry.to_seq, "contentLength": entry.content_length}
            out.append({"type": "data-backstream-rewind", "data": data})
        elif isinstance(entry, StepEvent):
            self._step(entry, out)
        else:
            self._status(entry, out)
        self.emitted += len(out)
        return out

    # -- pieces ----------------------------------------------------------------------------

    def _new_part(self, kind: str) -> str:
        self._parts += 1
        return f"{kind}-{self._parts}"

    def _model_output(self, out: list[UIChunk]) -> None:
        """The model produces something: a step must be open (a new one after tool results)."""
        if self._in_step and self._after_tools:
            self._close_parts(out)
            out.append({"type": "finish-step"})
            self._in_step = False
        if not self._in_step:
            self._start_step(out)

    def _start_step(self, out: list[UIChunk]) -> None:
        out.append({"type": "start-step"})
        self._in_step = True
        self._after_tools = False
        self._step_shows_call = False

    def _close_text(self, out: list[UIChunk]) -> None:
        if self._text is not None:
            out.append({"type": "text-end", "id": self._text})
            self._text = None

    def _close_reasoning(self, out: list[UIChunk]) -> None:
        if self._reasoning is not None:
            out.append({"type": "reasoning-end", "id": self._reasoning})
            self._reasoning = None

    def _close_parts(self, out: list[UIChunk]) -> None:
        self._close_reasoning(out)
        self._close_text(out)

    def _tool_call(self, entry: ToolCallDeltaEvent | ToolCallEvent, out: list[UIChunk]) -> None:
        """A fragment of a call's arguments, or the whole call: shown, or held if the call
        will ask for approval."""
        held = self._hold(entry.call_id, entry.name)
        if isinstance(entry, ToolCallEvent):
            if held is not None:
                held.input = _tool_input(entry)
            else:
                self._start_input(entry.call_id, entry.name, out)
                out.append(_tool_input(entry))
        elif held is not None:
            held.fragments.append(entry.arguments_delta)
        else:
            self._start_input(entry.call_id, entry.name, out)
            out.append(
                {
                    "type": "tool-input-delta",
                    "toolCallId": entry.call_id,
                    "inputTextDelta": entry.arguments_delta,
                }
            )

    def _start_input(self, call_id: str, name: str, out: list[UIChunk]) -> None:
        if call_id not in self._inputs_started:
            self._inputs_started.add(call_id)
            self._step_shows_call = True
            out.append({"type": "tool-input-start", "toolCallId": call_id, "toolName": name})

    def _hold(self, call_id: str, name: str) -> _HeldCall | None:
        """The held call ``call_id``, held from now on if it is a new call of an approval
        tool; None for a call that is shown as it streams."""
        held = self._held.get(call_id)
        if held is None and name in self._approval_tools and call_id not in self._inputs_started:
            held = self._held[call_id] = _HeldCall(name)
        return held

    def _show_held(self, call_id: str, out: list[UIChunk], *, own_step: bool) -> None:
        """Show a held call's input. ``own_step``: in a new step if the open one shows a
        call already (one asked earlier, or one that runs once the decisions are in)."""
        held = self._held.pop(call_id, None)
        if held is None:
            return
        if own_step and self._in_step and self._step_shows_call:
            out.append({"type": "finish-step"})
            self._start_step(out)
        self._start_input(call_id, held.name, out)
        if held.input is not None:
            out.append(held.input)
        elif held.fragments:  # the job ended before the call was whole
            out.append(
                {"type": "tool-input-delta", "toolCallId": call_id, "inputTextDelta": "".join(held.fragments)}
            )

    def _tool_output(self, entry: ToolResultEvent) -> UIChunk:
        if entry.call_id in self._denied:
            return {"type": "tool-output-denied", "toolCallId": entry.call_id}
        if entry.is_error:
            return {"type": "tool-output-error", "toolCallId": entry.call_id, "errorText": entry.output}
        return {
            "type": "tool-output-available",
            "toolCallId": entry.call_id,
            "output": _output_value(entry.output),
        }

    def _workflow_approval(self, entry: ApprovalRequiredEvent, out: list[UIChunk]) -> None:
        """A workflow step asks a person (no model announced a call): shown as a call of its
        own, so that the page asks as it does for a tool."""
        self._model_output(out)
        if self._step_shows_call:
            out.append({"type": "finish-step"})
            self._start_step(out)
        self._start_input(entry.call_id, entry.name, out)
        out.append(_tool_input(ToolCallEvent(entry.seq, entry.call_id, entry.name, entry.arguments)))

    def _step(self, entry: StepEvent, out: list[UIChunk]) -> None:
        """A workflow's step: a data part per step (``data-backstream-step``, the same id when
        it starts and finishes, so the page's part is updated in place); a step that asked a
        person also gives its call an output."""
        self._close_parts(out)
        status = "running" if entry.phase == "started" else ("failed" if entry.is_error else "finished")
        data = {"step": entry.step, "name": entry.name, "status": status, "summary": entry.summary}
        out.append({"type": "data-backstream-step", "id": f"step-{entry.step}", "data": data})
        call_id = step_call_id(entry.step)
        if entry.phase == "finished" and call_id in self._inputs_started:
            if call_id in self._denied:
                out.append({"type": "tool-output-denied", "toolCallId": call_id})
            else:
                out.append({"type": "tool-output-available", "toolCallId": call_id, "output": True})

    def _status(self, entry: StatusEvent, out: list[UIChunk]) -> None:
        if entry.status == RUNNING:
            if not self._started:
                self._started = True
                out.append({"type": "start", "messageId": self._message_id})
            return
        self._close_parts(out)
        if entry.status == AWAITING_APPROVAL:
            self.paused = True
            out.append({"type": "finish", "finishReason": "tool-calls"})
            return
        self.finished = True
        for call_id in list(self._held):  # calls the job never came to: shown as they stand
            self._show_held(call_id, out, own_step=False)
        if not self._started:  # a log that ended before it ran (recovered, or aborted at once)
            self._started = True
            out.append({"type": "start", "messageId": self._message_id})
        if entry.status == "aborted":
            out.append({"type": "abort", "reason": "the job was aborted"})
            return
        if self._in_step:
            out.append({"type": "finish-step"})
            self._in_step = False
        if entry.status == "completed":
            reason = FINISH_REASONS.get(entry.finish_reason or "stop", "other")
            out.append({"type": "finish", "finishReason": reason})
        elif entry.status == "interrupted":
            out.append({"type": "finish", "finishReason": "interrupted"})
        else:
            error = entry.error
            text = f"{error.message} ({error.code})" if error is not None else "the job failed"
            out.append({"type": "error", "errorText": text})
            out.append({"type": "finish", "finishReason": "error"})


@attrs.define
class _HeldCall:
    """A call of an approval tool, not shown yet: its argument fragments, then its input."""

    name: str
    fragments: list[str] = attrs.Factory(list)
    input: UIChunk | None = None


def _tool_input(entry: ToolCallEvent) -> UIChunk:
    try:
        value = json.loads(entry.arguments) if entry.arguments.strip() else {}
    except ValueError:
        return {
            "type": "tool-input-error",
            "toolCallId": entry.call_id,
            "toolName": entry.name,
            "input": entry.arguments,
            "errorText": "the model's arguments are not valid JSON",
        }
    return {
        "type": "tool-input-available",
        "toolCallId": entry.call_id,
        "toolName": entry.name,
        "input": value,
    }


def _output_value(output: str) -> Any:
    """A tool's output text; a JSON object or array is given as the value it encodes."""
    stripped = output.strip()
    if stripped[:1] in ("{", "["):
        try:
            return json.loads(stripped)
        except ValueError:
            pass
    return output


class DeltaCoalescer:
    """Merge adjacent deltas of the same part into one chunk, holding at most one.

    ``add`` takes the chunks in order and returns those that are final, in order;
    a delta is held (``pending``) while the next chunk may still extend it. A held
    delta grows to at most ``max_chars`` characters; then it is final and the next
    piece starts a new one. ``flush`` returns the held delta, if any.
    """

    def __init__(self, *, max_chars: int) -> None:
        self._max_chars = max_chars
        self.pending: UIChunk | None = None

    def add(self, chunk: UIChunk) -> list[UIChunk]:
        fields = DELTA_FIELDS.get(chunk.get("type", ""))
        held = self.pending
        if fields is not None and held is not None and held["type"] == chunk["type"]:
            part, piece = fields
            if held[part] == chunk[part] and len(held[piece]) + len(chunk[piece]) <= self._max_chars:
                held[piece] += chunk[piece]
                return []
        out = self.flush()
        if fields is None:
            out.append(chunk)
        else:
            self.pending = dict(chunk)  # a copy: merging must not change what the caller holds
        return out

    def flush(self) -> list[UIChunk]:
        held, self.pending = self.pending, None
        return [] if held is None else [held]
