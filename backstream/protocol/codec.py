"""Encode and decode wire messages: a cattrs converter with tagged unions.

Client messages are a union tagged by ``type``; log events inside
``job.events`` a union tagged by ``kind``. Decoding is strict about JSON types
(a string is not an int, a string is not a list) and lenient about extra
fields, which are ignored. Every decoding failure raises one
``ProtocolError`` that carries the protocol error code and, when it could be
read, the request ``id``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, get_args, get_origin

import attrs
import cattrs
import orjson
from cattrs.gen import make_dict_unstructure_fn, override
from cattrs.strategies import configure_tagged_union

from backstream.protocol.events import (
    ApprovalEvent,
    ApprovalRequiredEvent,
    Batch,
    ErrorInfo,
    LogEvent,
    ReasoningEvent,
    RewindEvent,
    StatusEvent,
    StepEvent,
    TextEvent,
    ToolCallDeltaEvent,
    ToolCallEvent,
    ToolResultEvent,
)
from backstream.protocol.messages import (
    CLIENT_MESSAGES,
    SERVER_MESSAGES,
    ClientMessage,
    ErrorMessage,
    JobEvents,
    JobInfoMessage,
    JobStart,
    ServerMessage,
    Welcome,
)
from backstream.protocol.text import repair_strings

__all__ = [
    "EVENT_CLASSES",
    "OPT_IN_KINDS",
    "ProtocolError",
    "batch_message",
    "converter",
    "decode_client",
    "decode_server",
    "encode",
    "error_message",
    "load_object",
    "loads_checked",
    "peek_request_id",
]

EVENT_CLASSES: tuple[type[Any], ...] = (
    TextEvent,
    ReasoningEvent,
    ToolCallEvent,
    ToolCallDeltaEvent,
    ApprovalRequiredEvent,
    ApprovalEvent,
    ToolResultEvent,
    RewindEvent,
    StepEvent,
    StatusEvent,
)
OPT_IN_KINDS: frozenset[str] = frozenset({"tool_call_delta"})
"""Event kinds a watch carries only when it asks for them (``tool_call_deltas``)."""
MAX_DEPTH = 64  # JSON nesting deeper than this is refused before it reaches the converter


class ProtocolError(Exception):
    """A message that cannot be accepted. ``code`` is a protocol error code."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


def _strict(kind: type[Any] | tuple[type[Any], ...], name: str) -> Callable[[Any, Any], Any]:
    def hook(value: Any, _type: Any) -> Any:
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise TypeError(f"expected {name}, got a boolean")
        if not isinstance(value, kind):
            raise TypeError(f"expected {name}, got {type(value).__name__}")
        return value

    return hook


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter()
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(int, _strict(int, "an integer"))
    conv.register_structure_hook(bool, _strict(bool, "a boolean"))
    conv.register_structure_hook(float, lambda v, _t: float(_strict((int, float), "a number")(v, _t)))
    conv.register_structure_hook(Any, lambda v, _t: v)

    def is_list(t: Any) -> bool:
        return get_origin(t) is list

    def list_hook(t: Any) -> Callable[[Any, Any], Any]:
        (item,) = get_args(t) or (Any,)

        def hook(value: Any, _t: Any) -> list[Any]:
            if not isinstance(value, list):
                raise TypeError(f"expected a list, got {type(value).__name__}")
            return [conv.structure(v, item) for v in value]

        return hook

    def is_dict(t: Any) -> bool:
        return get_origin(t) is dict

    def dict_hook(t: Any) -> Callable[[Any, Any], Any]:
        def hook(value: Any, _t: Any) -> dict[str, Any]:
            if not isinstance(value, dict):
                raise TypeError(f"expected an object, got {type(value).__name__}")
            return value

        return hook

    conv.register_structure_hook_factory(is_list, list_hook)
    conv.register_structure_hook_factory(is_dict, dict_hook)

    # Optional fields that are absent from the wire when empty.
    for cls in (ErrorInfo, ErrorMessage):
        conv.register_unstructure_hook(cls, make_dict_unstructure_fn(cls, conv, _cattrs_omit_if_default=True))
    conv.register_unstructure_hook(
        JobInfoMessage,
        make_dict_unstructure_fn(
            JobInfoMessage,
            conv,
            content=override(omit_if_default=True),
            next_offset=override(omit_if_default=True),
            next_tool_calls_offset=override(omit_if_default=True),
            step=override(omit_if_default=True),
        ),
    )
    conv.register_unstructure_hook(
        Welcome, make_dict_unstructure_fn(Welcome, conv, models=override(omit_if_default=True))
    )
    conv.register_unstructure_hook(
        JobStart,
        make_dict_unstructure_fn(
            JobStart,
            conv,
            workflow=override(omit_if_default=True),
            input=override(omit_if_default=True),
        ),
    )
    # ``kind`` is the events' tag; the tagged union below writes it.
    for cls in EVENT_CLASSES:
        conv.register_unstructure_hook(cls, make_dict_unstructure_fn(cls, conv, kind=override(omit=True)))

    configure_tagged_union(LogEvent, conv, tag_generator=_kind_of, tag_name="kind")
    configure_tagged_union(ClientMessage, conv, tag_generator=_type_of, tag_name="type")
    configure_tagged_union(ServerMessage, conv, tag_generator=_type_of, tag_name="type")
    return conv


def _type_of(cls: type[Any]) -> str:
    return str(cls.TYPE)


def _kind_of(cls: type[Any]) -> str:
    return str(attrs.fields_dict(cls)["kind"].default)


converter = _make_converter()


def _depth_ok(text: str) -> bool:
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return False
        elif ch in "]}":
            depth -= 1
    return True


class _NonFinite(ValueError):
    """A number JSON cannot hold (NaN, Infinity, an overflow): ``JSON.parse`` refuses it."""


