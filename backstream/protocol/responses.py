"""OpenAI's Responses API over a job: the log -> events translation.

Sans-IO. ``ResponsesTranslator`` turns a job's log entries, one entry at a time and in
``seq`` order, into numbered Responses streaming events. Request parsing lives in
``protocol.responses_request``, the SSE encoding in ``protocol.responses_sse`` (both
re-exported here).

The numbering is a pure function of the log: every entry kind yields a fixed set of events
given the entries before it, so any instance replaying the same log, at any time, gives every
event the same ``sequence_number``. A resumed stream replays from the first entry and skips the
events the client already has. This needs the entries as stored (one text entry per ``seq``),
never text merged across entries: merging depends on how reads were batched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from backstream.protocol.events import (
    LIVE_STATUSES,
    ApprovalRequiredEvent,
    ErrorInfo,
    LogEvent,
    ReasoningEvent,
    RewindEvent,
    StatusEvent,
    TextEvent,
    ToolCallEvent,
    ToolResultEvent,
)
from backstream.protocol.responses_input import approval_request_id
from backstream.protocol.responses_request import MAX_ANNOTATION_CHARS, ResponseRequest, parse_create
from backstream.protocol.responses_sse import error_body, sse_frame

APPROVAL_SERVER_LABEL = "backstream"
"""The ``server_label`` of an ``mcp_approval_request``: the tool runs on this server."""

__all__ = [
    "MAX_ANNOTATION_CHARS",
    "ResponseRequest",
    "ResponseSource",
    "ResponsesTranslator",
    "error_body",
    "parse_create",
    "response_status",
    "sse_frame",
]


# -- the response object and its status ---------------------------------------------------


def response_status(status: str, error: ErrorInfo | None, finish_reason: str | None) -> str:
    """The Responses status of a job status (see the table in docs/http-apis.md)."""
    if status in LIVE_STATUSES:
        return "in_progress"
    if status == "aborted":
        return "cancelled"
    if status == "interrupted":
        return "incomplete"
    if status == "failed":
        return "incomplete" if error is not None and error.code == "output_limit" else "failed"
    return "incomplete" if finish_reason in ("length", "content_filter") else "completed"


def _incomplete_reason(status: str, finish_reason: str | None) -> str:
    if status == "interrupted":
        return "interrupted"
    if finish_reason == "content_filter":
        return "content_filter"
    return "max_output_tokens"


def _error_object(error: ErrorInfo | None) -> dict[str, Any] | None:
    if error is None:
        return None
    limited = error.code == "upstream_http" and error.http_status == 429
    return {
        "code": "rate_limit_exceeded" if limited else "server_error",
        "message": error.message,
        "type": error.code,
        "param": None,
    }


@attrs.frozen
class ResponseSource:
    """What a response object says about its job besides the log."""

    response_id: str
    created_at: float
    model: str
    params: Mapping[str, Any]
    annotations: Mapping[str, Any]
    thread_id: str


def _base_response(source: ResponseSource) -> dict[str, Any]:
    params = source.params
    # Exactly what the caller sent: the job's thread is the record's, not added here.
    metadata = dict(source.annotations.get("metadata") or {})
    return {
        "id": source.response_id,
        "object": "response",
        "created_at": int(source.created_at),
        "status": "in_progress",
        "background": bool(source.annotations.get("background", True)),
        "model": source.model,
        "instructions": source.annotations.get("instructions"),
        "metadata": metadata,
        "tools": list(source.annotations.get("tools") or []),
        "tool_choice": params.get("tool_choice", "auto"),
        "parallel_tool_calls": params.get("parallel_tool_calls", True),
        "temperature": params.get("temperature"),
        "top_p": params.get("top_p"),
        "max_output_tokens": params.get("max_tokens"),
        "max_tool_calls": params.get("max_tool_calls"),
        "error": None,
        "incomplete_details": None,
        "output": [],
        "usage": None,
    }


def _usage(usage: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not usage:
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": int(usage.get("total_tokens") or prompt + completion),
    }


# -- the translator -------------------------------------------------------------------------


@attrs.define
class _OpenItem:
    kind: str  # "message" or "reasoning"
    index: int
    item_id: str
    text: list[str]
    seqs: list[int] = attrs.Factory(list)  # the entry each piece of ``text`` came from


class ResponsesTranslator:
    """Log entries in, numbered Responses events out. Feed every entry from ``seq`` 1 on.

    ``start()`` gives ``response.created`` (0) and ``response.in_progress`` (1); ``feed``
    gives the events of one entry. ``snapshot()`` is the response object so far.

    A ``rewind`` (a turn run again after a crash) cannot take back deltas already sent: the
    open item is closed at once with what stands of it (its ``*.done`` events carry that
    text; an item whose every piece was withdrawn ends ``incomplete``), and the items the
    rewind withdrew are left out of the response object from then on.
    """

    def __init__(self, source: ResponseSource) -> None:
        self._response = _base_response(source)
        self._id_stem = source.response_id.split("_", 1)[-1]
        self._output: list[dict[str, Any]] = []
        self._starts: list[int] = []  # the seq each output item began at
        self._withdrawn: set[int] = set()  # the output items a rewind took back
        self._open: _OpenItem | None = None
        self._next = 0
        self._last_seq = 0
        self.finished = False

    @property
    def next_sequence_number(self) -> int:
        return self._next

    def start(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=self.snapshot()),
            self._event("response.in_progress", response=self.snapshot()),
        ]

    def snapshot(self) -> dict[str, Any]:
        """The response object with every output item so far (open ones as they stand)."""
        output = [dict(item) for item in self._output]
        if self._open is not None:
            output[self._open.index] = self._item_of(self._open, "in_progress")
        output = [item for index, item in enumerate(output) if index not in self._withdrawn]
        return {**self._response, "output": output}

    def feed(self, entry: LogEvent) -> list[dict[str, Any]]:
        """The events of one log entry. Entries must come in ``seq`` order, none skipped."""
        if entry.seq != self._last_seq + 1:
            raise ValueError(f"entry {entry.seq} after {self._last_seq}: entries must be contiguous")
        self._last_seq = entry.seq
        if isinstance(entry, TextEvent):
            return self._text(entry.seq, "message", entry.text)
        if isinstance(entry, ReasoningEvent):
            return self._text(entry.seq, "reasoning", entry.text)
        if isinstance(entry, ToolCallEvent):
            return self._close() + self._tool_call(entry)
        if isinstance(entry, ToolResultEvent):
            return self._close() + self._tool_result(entry)
        if isinstance(entry, ApprovalRequiredEvent):
            return self._close() + self._approval_request(entry)
        if isinstance(entry, RewindEvent):
            return self._rewind(entry.to_seq)
        if isinstance(entry, StatusEvent) and entry.is_terminal:
            return self._finish(entry)
        return []  # running / awaiting_approval status, decisions: nothing a Responses client sees

    def feed_all(self, entries: Iterable[LogEvent]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for entry in entries:
            out += self.feed(entry)
        return out

    # -- per kind ------------------------------------------------------------------------

    def _text(self, seq: int, kind: str, text: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self._open is None or self._open.kind != kind:
            out += self._close()
            prefix = "msg" if kind == "message" else "rs"
            item = _OpenItem(kind, len(self._output), f"{prefix}_{self._id_stem}_{seq}", [])
            self._open = item
            self._output.append({})
            self._starts.append(seq)
            out.append(
                self._event(
                    "response.output_item.added",
                    **self._where(item, with_content=False),
                    item=self._item_of(item, "in_progress", empty=True),
                )
            )
            out.append(
                self._event("response.content_part.added", **self._where(item), part=self._part(item, ""))
            )
        item = self._open
        item.text.append(text)
        item.seqs.append(seq)
        delta = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
        out.append(self._event(delta, **self._where(item), delta=text, **extra))
        return out

    def _close(self, status: str = "completed") -> list[dict[str, Any]]:
        item = self._open
        if item is None:
            return []
        self._open = None
        text = "".join(item.text)
        done = "response.output_text.done" if item.kind == "message" else "response.reasoning_text.done"
        extra: dict[str, Any] = {"logprobs": []} if item.kind == "message" else {}
        final = self._item_of(item, status)
        self._output[item.index] = final
        return [
            self._event(done, **self._where(item), text=text, **extra),
            self._event("response.content_part.done", **self._where(item), part=self._part(item, text)),
            self._event("response.output_item.done", output_index=item.index, item=final),
        ]

    def _rewind(self, to_seq: int) -> list[dict[str, Any]]:
        """Close the open item with the pieces up to ``to_seq``; withdraw every item that
        began after it."""
        out: list[dict[str, Any]] = []
        item = self._open
        if item is not None:
            kept = sum(1 for seq in item.seqs if seq <= to_seq)
            del item.text[kept:], item.seqs[kept:]
            out = self._close("completed" if kept else "incomplete")
        self._withdrawn.update(i for i, start in enumerate(self._starts) if start > to_seq)
        return out

    def _tool_call(self, entry: ToolCallEvent) -> list[dict[str, Any]]:
        index = len(self._output)
        item_id = f"fc_{self._id_stem}_{entry.seq}"
        added = {
            "type": "function_call",
            "id": item_id,
            "call_id": entry.call_id,
            "name": entry.name,
            "arguments": "",
            "status": "in_progress",
        }
        done = {**added, "arguments": entry.arguments, "status": "completed"}
        self._output.append(done)
        self._starts.append(entry.seq)
        where = {"output_index": index, "item_id": item_id}
        return [
            self._event("response.output_item.added", output_index=index, item=added),
            self._event("response.function_call_arguments.delta", **where, delta=entry.arguments),
            self._event("response.function_call_arguments.done", **where, arguments=entry.arguments),
            self._event("response.output_item.done", output_index=index, item=done),
        ]

    def _tool_result(self, entry: ToolResultEvent) -> list[dict[str, Any]]:
        index = len(self._output)
        item = {
            "type": "function_call_output",
            "id": f"fco_{self._id_stem}_{entry.seq}",
            "call_id": entry.call_id,
            "name": entry.name,
            "output": entry.output,
            "status": "incomplete" if entry.is_error else "completed",
            "created_by": "backstream",
        }
        self._output.append(item)
        self._starts.append(entry.seq)
        return [
            self._event("response.output_item.added", output_index=index, item=item),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def _approval_request(self, entry: ApprovalRequiredEvent) -> list[dict[str, Any]]:
        """A server tool's call waiting for a person, in the shape OpenAI gives an MCP
        tool's: the client answers it with an ``mcp_approval_response`` input item."""
        index = len(self._output)
        item = {
            "type": "mcp_approval_request",
            "id": approval_request_id(entry.call_id),
            "server_label": APPROVAL_SERVER_LABEL,
            "name": entry.name,
            "arguments": entry.arguments,
        }
        self._output.append(item)
        self._starts.append(entry.seq)
        return [
            self._event("response.output_item.added", output_index=index, item=item),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def _finish(self, entry: StatusEvent) -> list[dict[str, Any]]:
        status = response_status(entry.status, entry.error, entry.finish_reason)
        out = self._close("completed" if status == "completed" else "incomplete")
        self._response["status"] = status
        self._response["usage"] = _usage(entry.usage)
        if status == "failed":
            self._response["error"] = _error_object(entry.error)
        if status == "incomplete":
            self._response["incomplete_details"] = {
                "reason": _incomplete_reason(entry.status, entry.finish_reason)
            }
        self.finished = True
        # OpenAI streams no ``response.cancelled`` (a webhook event only): a cancelled
        # response ends with ``response.incomplete``, its status saying ``cancelled``.
        kind = {
            "completed": "response.completed",
            "failed": "response.failed",
            "incomplete": "response.incomplete",
            "cancelled": "response.incomplete",
        }[status]
        out.append(self._event(kind, response=self.snapshot()))
        return out

    # -- shapes --------------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._next, **fields}
        self._next += 1
        return event

    @staticmethod
    def _where(item: _OpenItem, *, with_content: bool = True) -> dict[str, Any]:
        where: dict[str, Any] = {"output_index": item.index}
        if with_content:
            where.update(item_id=item.item_id, content_index=0)
        return where

    @staticmethod
    def _part(item: _OpenItem, text: str) -> dict[str, Any]:
        if item.kind == "message":
            return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "reasoning_text", "text": text}

    def _item_of(self, item: _OpenItem, status: str, *, empty: bool = False) -> dict[str, Any]:
        text = "".join(item.text)
        if item.kind == "message":
            content = [] if empty else [self._part(item, text)]
            return {
                "type": "message",
                "id": item.item_id,
                "role": "assistant",
                "status": status,
                "content": content,
            }
        return {
            "type": "reasoning",
            "id": item.item_id,
            "summary": [],
            "status": status,
            "content": [] if empty else [self._part(item, text)],
        }
