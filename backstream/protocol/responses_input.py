"""OpenAI's Responses API input items: to chat messages, and back for ``input_items``.

Sans-IO. ``parse_input`` takes a create's ``input`` (a string or a list of items):
``message`` items (roles user, assistant, system, developer; text content), the
``function_call`` items of an earlier response's output (sent back as a client keeping its
own history does), ``function_call_output`` items (a client-side tool's result),
``mcp_approval_response`` items (a decision on a server tool waiting for approval) and
``reasoning`` / ``mcp_approval_request`` items of an earlier output (ignored: nothing to
send a model). ``input_items`` turns a job's input messages back into items, and
``page_items`` pages them as OpenAI pages lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import attrs

from backstream.protocol.errors import BadRequestError

__all__ = [
    "APPROVAL_REQUEST_PREFIX",
    "ApprovalAnswer",
    "ParsedInput",
    "approval_request_id",
    "input_items",
    "page_items",
    "parse_input",
]

APPROVAL_REQUEST_PREFIX: Final = "mcpr_"
"""An ``mcp_approval_request`` item's id is this prefix and its call's id."""
_TEXT_PARTS: Final = frozenset({"input_text", "output_text", "text"})
_ROLES: Final = frozenset({"user", "assistant", "system", "developer"})
_IGNORED_ITEMS: Final = frozenset({"reasoning", "mcp_approval_request"})
MAX_PAGE: Final = 100


def approval_request_id(call_id: str) -> str:
    return APPROVAL_REQUEST_PREFIX + call_id


@attrs.frozen
class ApprovalAnswer:
    """An ``mcp_approval_response`` item: the decision on one call."""

    call_id: str
    approve: bool


@attrs.frozen
class ParsedInput:
    messages: tuple[dict[str, Any], ...]
    approvals: tuple[ApprovalAnswer, ...]


def parse_input(value: Any) -> ParsedInput:
    """Chat messages and approval decisions of a create's ``input``. Raises
    ``BadRequestError`` whose ``param`` names the item."""
    if isinstance(value, str):
        if not value:
            raise _bad("input must not be empty", "input")
        return ParsedInput(({"role": "user", "content": value},), ())
    if not isinstance(value, list) or not value:
        raise _bad("input must be a string or a non-empty list of items", "input")
    messages: list[dict[str, Any]] = []
    approvals: list[ApprovalAnswer] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{where} must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            _add_call(messages, item, where)
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", where)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": _output(item, where)})
        elif kind == "mcp_approval_response":
            approvals.append(_approval(item, where))
        elif kind not in _IGNORED_ITEMS:
            raise _bad(
                f"{where}.type {kind!r} is not supported (messages, function_call, "
                "function_call_output, mcp_approval_response)",
                f"{where}.type",
            )
    return ParsedInput(tuple(messages), tuple(approvals))


def _bad(message: str, param: str | None) -> BadRequestError:
    return BadRequestError(message, param=param)


def _string(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str) or not value:
        raise _bad(f"{where}.{name} must be a non-empty string", f"{where}.{name}")
    return value


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
        raise _bad(f"{where}.role must be one of {', '.join(sorted(_ROLES))}", f"{where}.role")
    return {"role": role, "content": _text(item.get("content"), f"{where}.content")}


def _text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad(f"{where} must be a string or a list of text parts", where)
    texts = []
    for i, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
            raise _bad(
                f"{where}[{i}] must be a text part (input_text); other inputs are not supported", where
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise _bad(f"{where}[{i}].text must be a string", where)
        texts.append(text)
    return "".join(texts)


def _output(item: dict[str, Any], where: str) -> str:
    value = item.get("output")
    if isinstance(value, str):
        return value
    return _text(value, f"{where}.output")


def _add_call(messages: list[dict[str, Any]], item: dict[str, Any], where: str) -> None:
    """A ``function_call`` joins the assistant message before it (one message holds a
    turn's text and calls, as chat completions want), or starts one."""
    arguments = item.get("arguments")
    if not isinstance(arguments, str):
        raise _bad(f"{where}.arguments must be a string", f"{where}.arguments")
    call = {
        "id": _string(item, "call_id", where),
        "type": "function",
        "function": {"name": _string(item, "name", where), "arguments": arguments},
    }
    last = messages[-1] if messages else None
    if last is not None and last.get("role") == "assistant":
        last.setdefault("tool_calls", []).append(call)
        if not last.get("content"):
            last["content"] = None
        return
    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _approval(item: dict[str, Any], where: str) -> ApprovalAnswer:
    request_id = _string(item, "approval_request_id", where)
    approve = item.get("approve")
    if not isinstance(approve, bool):
        raise _bad(f"{where}.approve must be a boolean", f"{where}.approve")
    if not request_id.startswith(APPROVAL_REQUEST_PREFIX) or len(request_id) == len(APPROVAL_REQUEST_PREFIX):
        raise _bad(f"{where}.approval_request_id names no approval request", f"{where}.approval_request_id")
    return ApprovalAnswer(request_id[len(APPROVAL_REQUEST_PREFIX) :], approve)


# -- input items, listed --------------------------------------------------------------------


def input_items(response_id: str, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The input items of a response whose own input messages are ``messages``, in order."""
    stem = response_id.split("_", 1)[-1]
    items: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role == "tool":
            items.append(
                {
                    "type": "function_call_output",
                    "id": f"fco_{stem}_in{i}",
                    "call_id": message.get("tool_call_id"),
                    "output": content if isinstance(content, str) else "",
                    "status": "completed",
                }
            )
            continue
        if content:
            part = "output_text" if role == "assistant" else "input_text"
            text = content if isinstance(content, str) else _joined(content)
            extra: dict[str, Any] = {"annotations": []} if role == "assistant" else {}
            items.append(
                {
                    "type": "message",
                    "id": f"msg_{stem}_in{i}",
                    "role": role,
                    "status": "completed",
                    "content": [{"type": part, "text": text, **extra}],
                }
            )
        for j, call in enumerate(message.get("tool_calls") or ()):
            function = call.get("function") or {}
            items.append(
                {
                    "type": "function_call",
                    "id": f"fc_{stem}_in{i}_{j}",
                    "call_id": call.get("id"),
                    "name": function.get("name"),
                    "arguments": function.get("arguments"),
                    "status": "completed",
                }
            )
    return items


def _joined(parts: Any) -> str:
    return "".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))


def page_items(
    items: Sequence[dict[str, Any]],
    *,
    after: str | None,
    before: str | None,
    limit: Any,
    order: str | None,
) -> dict[str, Any]:
    """A page of ``items`` (oldest first) as OpenAI lists them: ``order`` ``desc`` (the
    default) or ``asc``; ``after``/``before`` an item id (exclusive); ``limit`` 1 to 100
    (20 by default). Raises ``BadRequestError`` for a bad parameter or an unknown id."""
    order = order or "desc"
    if order not in ("asc", "desc"):
        raise _bad("order must be asc or desc", "order")
    count = _limit(limit)
    ordered = list(items) if order == "asc" else list(reversed(items))
    ids = [item["id"] for item in ordered]
    start, end = 0, len(ordered)
    for name, cursor in (("after", after), ("before", before)):
        if cursor is None:
            continue
        if cursor not in ids:
            raise _bad(f"{name} names no input item of this response", name)
        if name == "after":
            start = ids.index(cursor) + 1
        else:
            end = ids.index(cursor)
    window = ordered[start:end]
    data = window[:count] if before is None or after is not None else window[-count:]
    has_more = len(window) > len(data)
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def _limit(value: Any) -> int:
    if value is None or value == "":
        return 20
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise _bad("limit must be an integer from 1 to 100", "limit") from None
    if not 1 <= count <= MAX_PAGE:
        raise _bad("limit must be an integer from 1 to 100", "limit")
    return count