def _refuse_constant(name: str) -> Any:
    raise _NonFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(text[:32])
    return value


def loads_checked(text: str, *, what: str = "the message") -> Any:
    """JSON text from outside, as every front door takes it: nested at most ``MAX_DEPTH``
    levels (checked before parsing, so no recursion runs deep), numbers finite (``NaN``,
    ``Infinity`` and overflows like ``1e999`` would be echoed into JSON that ``JSON.parse``
    refuses), and lone surrogates repaired to U+FFFD (``protocol.text``). Raises
    ``ProtocolError`` (``bad_request``) naming ``what`` was refused."""
    if not _depth_ok(text):
        raise ProtocolError("bad_request", f"{what} is JSON nested deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except _NonFinite as exc:
        raise ProtocolError("bad_request", f"{what} holds {exc}, which is not a finite number") from None
    except (ValueError, RecursionError):
        raise ProtocolError("bad_request", f"{what} is not valid JSON") from None
    if "\\u" in text:  # only an escape can carry a lone surrogate into decoded text
        return repair_strings(value)
    return value


def _load(data: str | bytes) -> dict[str, Any]:
    if isinstance(data, bytes):
        raise ProtocolError("bad_request", "binary frames are not part of the protocol; send JSON text")
    obj = loads_checked(data)
    if not isinstance(obj, dict):
        raise ProtocolError("bad_request", "a message must be a JSON object")
    return obj


def load_object(data: str | bytes) -> dict[str, Any]:
    """One frame as a JSON object, with the protocol's checks (text, depth). Raises
    ``ProtocolError``."""
    return _load(data)


_TOP_LEVEL_ID = re.compile(r'"id"\s*:\s*"([^"\\]{1,64})"')


def peek_request_id(data: str | bytes) -> str | None:
    """The request ``id`` of a frame without decoding it, if it appears among the top-level
    fields before any nested object or array (where clients put it); else None. Cheap:
    for answering a request refused before decoding (rate limits)."""
    if not isinstance(data, str):
        return None
    head = data[:512]
    nested = min((i for i in (head.find("{", 1), head.find("[")) if i >= 0), default=len(head))
    found = _TOP_LEVEL_ID.search(head, 0, nested)
    return found.group(1) if found else None


def decode_client(data: str | bytes) -> ClientMessage:
    """Decode one client frame. Raises ``ProtocolError`` (always ``bad_request``)."""
    try:
        obj = _load(data)
    except ProtocolError as exc:
        exc.request_id = peek_request_id(data)  # so the client can match the refusal
        raise
    raw_id = obj.get("id")
    request_id = raw_id if isinstance(raw_id, str) and 1 <= len(raw_id) <= 64 else None
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_request", "a message needs a string field 'type'", request_id)
    if kind not in CLIENT_MESSAGES:
        raise ProtocolError("bad_request", f"unknown message type {kind[:64]!r}", request_id)
    try:
        message: ClientMessage = converter.structure(obj, ClientMessage)  # type: ignore[arg-type]
    except Exception as exc:  # cattrs wraps every field error; report them readably
        raise ProtocolError("bad_request", f"{kind}: {_describe(exc)}", request_id) from None
    return message


def decode_server(data: str | bytes) -> ServerMessage:
    """Decode one server frame (for clients). Raises ``ProtocolError``."""
    obj = _load(data)
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in SERVER_MESSAGES:
        raise ProtocolError("bad_request", f"unknown server message type {kind!r}")
    try:
        message: ServerMessage = converter.structure(obj, ServerMessage)  # type: ignore[arg-type]
    except Exception as exc:
        raise ProtocolError("bad_request", f"{kind}: {_describe(exc)}") from None
    return message


def encode(message: ServerMessage | ClientMessage) -> str:
    """One frame of JSON text."""
    union = ServerMessage if type(message).TYPE in SERVER_MESSAGES else ClientMessage
    return dumps(converter.unstructure(message, union))


def dumps(value: Any) -> str:
    """Compact JSON text: orjson (about 15 times the standard library's speed), or the
    standard library for what orjson refuses (a lone surrogate, an integer over 64 bits)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def batch_message(batch: Batch) -> JobEvents:
    return JobEvents(
        job_id=batch.job_id,
        epoch=batch.epoch,
        from_seq=batch.from_seq,
        to_seq=batch.to_seq,
        events=list(batch.events),
    )


def error_message(
    request_id: str | None,
    code: str,
    message: str,
    retry_after_ms: int | None = None,
    *,
    job_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """An ``error`` frame; of ``extra`` (a ``BackstreamError``'s), the fields a ``gone``
    after a takeover carries (``valid_through``, ``content_length``, ``epoch``)."""
    stale = {k: v for k, v in (extra or {}).items() if k in _STALE_FIELDS and isinstance(v, int)}
    return encode(
        ErrorMessage(
            id=request_id, code=code, message=message, retry_after_ms=retry_after_ms, job_id=job_id, **stale
        )
    )


_STALE_FIELDS = frozenset({"valid_through", "content_length", "epoch"})


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ValueError | TypeError) and not isinstance(exc, BaseExceptionGroup):
        return str(exc)[:300]  # a validator's own words, e.g. "id must be 1 to 64 characters"
    leaves = getattr(exc, "exceptions", ())
    if leaves and all(
        isinstance(e, ValueError) and not hasattr(e, "__notes__") and not isinstance(e, BaseExceptionGroup)
        for e in leaves
    ):
        return "; ".join(str(e) for e in leaves)[:300]  # validators raised while building the class
    try:
        parts = cattrs.transform_error(exc)
    except Exception:
        parts = [str(exc)]
    text = "; ".join(parts) if parts else "invalid message"
    return text.replace("$.", "")[:300]
