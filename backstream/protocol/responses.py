"""OpenAI's Responses API over a job: request parsing and the log -> events translation.

Sans-IO. ``parse_create`` turns a ``POST /v1/responses`` body into a ``ResponseRequest``
(what ``start_job`` needs). ``ResponsesTranslator`` turns a job's log entries, one entry at a
time and in ``seq`` order, into numbered Responses streaming events.

The numbering is a pure function of the log: every entry kind yields a fixed set of events
given the entries before it, so any instance replaying the same log, at any time, gives every
event the same ``sequence_number``. A resumed stream replays from the first entry and skips the
events the client already has. This needs the entries as stored (one text entry per ``seq``),
never text merged across entries: merging depends on how reads were batched.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

from backstream.protocol.errors import BadRequestError
from backstream.protocol.events import (
    LIVE_STATUSES,
    ErrorInfo,
    LogEvent,
    ReasoningEvent,
    StatusEvent,
    TextEvent,
    ToolCallEvent,
    ToolResultEvent,
)

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

MAX_ANNOTATION_CHARS: Final = 16 * 1024
"""Bound on what a request keeps with its job to echo back (instructions, metadata, tools)."""

_MAX_METADATA_KEYS: Final = 16
_INPUT_TEXT_PARTS: Final = frozenset({"input_text", "output_text", "text"})
_INPUT_ROLES: Final = frozenset({"user", "assistant", "system", "developer"})
# Accepted and ignored: they change nothing a client can observe here.
_IGNORED_FIELDS: Final = frozenset(
    {
        "store",
        "include",
        "user",
        "service_tier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "safety_identifier",
        "stream_options",
        "truncation",
        "top_logprobs",
        "text",
    }
)
_PARAM_FIELDS: Final = {
    "temperature": "temperature",
    "top_p": "top_p",
    "max_output_tokens": "max_tokens",
    "parallel_tool_calls": "parallel_tool_calls",
    "tool_choice": "tool_choice",
    "reasoning": "reasoning",
}
_KNOWN_FIELDS: Final = (
    frozenset({"model", "input", "instructions", "tools", "background", "stream", "metadata"})
    | _IGNORED_FIELDS
    | frozenset(_PARAM_FIELDS)
)


@attrs.frozen
class ResponseRequest:
    """A ``POST /v1/responses`` body, checked: what the job is started with."""

    model: str
    messages: tuple[dict[str, Any], ...]
    params: dict[str, Any]
    tools: tuple[str, ...]
    background: bool
    stream: bool
    thread_id: str | None
    annotations: dict[str, Any]
    """Kept with the job and echoed in the response object: instructions, metadata, tools."""


def parse_create(body: Any) -> ResponseRequest:
    """Check a create body. Raises ``BadRequestError`` whose ``param`` extra names the field."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    unsupported = sorted(set(body) - _KNOWN_FIELDS)
    if unsupported:
        raise _bad(f"{unsupported[0]!r} is not supported by this server", unsupported[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model must be a non-empty string", "model")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _bad("instructions must be a string", "instructions")
    messages = _input_messages(body.get("input"))
    if instructions:
        messages = [{"role": "system", "content": instructions}, *messages]
    tools, tool_entries = _tools(body.get("tools"))
    metadata = _metadata(body.get("metadata"))
    params = _params(body)
    background = _flag(body, "background")
    annotations: dict[str, Any] = {"metadata": metadata, "background": background}
    if instructions is not None:
        annotations["instructions"] = instructions
    if tool_entries:
        annotations["tools"] = tool_entries
    if len(json.dumps(annotations)) > MAX_ANNOTATION_CHARS:
        raise _bad(
            f"instructions, metadata and tools may hold at most {MAX_ANNOTATION_CHARS} characters", None
        )
    return ResponseRequest(
        model=model,
        messages=tuple(messages),
        params=params,
        tools=tools,
        background=background,
        stream=_flag(body, "stream"),
        thread_id=metadata.get("thread_id"),
        annotations=annotations,
    )


def _bad(message: str, param: str | None) -> BadRequestError:
    return BadRequestError(message, param=param)


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"{name} must be a boolean", name)
    return value


def _input_messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        if not value:
            raise _bad("input must not be empty", "input")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _bad("input must be a string or a non-empty list of messages", "input")
    out = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{where} must be an object", where)
        kind = item.get("type", "message")
        if kind != "message":
            raise _bad(f"{where}.type {kind!r} is not supported (only messages)", f"{where}.type")
        role = item.get("role")
        if role not in _INPUT_ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(sorted(_INPUT_ROLES))}", f"{where}.role")
        out.append({"role": role, "content": _content(item.get("content"), f"{where}.content")})
    return out


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad(f"{where} must be a string or a list of text parts", where)
    texts = []
    for i, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") not in _INPUT_TEXT_PARTS:
            raise _bad(
                f"{where}[{i}] must be a text part (input_text); other inputs are not supported", where
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise _bad(f"{where}[{i}].text must be a string", where)
        texts.append(text)
    return "".join(texts)


def _tools(value: Any) -> tuple[tuple[str, ...], list[dict[str, Any]]]:
    if value is None:
        return (), []
    if not isinstance(value, list):
        raise _bad("tools must be a list", "tools")
    names, entries = [], []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise _bad(f"tools[{i}] must be a function tool naming a server tool", f"tools[{i}]")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools[{i}].name must be a non-empty string", f"tools[{i}].name")
        names.append(name)
        entries.append(
            {
                "type": "function",
                "name": name,
                "description": tool.get("description"),
                "parameters": tool.get("parameters"),
                "strict": tool.get("strict"),
            }
        )
    return tuple(names), entries


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > _MAX_METADATA_KEYS:
        raise _bad(f"metadata must be an object of at most {_MAX_METADATA_KEYS} string values", "metadata")
    for key, item in value.items():
        if len(key) > 64 or not isinstance(item, str) or len(item) > 512:
            raise _bad("metadata keys are at most 64 characters, values strings of at most 512", "metadata")
    return dict(value)


def _params(body: Mapping[str, Any]) -> dict[str, Any]:
    params = {}
    for field, param in _PARAM_FIELDS.items():
        value = body.get(field)
        if value is None:
            continue
        if field in ("temperature", "top_p") and (
            isinstance(value, bool) or not isinstance(value, int | float)
        ):
            raise _bad(f"{field} must be a number", field)
        if field == "max_output_tokens" and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise _bad("max_output_tokens must be a positive integer", field)
        if field == "parallel_tool_calls" and not isinstance(value, bool):
            raise _bad("parallel_tool_calls must be a boolean", field)
        if field == "tool_choice" and value not in ("auto", "none", "required"):
            raise _bad("tool_choice must be auto, none or required", field)
        params[param] = value
    return params


# -- the response object and its status ---------------------------------------------------


def response_status(status: str, error: ErrorInfo | None, finish_reason: str | None) -> str:
    """The Responses status of a job status (see the README's table)."""
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
    metadata = dict(source.annotations.get("metadata") or {})
    metadata.setdefault("thread_id", source.thread_id)
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


class ResponsesTranslator:
    """Log entries in, numbered Responses events out. Feed every entry from ``seq`` 1 on.

    ``start()`` gives ``response.created`` (0) and ``response.in_progress`` (1); ``feed``
    gives the events of one entry. ``snapshot()`` is the response object so far.
    """

    def __init__(self, source: ResponseSource) -> None:
        self._response = _base_response(source)
        self._id_stem = source.response_id.split("_", 1)[-1]
        self._output: list[dict[str, Any]] = []
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
        if isinstance(entry, StatusEvent) and entry.is_terminal:
            return self._finish(entry)
        return []  # running / awaiting_approval status, approvals: nothing a Responses client sees

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
        kind = {
            "completed": "response.completed",
            "failed": "response.failed",
            "incomplete": "response.incomplete",
            "cancelled": "response.cancelled",
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


# -- wire shapes ------------------------------------------------------------------------------


def sse_frame(event: Mapping[str, Any], *, with_id: bool = True) -> bytes:
    """One server-sent event: ``id:`` (the sequence number), ``event:`` and one ``data:`` line."""
    data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    head = f"id: {event['sequence_number']}\n" if with_id else ""
    return f"{head}event: {event['type']}\ndata: {data}\n\n".encode()


def error_body(message: str, *, kind: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
