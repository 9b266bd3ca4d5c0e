"""The frames of the AI SDK's ``WebSocketChatTransport`` and its UI messages, sans-IO.

Client frames (``send``, ``resume``, ``abort``) are decoded into frozen
values; UI messages become the OpenAI chat messages a job sends upstream; the
server frames (``start``, ``chunk``, ``end``, ``error``, ``no-active``) are
encoded here. The frame shapes are the ``ai`` package's
``WebSocketChatTransportRequest`` and ``WebSocketChatTransportResponse``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Literal
from urllib.parse import parse_qs

import attrs

from backstream.protocol.codec import ProtocolError, load_object

__all__ = [
    "AbortRequest",
    "ApprovalAnswer",
    "JobOptions",
    "ResumeRequest",
    "SendRequest",
    "approval_answers",
    "chat_messages",
    "coalesce_ms_of",
    "decode_request",
    "encode_frame",
    "job_key",
    "job_options",
]

MAX_REQUEST_ID_CHARS = 256


@attrs.frozen
class SendRequest:
    request_id: str
    chat_id: str
    trigger: Literal["submit-message", "regenerate-message"]
    message_id: str | None
    messages: tuple[dict[str, Any], ...]
    body: dict[str, Any]


@attrs.frozen
class ResumeRequest:
    request_id: str
    chat_id: str
    last_sequence: int | None
    body: dict[str, Any]
    epoch: int | None = None
    """The epoch of the log ``last_sequence`` was counted in (the ``start`` frame's)."""


@attrs.frozen
class AbortRequest:
    request_id: str


Request = SendRequest | ResumeRequest | AbortRequest


def decode_request(data: str | bytes) -> Request:
    """One client frame. Raises ``ProtocolError`` (``bad_request``) with the request id
    when it could be read."""
    obj = load_object(data)
    raw_id = obj.get("requestId")
    request_id = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= MAX_REQUEST_ID_CHARS else None
    kind = obj.get("type")
    if request_id is None:
        raise ProtocolError("bad_request", "a frame needs a string requestId (1 to 256 characters)")
    if kind == "abort":
        return AbortRequest(request_id)
    if kind not in ("send", "resume"):
        raise ProtocolError("bad_request", f"unknown frame type {str(kind)[:64]!r}", request_id)
    chat_id = obj.get("id")
    if not isinstance(chat_id, str) or not chat_id:
        raise ProtocolError("bad_request", f"{kind}: id (the chat id) must be a non-empty string", request_id)
    body = obj.get("body", {})
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise ProtocolError("bad_request", f"{kind}: body must be an object", request_id)
    if kind == "resume":
        last = obj.get("lastSequence")
        if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 0):
            raise ProtocolError(
                "bad_request", "resume: lastSequence must be a non-negative integer", request_id
            )
        epoch = obj.get("epoch")
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1):
            raise ProtocolError("bad_request", "resume: epoch must be a positive integer", request_id)
        return ResumeRequest(request_id, chat_id, last, body, epoch)
    trigger = obj.get("trigger")
    if trigger not in ("submit-message", "regenerate-message"):
        raise ProtocolError(
            "bad_request", "send: trigger must be submit-message or regenerate-message", request_id
        )
    message_id = obj.get("messageId")
    if message_id is not None and not isinstance(message_id, str):
        raise ProtocolError("bad_request", "send: messageId must be a string", request_id)
    messages = obj.get("messages")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("parts"), list) for m in messages
    ):
        raise ProtocolError(
            "bad_request", "send: messages must be a list of UI messages with parts", request_id
        )
    return SendRequest(request_id, chat_id, trigger, message_id, tuple(messages), body)


MAX_COALESCE_MS = 10_000
"""The longest ``coalesce_ms`` a connection may ask for (ten seconds between text frames)."""


