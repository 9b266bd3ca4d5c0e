"""OpenAI's Responses API: checking a ``POST /v1/responses`` body.

Sans-IO. ``parse_create`` turns the body into a ``ResponseRequest`` (what ``start_job``
needs); a bad field is a ``BadRequestError`` whose ``param`` extra names it. ``metadata``
is kept as sent (its ``thread_id``, if any, also names the job's thread) and echoed
unchanged. ``max_tool_calls`` (a non-negative integer) becomes the job param of that name
(``protocol.job_params``): at most that many server-side tool calls run in the response.
``input`` items are read by ``protocol.responses_input``; function tools with
``parameters`` are the client's (the ``client_tools`` job param); ``previous_response_id``
and ``store`` are kept for the HTTP layer, which continues the conversation
(``protocol.history``) and deletes an unstored response once answered.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Final

import attrs

from backstream.protocol.errors import BadRequestError
from backstream.protocol.job_params import check_client_tools, check_max_tool_calls
from backstream.protocol.responses_input import ApprovalAnswer, parse_input

__all__ = [
    "BODY_SHA256",
    "MAX_ANNOTATION_CHARS",
    "MAX_IDEMPOTENCY_KEY_CHARS",
    "ResponseRequest",
    "body_fingerprint",
    "parse_create",
]

MAX_ANNOTATION_CHARS: Final = 16 * 1024
"""Bound on what a request keeps with its job to echo back (instructions, metadata, tools)."""

MAX_IDEMPOTENCY_KEY_CHARS: Final = 200
"""Longest ``Idempotency-Key`` header taken; a longer one is a 400."""
BODY_SHA256: Final = "body_sha256"
"""The annotation that keeps a keyed create's ``body_fingerprint``, to tell a retry (the
same body) from a reuse of the key for another request. Never echoed."""

_MAX_METADATA_KEYS: Final = 16
# Accepted and ignored: they change nothing a client can observe here.
_IGNORED_FIELDS: Final = frozenset(
    {
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
    "max_tool_calls": "max_tool_calls",
}
_KNOWN_FIELDS: Final = (
    frozenset(
        {"model", "input", "instructions", "tools", "background", "stream", "metadata", "store"}
        | {"previous_response_id"}
    )
    | _IGNORED_FIELDS
    | frozenset(_PARAM_FIELDS)
)


@attrs.frozen
class ResponseRequest:
    """A ``POST /v1/responses`` body, checked: what the job is started with."""

    model: str
    instructions: str | None
    input_messages: tuple[dict[str, Any], ...]
    """The input as chat messages (without the instructions)."""
    approvals: tuple[ApprovalAnswer, ...]
    """Decisions on server tools waiting for approval (``mcp_approval_response`` items)."""
    previous_response_id: str | None
    store: bool
    params: dict[str, Any]
    tools: tuple[str, ...]
    background: bool
    stream: bool
    thread_id: str | None
    annotations: dict[str, Any]
    """Kept with the job and echoed in the response object: instructions, metadata, tools."""

    @property
    def messages(self) -> tuple[dict[str, Any], ...]:
        """The job's messages when it continues no earlier response."""
        system = ({"role": "system", "content": self.instructions},) if self.instructions else ()
        return (*system, *self.input_messages)


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
    given = parse_input(body.get("input"))
    previous = _previous_response_id(body)
    if not given.messages and previous is None:
        raise _bad("input must hold a message unless it continues a previous response", "input")
    tools, client_tools, tool_entries = _tools(body.get("tools"))
    metadata = _metadata(body.get("metadata"))
    params = _params(body)
    if client_tools:
        params["client_tools"] = client_tools
    background = _flag(body, "background")
    store = body.get("store", True)
    if not isinstance(store, bool):
        raise _bad("store must be a boolean", "store")
    if not store and background:
        raise _bad("background responses must be stored: store=false cannot be used with background", "store")
    annotations: dict[str, Any] = {"metadata": metadata, "background": background}
    if not store:
        annotations["store"] = False
    if previous is not None:
        annotations["previous_response_id"] = previous
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
        instructions=instructions or None,
        input_messages=given.messages,
        approvals=given.approvals,
        previous_response_id=previous,
        store=store,
        params=params,
        tools=tools,
        background=background,
        stream=_flag(body, "stream"),
        thread_id=metadata.get("thread_id"),
        annotations=annotations,
    )


def _previous_response_id(body: Mapping[str, Any]) -> str | None:
    value = body.get("previous_response_id")
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 256:
        raise _bad("previous_response_id must be a response id", "previous_response_id")
    return value


def body_fingerprint(body: Any) -> str:
    """SHA-256 (hex) of a decoded body's canonical JSON (keys sorted, no spaces, ASCII):
    the same request whatever its key order or spacing."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _bad(message: str, param: str | None) -> BadRequestError:
    return BadRequestError(message, param=param)


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"{name} must be a boolean", name)
    return value


def _tools(value: Any) -> tuple[tuple[str, ...], list[dict[str, Any]], list[dict[str, Any]]]:
    """Server tools' names, client tools' chat specs, and every entry to echo. A function
    tool without ``parameters`` names a server tool; one with ``parameters`` is defined by
    the client, which runs it (``client_tools``)."""
    if value is None:
        return (), [], []
    if not isinstance(value, list):
        raise _bad("tools must be a list", "tools")
    names: list[str] = []
    client: list[dict[str, Any]] = []
    entries = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise _bad(f"tools[{i}] must be a function tool", f"tools[{i}]")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools[{i}].name must be a non-empty string", f"tools[{i}].name")
        if "parameters" in tool:
            function = {
                "name": name,
                "parameters": tool.get("parameters") or {"type": "object", "properties": {}},
            }
            if isinstance(tool.get("description"), str):
                function["description"] = tool["description"]
            if isinstance(tool.get("strict"), bool):
                function["strict"] = tool["strict"]
            client.append({"type": "function", "function": function})
        else:
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
    if client:
        try:
            check_client_tools(client)
        except ValueError as exc:
            raise _bad(str(exc).replace("client_tools", "tools").replace(".function", ""), "tools") from None
    both = set(names) & {spec["function"]["name"] for spec in client}
    if both:
        raise _bad(f"tools names {sorted(both)[0]!r} twice", "tools")
    return tuple(names), client, entries


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
        if field == "max_tool_calls":
            try:
                check_max_tool_calls(value)
            except ValueError as exc:
                raise _bad(str(exc), field) from None
        params[param] = value
    return params
