"""Checks of what a caller asks for, before anything starts. Raise ``BadRequestError``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from backstream.protocol.errors import BadRequestError
from backstream.protocol.job_params import JOB_PARAMS, check_client_tools, check_max_tool_calls
from backstream.protocol.messages import MAX_NAME_CHARS
from backstream.runtime.models.builtin import BUILTIN_PARAMS

__all__ = ["ALLOWED_PARAMS", "check_identifier", "check_messages", "check_params", "workflow_input_of"]

ALLOWED_PARAMS = (
    frozenset(
        {
            "temperature",
            "top_p",
            "max_tokens",
            "stop",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "tool_choice",
            "parallel_tool_calls",
            "reasoning",
            "response_format",
        }
    )
    | JOB_PARAMS
)
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def check_identifier(name: str, value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAME_CHARS:
        raise BadRequestError(f"{name} must be a string of 1 to {MAX_NAME_CHARS} characters")
    return value


def check_messages(messages: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise BadRequestError("messages must be a non-empty list of chat messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequestError(f"messages[{i}] must be an object")
        role = message.get("role")
        if role not in _ROLES:
            raise BadRequestError(f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise BadRequestError(f"messages[{i}].content must be a string, a list of parts or null")
        out.append(dict(message))
    return tuple(out)


def workflow_input_of(value: Any, messages: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """A workflow job's input: ``value`` (a JSON object), or, without one, what its chat
    messages ask: ``{"ask": <the last user message's text>, "messages": messages}``."""
    if value is None:
        ask = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), None)
        if isinstance(ask, list):  # content parts: their text
            ask = "".join(
                p.get("text", "") for p in ask if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
        return {"ask": ask if isinstance(ask, str) else "", "messages": list(messages)}
    if not isinstance(value, dict):
        raise BadRequestError("input must be an object")
    problem = _not_json_safe(value)
    if problem is not None:
        raise BadRequestError(f"input holds {problem}")
    return dict(value)


def check_params(params: Any, *, builtin: bool) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequestError("params must be an object")
    allowed = ALLOWED_PARAMS | BUILTIN_PARAMS if builtin else ALLOWED_PARAMS
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise BadRequestError(f"params may not hold {', '.join(unknown)}")
    try:
        if "max_tool_calls" in params:
            check_max_tool_calls(params["max_tool_calls"])
        if "client_tools" in params:
            check_client_tools(params["client_tools"])
    except ValueError as exc:
        raise BadRequestError(f"params.{exc}") from None
    for name, value in params.items():
        wrong = _not_json_safe(value)  # it would be echoed into JSON that JSON.parse refuses
        if wrong:
            raise BadRequestError(f"params.{name} holds {wrong}")
    return dict(params)


def _not_json_safe(value: Any, depth: int = 0) -> str | None:
    """What in ``value`` JSON cannot carry as the protocol takes it (a NaN or infinite
    number, nesting past 64 levels), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else "a number that is not finite (NaN or infinite)"
    if depth >= 64:
        return "values nested deeper than 64 levels" if isinstance(value, dict | list | tuple) else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else ()
    return next((w for w in (_not_json_safe(v, depth + 1) for v in items) if w), None)