def coalesce_ms_of(query: str, default: int) -> int:
    """The ``coalesce_ms`` query parameter of the endpoint's URL, else ``default``. Raises
    ``ProtocolError`` (``bad_request``) unless it is an integer in [0, ``MAX_COALESCE_MS``]."""
    values = parse_qs(query).get("coalesce_ms")
    if not values:
        return default
    text = values[-1]
    if not text.isascii() or not text.isdigit() or int(text) > MAX_COALESCE_MS:
        raise ProtocolError(
            "bad_request", f"coalesce_ms must be an integer of milliseconds in [0, {MAX_COALESCE_MS}]"
        )
    return int(text)


def encode_frame(kind: str, request_id: str, **fields: Any) -> str:
    """A server frame: ``start``, ``chunk`` (``sequence``, ``chunk``), ``end``, ``error``
    (``errorText``) or ``no-active``."""
    return json.dumps(
        {"type": kind, "requestId": request_id, **fields}, separators=(",", ":"), ensure_ascii=False
    )


# -- what the job is asked to do ----------------------------------------------------------------


@attrs.frozen
class JobOptions:
    model: str
    params: dict[str, Any]
    tools: list[str]


def job_options(body: dict[str, Any], default_model: str) -> JobOptions:
    """``{"model", "params", "tools"}`` from the request ``body``; other keys are ignored.
    Raises ``ProtocolError``."""
    model = body.get("model", default_model)
    params = body.get("params", {})
    tools = body.get("tools", [])
    if not isinstance(model, str) or not model:
        raise ProtocolError("bad_request", "body.model must be a model name")
    if not isinstance(params, dict):
        raise ProtocolError("bad_request", "body.params must be an object")
    if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
        raise ProtocolError("bad_request", "body.tools must be a list of tool names")
    return JobOptions(model, dict(params), list(tools))


def job_key(request: SendRequest, *, regenerating: str | None = None) -> str | None:
    """The idempotency key of the job a ``send`` starts: the chat and its last user
    message (and, to regenerate, the answer it replaces; to go on after client-side tools,
    the calls answered). None without a user message."""
    user_id = next((m.get("id") for m in reversed(request.messages) if m.get("role") == "user"), None)
    if not isinstance(user_id, str):
        return None
    parts = [request.chat_id, user_id] + ([regenerating] if regenerating is not None else [])
    answered = tool_outputs_given(request.messages)
    if answered is not None:
        parts += ["tools", *answered.call_ids]
    return "ais_" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:40]


@attrs.frozen
class ToolOutputsGiven:
    """A ``send`` whose last message is the assistant's, its last step's tool calls all
    done: the page answered client-side tools (``addToolOutput``) and the answer goes on."""

    message_id: str
    """The assistant message the answer continues (the stream keeps its id)."""
    call_ids: tuple[str, ...]


def tool_outputs_given(messages: Sequence[dict[str, Any]]) -> ToolOutputsGiven | None:
    """The tool outputs a ``send`` carries in its last (assistant) message, if any."""
    if not messages or messages[-1].get("role") != "assistant":
        return None
    last = messages[-1]
    parts = [p for p in last.get("parts", []) if isinstance(p, dict)]
    starts = [i for i, p in enumerate(parts) if p.get("type") == "step-start"]
    step = parts[starts[-1] + 1 :] if starts else parts
    calls = [p for p in step if _is_tool(p)]
    message_id = last.get("id")
    if not calls or not isinstance(message_id, str) or not 1 <= len(message_id) <= MAX_REQUEST_ID_CHARS:
        return None
    if any(p.get("state") not in _DONE_TOOL_STATES for p in calls):
        return None
    return ToolOutputsGiven(message_id, tuple(str(p.get("toolCallId")) for p in calls))


@attrs.frozen
class ApprovalAnswer:
    approval_id: str
    approved: bool


