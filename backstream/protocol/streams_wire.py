"""Durable Streams on the wire, sans-IO: request headers checked into requests, the reply
headers of reads (ETag, cache, cursor), and SSE framing (PROTOCOL.md sections 5, 8, 10)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable

import attrs

from backstream.protocol.streams_state import (
    CLOSED,
    OFFSET,
    AppendRequest,
    CreateRequest,
    StreamRefusal,
    normalize_type,
    parse_expiry,
    parse_offset,
)

__all__ = [
    "ALLOWED_HEADERS",
    "CURSOR",
    "EXPOSED_HEADERS",
    "SECURITY_HEADERS",
    "SSE_ENCODING",
    "UP_TO_DATE",
    "ReadQuery",
    "append_request",
    "closed_headers",
    "control_event",
    "create_request",
    "data_event",
    "job_stream_path",
    "next_cursor",
    "producer_headers",
    "read_etag",
    "read_query",
    "sse_base64",
]

CURSOR = "Stream-Cursor"
UP_TO_DATE = "Stream-Up-To-Date"
SSE_ENCODING = "stream-sse-data-encoding"
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "cross-origin-resource-policy": "cross-origin"}
"""On every reply (section 12.7)."""
EXPOSED_HEADERS = (
    "Stream-Next-Offset, Stream-Cursor, Stream-Up-To-Date, Stream-Closed, Producer-Epoch, "
    "Producer-Seq, Producer-Expected-Seq, Producer-Received-Seq, ETag, Content-Type, Location, "
    "stream-sse-data-encoding"
)
ALLOWED_HEADERS = (
    "authorization, content-type, if-none-match, stream-seq, stream-ttl, stream-expires-at, "
    "stream-closed, producer-id, producer-epoch, producer-seq, stream-forked-from, stream-fork-offset, "
    "stream-fork-sub-offset"
)

_UNSIGNED = re.compile(r"0|[1-9][0-9]*")
_DIGITS = re.compile(r"[0-9]+")
_MEDIA_TYPE = re.compile(r"[\w.+-]+/[\w.+-]+")
_MAX_SAFE = 2**53 - 1
CURSOR_EPOCH = 1728432000.0  # 2024-10-09T00:00:00Z, the protocol's default
CURSOR_INTERVAL = 20.0

Headers = Callable[[str], str | None]
"""A request's header by name (any case); None if absent."""


def job_stream_path(job_id: str) -> str:
    """Where a job's durable stream is, on the HTTP port: read-only, JSON mode, the job's AI SDK
    UI message chunks."""
    return f"/v1/streams/jobs/{job_id}"


def _flag(value: str | None) -> bool:
    return value is not None and value.strip().lower() == "true"


def create_request(header: Headers, body: bytes, *, resolve_source: Callable[[str], str]) -> CreateRequest:
    """A PUT's headers checked (section 5.1, 4.2); ``resolve_source`` turns a
    ``Stream-Forked-From`` path into the source's name."""
    forked_from = header("stream-forked-from")
    content_type = header("content-type")
    if content_type is None or not _MEDIA_TYPE.match(content_type.strip()):
        content_type = None if forked_from else "application/octet-stream"
    ttl_text, expires_at = header("stream-ttl"), header("stream-expires-at")
    if ttl_text is not None and expires_at is not None:
        raise StreamRefusal(400, "give Stream-TTL or Stream-Expires-At, not both")
    ttl = None
    if ttl_text is not None:
        if not _UNSIGNED.fullmatch(ttl_text) or int(ttl_text) > _MAX_SAFE:
            raise StreamRefusal(400, "Stream-TTL must be a non-negative integer of seconds")
        ttl = int(ttl_text)
    if expires_at is not None and parse_expiry(expires_at) is None:
        raise StreamRefusal(400, "Stream-Expires-At must be an RFC 3339 time")
    offset_text, sub_text = header("stream-fork-offset"), header("stream-fork-sub-offset")
    if (offset_text is not None or sub_text is not None) and not forked_from:
        raise StreamRefusal(400, "Stream-Fork-Offset and Stream-Fork-Sub-Offset need Stream-Forked-From")
    sub_offset = 0
    if sub_text is not None:
        if not _UNSIGNED.fullmatch(sub_text) or int(sub_text) > _MAX_SAFE:
            raise StreamRefusal(400, "Stream-Fork-Sub-Offset must be a non-negative integer")
        sub_offset = int(sub_text)
    return CreateRequest(
        content_type=content_type,
        ttl_seconds=ttl,
        expires_at=expires_at,
        closed=_flag(header("stream-closed")),
        body=body,
        forked_from=resolve_source(forked_from) if forked_from else None,
        fork_offset=parse_offset(offset_text) if offset_text is not None else None,
        fork_offset_given=offset_text is not None,
        fork_sub_offset=sub_offset,
    )