def approval_answers(messages: Sequence[dict[str, Any]]) -> list[ApprovalAnswer]:
    """The decisions in the last message, if it is the assistant's: tool parts in state
    ``approval-responded``."""
    if not messages or messages[-1].get("role") != "assistant":
        return []
    out = []
    for part in messages[-1].get("parts", []):
        if not isinstance(part, dict) or not _is_tool(part) or part.get("state") != "approval-responded":
            continue
        approval = part.get("approval")
        if (
            isinstance(approval, dict)
            and isinstance(approval.get("id"), str)
            and isinstance(approval.get("approved"), bool)
        ):
            out.append(ApprovalAnswer(approval["id"], approval["approved"]))
    return out


# -- UI messages -> chat messages ----------------------------------------------------------------

_DONE_TOOL_STATES = frozenset({"output-available", "output-error", "output-denied"})


def chat_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The OpenAI chat messages of a conversation of UI messages. Raises ``ProtocolError``
    for a part it cannot pass on."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        parts = [p for p in message.get("parts", []) if isinstance(p, dict)]
        if role in ("system", "user"):
            content = _user_content(parts, i)
            if content:
                out.append({"role": role, "content": content})
        elif role == "assistant":
            out.extend(_assistant_messages(parts))
        else:
            raise ProtocolError("bad_request", f"messages[{i}].role must be system, user or assistant")
    if not out:
        raise ProtocolError("bad_request", "the messages hold no text to answer")
    return out


def _user_content(parts: list[dict[str, Any]], index: int) -> str | list[dict[str, Any]]:
    pieces: list[dict[str, Any]] = []
    for part in parts:
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append({"type": "text", "text": part["text"]})
        elif kind == "file":
            pieces.append(_file_piece(part, index))
    if all(p["type"] == "text" for p in pieces):
        return "".join(p["text"] for p in pieces)
    return pieces


def _file_piece(part: dict[str, Any], index: int) -> dict[str, Any]:
    url, media_type = part.get("url"), part.get("mediaType")
    if not isinstance(url, str) or not isinstance(media_type, str):
        raise ProtocolError("bad_request", f"messages[{index}]: a file part needs url and mediaType")
    if media_type.startswith("image/"):
        return {"type": "image_url", "image_url": {"url": url}}
    if url.startswith("data:"):
        filename = part.get("filename") if isinstance(part.get("filename"), str) else "file"
        return {"type": "file", "file": {"filename": filename, "file_data": url}}
    raise ProtocolError("bad_request", f"messages[{index}]: a {media_type} file must be sent as a data: URL")


def _assistant_messages(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One assistant message (with its tool calls) and the tool results, per step."""
    out: list[dict[str, Any]] = []
    steps: list[list[dict[str, Any]]] = [[]]
    for part in parts:
        if part.get("type") == "step-start":
            steps.append([])
        else:
            steps[-1].append(part)
    for step in steps:
        text = "".join(p["text"] for p in step if p.get("type") == "text" and isinstance(p.get("text"), str))
        calls = [p for p in step if _is_tool(p) and p.get("state") in _DONE_TOOL_STATES]
        if not text and not calls:
            continue
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            message["tool_calls"] = [
                {
                    "id": str(p.get("toolCallId")),
                    "type": "function",
                    "function": {"name": _tool_name(p), "arguments": json.dumps(p.get("input", {}))},
                }
                for p in calls
            ]
        out.append(message)
        out.extend(
            {"role": "tool", "tool_call_id": str(p.get("toolCallId")), "content": _tool_result_text(p)}
            for p in calls
        )
    return out


def _is_tool(part: dict[str, Any]) -> bool:
    kind = part.get("type")
    return isinstance(kind, str) and (kind.startswith("tool-") or kind == "dynamic-tool")


def _tool_name(part: dict[str, Any]) -> str:
    kind = str(part.get("type"))
    return str(part.get("toolName", "")) if kind == "dynamic-tool" else kind[len("tool-") :]


def _tool_result_text(part: dict[str, Any]) -> str:
    state = part.get("state")
    if state == "output-denied":
        return "the user declined to run this tool"
    if state == "output-error":
        return str(part.get("errorText", "error"))
    output = part.get("output")
    return output if isinstance(output, str) else json.dumps(output)