def producer_headers(header: Headers) -> tuple[str, int, int] | None:
    """``Producer-Id/-Epoch/-Seq``: all three or none (section 5.2.1)."""
    values = [header("producer-id"), header("producer-epoch"), header("producer-seq")]
    if all(value is None for value in values):
        return None
    producer_id, epoch, seq = values
    if producer_id is None or epoch is None or seq is None:
        raise StreamRefusal(400, "Producer-Id, Producer-Epoch and Producer-Seq go together")
    if not producer_id:
        raise StreamRefusal(400, "Producer-Id must not be empty")
    for name, value in (("Producer-Epoch", epoch), ("Producer-Seq", seq)):
        if not _DIGITS.fullmatch(value) or int(value) > _MAX_SAFE:
            raise StreamRefusal(400, f"{name} must be a non-negative integer up to 2^53-1")
    return producer_id, int(epoch), int(seq)


def append_request(header: Headers, body: bytes) -> AppendRequest:
    """A POST's headers checked (sections 5.2, 5.3)."""
    producer = producer_headers(header)
    close = _flag(header("stream-closed"))
    if not body and not close:
        raise StreamRefusal(400, "an append needs a body (or Stream-Closed: true)")
    content_type = header("content-type")
    if body and not content_type:
        raise StreamRefusal(400, "an append with a body needs a Content-Type")
    return AppendRequest(
        body=body, content_type=content_type, close=close, stream_seq=header("stream-seq"), producer=producer
    )


@attrs.frozen
class ReadQuery:
    offset: str | None
    """``-1`` when absent; ``now``; or an offset token, checked."""
    position: int | None
    """The offset token's position (None for the sentinels)."""
    live: str | None
    cursor: str | None


def read_query(params: dict[str, list[str]]) -> ReadQuery:
    offsets = params.get("offset", [])
    if len(offsets) > 1:
        raise StreamRefusal(400, "give one offset")
    offset = offsets[0] if offsets else None
    live = _last(params, "live")
    if live not in (None, "long-poll", "sse"):
        raise StreamRefusal(400, "live must be long-poll or sse")
    if live is not None and offset is None:
        raise StreamRefusal(400, "a live read needs an offset")
    position = None
    if offset == "":
        raise StreamRefusal(400, "empty offset")
    if offset is not None and offset not in ("-1", "now"):
        position = parse_offset(offset)
    return ReadQuery(offset, position, live, _last(params, "cursor"))


def _last(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    return values[-1] if values else None


def next_cursor(now: float, client_cursor: str | None, jitter_s: int) -> str:
    """Section 10.1: the time interval's number, or more than the client's cursor when that is
    not behind (``jitter_s``: a random 1..3600 seconds)."""
    current = int((now - CURSOR_EPOCH) // CURSOR_INTERVAL)
    if client_cursor is None or not _DIGITS.fullmatch(client_cursor) or len(client_cursor) > 18:
        return str(current)
    given = int(client_cursor)
    if given < current:
        return str(current)
    return str(given + max(1, -(-jitter_s // int(CURSOR_INTERVAL))))


def read_etag(incarnation: str, start: str, end: str, closed: bool) -> str:
    """Varies with the range and with closure (section 10.1)."""
    return f'"{incarnation}:{start}:{end}{":c" if closed else ""}"'


def sse_base64(content_type: str) -> bool:
    """Whether SSE data events of this stream are base64 (section 5.8)."""
    media = normalize_type(content_type)
    return not (media.startswith("text/") or media == "application/json")


def _data_lines(payload: str) -> bytes:
    lines = re.split(r"\r\n|\r|\n", payload)
    return ("".join(f"data:{line}\n" for line in lines) + "\n").encode()


def data_event(data: bytes, *, base64_encoded: bool) -> bytes:
    payload = base64.b64encode(data).decode() if base64_encoded else data.decode("utf-8", "replace")
    return b"event: data\n" + _data_lines(payload)


def control_event(next_offset: str, *, closed: bool, up_to_date: bool, cursor: str) -> bytes:
    """The control event after data (section 5.8): no cursor once closed."""
    body: dict[str, object] = {"streamNextOffset": next_offset}
    if closed:
        body["streamClosed"] = True
    else:
        body["streamCursor"] = cursor
        if up_to_date:
            body["upToDate"] = True
    return b"event: control\n" + _data_lines(json.dumps(body, separators=(",", ":")))


def closed_headers(tail: str) -> dict[str, str]:
    return {OFFSET: tail, CLOSED: "true", UP_TO_DATE: "true"}
