"""Durable Streams (PROTOCOL.md v1 of durable-streams/durable-streams): one stream's state and
the decisions on it, sans-IO.

A stream is its metadata (``StreamState``) and its messages: ``(end, data)`` pairs in order,
``end`` the stream position just after the message. Positions count stored bytes from 0; an
offset token is a position written as ``0000000000000000_<16 digits>`` (opaque to clients,
ordered byte-wise as the protocol requires). A fork shares its source's offsets up to its fork
offset and continues from there with its own messages.

Every decision here is a pure function of the state, the request and the time, so each store
applies it atomically its own way (the memory store inline, SQLite in one transaction, Redis in
a WATCH/MULTI transaction); a refusal is a ``StreamRefusal`` carrying the spec's status and
headers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import attrs

from backstream.protocol.codec import ProtocolError, loads_checked

__all__ = [
    "CLOSED",
    "OFFSET",
    "PRODUCER_EPOCH",
    "PRODUCER_EXPECTED_SEQ",
    "PRODUCER_RECEIVED_SEQ",
    "PRODUCER_SEQ",
    "ZERO_OFFSET",
    "AppendPlan",
    "AppendRequest",
    "CreateRequest",
    "Message",
    "Producer",
    "StreamRefusal",
    "StreamState",
    "encode_json_append",
    "format_offset",
    "is_json",
    "json_messages",
    "normalize_type",
    "parse_expiry",
    "parse_offset",
    "plan_append",
    "plan_create",
    "same_config",
]

OFFSET = "Stream-Next-Offset"
CLOSED = "Stream-Closed"
PRODUCER_EPOCH = "Producer-Epoch"
PRODUCER_SEQ = "Producer-Seq"
PRODUCER_EXPECTED_SEQ = "Producer-Expected-Seq"
PRODUCER_RECEIVED_SEQ = "Producer-Received-Seq"

MAX_PRODUCERS = 1024
"""Producer states one stream keeps; past it the least recently used is forgotten (it then
counts as new: it may write again from seq 0, as after the spec's state expiry)."""
PRODUCER_STATE_TTL = 7 * 24 * 3600.0
_DIGITS = 16

Message = tuple[int, bytes]
"""``(end position, stored bytes)``."""


class StreamRefusal(Exception):
    """A request the protocol answers with ``status`` (not 2xx) and ``headers``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def format_offset(position: int) -> str:
    return f"{0:0{_DIGITS}d}_{position:0{_DIGITS}d}"


ZERO_OFFSET = format_offset(0)
_BEYOND = 10**_DIGITS  # an offset no stream reaches (a client-made token with a high first part)


def parse_offset(token: str) -> int:
    """The position of an offset token; ``StreamRefusal(400)`` unless it is ``DIGITS_DIGITS``."""
    high, sep, low = token.partition("_")
    if not sep or not _is_digits(high) or not _is_digits(low) or len(high) > 20 or len(low) > _DIGITS:
        raise StreamRefusal(400, "invalid offset")
    return _BEYOND if int(high) else int(low)


def _is_digits(text: str) -> bool:
    return bool(text) and text.isascii() and text.isdigit()


def normalize_type(content_type: str | None) -> str:
    """The media type alone, lower case: ``application/json; charset=utf-8`` → ``application/json``."""
    return (content_type or "").split(";")[0].strip().lower()


def is_json(content_type: str | None) -> bool:
    return normalize_type(content_type) == "application/json"


@attrs.frozen
class Producer:
    epoch: int
    last_seq: int
    updated_at: float


@attrs.frozen(kw_only=True)
class StreamState:
    incarnation: str
    """Random at creation: ETags of a stream re-created at the same URL differ."""
    content_type: str
    created_at: float
    last_access: float
    tail: int = 0
    ttl_seconds: int | None = None
    expires_at: str | None = None
    closed: bool = False
    closed_by: tuple[str, int, int] | None = None
    stream_seq: str | None = None
    producers: Mapping[str, Producer] = attrs.field(factory=dict)
    forked_from: str | None = None
    fork_offset: int | None = None
    fork_sub_offset: int = 0
    ref_count: int = 0
    soft_deleted: bool = False
    stored_bytes: int = 0

    def expired(self, now: float) -> bool:
        deadline = self.deadline
        return deadline is not None and now >= deadline

    @property
    def deadline(self) -> float | None:
        """When the stream expires unless read or written (Unix time); None: never."""
        ends = []
        if self.expires_at is not None:
            ends.append(parse_expiry(self.expires_at) or 0.0)  # unreadable: expired (fail closed)
        if self.ttl_seconds is not None:
            ends.append(self.last_access + self.ttl_seconds)
        return min(ends) if ends else None

    @property
    def own_start(self) -> int:
        """The first position of the stream's own messages (a fork's offset, else 0)."""
        return self.fork_offset or 0

    def to_json(self) -> str:
        data = attrs.asdict(self, recurse=False)
        data["producers"] = {key: attrs.astuple(value) for key, value in self.producers.items()}
        data["closed_by"] = list(self.closed_by) if self.closed_by else None
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> StreamState:
        data: dict[str, Any] = json.loads(text)
        data["producers"] = {key: Producer(*value) for key, value in data["producers"].items()}
        closed_by = data["closed_by"]
        data["closed_by"] = (str(closed_by[0]), int(closed_by[1]), int(closed_by[2])) if closed_by else None
        return cls(**data)


def parse_expiry(text: str) -> float | None:
    """An RFC 3339 time as a Unix time; None if it is not one."""
    try:
        when = datetime.fromisoformat(text.strip().replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return when.timestamp()


@attrs.frozen(kw_only=True)
class CreateRequest:
    content_type: str | None
    """As sent (None if absent or not a media type: a fork inherits its source's)."""
    ttl_seconds: int | None = None
    expires_at: str | None = None
    closed: bool = False
    body: bytes = b""
    forked_from: str | None = None
    fork_offset: int | None = None
    fork_offset_given: bool = False
    fork_sub_offset: int = 0


def same_config(state: StreamState, request: CreateRequest, forked_from: str | None) -> bool:
    """Whether a PUT on an existing stream is idempotent (200) rather than a conflict (409)."""
    wanted_type = normalize_type(request.content_type) or (
        normalize_type(state.content_type) if forked_from else "application/octet-stream"
    )
    # A fork that asks for no expiry inherits its source's: asking again the same way matches.
    inherited = forked_from is not None and request.ttl_seconds is None and request.expires_at is None
    return (
        wanted_type == (normalize_type(state.content_type) or "application/octet-stream")
        and (inherited or request.ttl_seconds == state.ttl_seconds)
        and (inherited or request.expires_at == state.expires_at)
        and request.closed == state.closed
        and forked_from == state.forked_from
        and (not request.fork_offset_given or request.fork_offset == state.fork_offset)
        and request.fork_sub_offset == state.fork_sub_offset
    )


def plan_create(
    request: CreateRequest,
    *,
    incarnation: str,
    now: float,
    source: StreamState | None = None,
    forked_from: str | None = None,
    sub_offset_prefix: bytes = b"",
) -> tuple[StreamState, list[Message]]:
    """A new stream and its first messages. ``source`` (already checked to exist and hold a
    reference taken for this fork) gives a fork its content type, offset and expiry."""
    content_type = request.content_type or "application/octet-stream"
    ttl, expires_at = request.ttl_seconds, request.expires_at
    start = 0
    if source is not None:
        if request.content_type and normalize_type(request.content_type) != normalize_type(
            source.content_type
        ):
            raise StreamRefusal(409, "the content type differs from the source stream's")
        content_type = request.content_type or source.content_type
        start = source.tail if request.fork_offset is None else request.fork_offset
        if start > source.tail:
            raise StreamRefusal(400, "the fork offset is beyond the source stream's tail")
        if ttl is None and expires_at is None:
            ttl, expires_at = source.ttl_seconds, source.expires_at
    messages: list[Message] = []
    tail = start
    if sub_offset_prefix:
        tail += len(sub_offset_prefix)
        messages.append((tail, sub_offset_prefix))
    if request.body:
        data = encode_json_append(request.body, allow_empty=True) if is_json(content_type) else request.body
        if data:
            tail += len(data)
            messages.append((tail, data))
    state = StreamState(
        incarnation=incarnation,
        content_type=content_type,
        created_at=now,
        last_access=now,
        tail=tail,
        ttl_seconds=ttl,
        expires_at=expires_at,
        closed=request.closed,
        forked_from=forked_from,
        fork_offset=start if source is not None else None,
        fork_sub_offset=request.fork_sub_offset,
        stored_bytes=sum(len(data) for _, data in messages),
    )
    return state, messages


def encode_json_append(body: bytes, *, allow_empty: bool) -> bytes:
    """A JSON body as stored: its values (one array level flattened) each followed by a comma.
    ``StreamRefusal(400)`` for text that is not JSON, or an empty array where not allowed."""
    try:
        value = loads_checked(body.decode("utf-8"), what="the body")
    except (UnicodeDecodeError, ProtocolError):
        raise StreamRefusal(400, "the body is not valid JSON") from None
    values = value if isinstance(value, list) else [value]
    if not values:
        if allow_empty:
            return b""
        raise StreamRefusal(400, "an empty JSON array appends nothing")
    return b"".join(_compact(item).encode() + b"," for item in values)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def json_messages(stored: list[bytes]) -> bytes:
    """Stored JSON messages as the array a read returns."""
    return b"[" + b"".join(stored).rstrip(b",") + b"]"


@attrs.frozen(kw_only=True)
class AppendRequest:
    body: bytes
    content_type: str | None
    close: bool = False
    stream_seq: str | None = None
    producer: tuple[str, int, int] | None = None
    """``(Producer-Id, Producer-Epoch, Producer-Seq)``, checked well-formed."""


@attrs.frozen
class AppendPlan:
    """What an append does: the new state and message to store (None: nothing changes), and
    the reply's status and headers."""

    state: StreamState | None
    message: Message | None
    status: int
    headers: dict[str, str]


def plan_append(state: StreamState, request: AppendRequest, now: float) -> AppendPlan:
    """The protocol's append, close and idempotent-producer rules (sections 5.2, 5.2.1, 5.3),
    checked in its order of precedence: closed, content type, producer, ``Stream-Seq``."""
    if state.soft_deleted:
        raise StreamRefusal(410, "the stream was deleted")
    producer = request.producer
    if state.closed:
        return _append_to_closed(state, request)
    if not request.body:
        return _close_only(state, producer, now)
    if normalize_type(request.content_type) != normalize_type(state.content_type):
        raise StreamRefusal(409, "the content type differs from the stream's")
    producers, refusal = _admit_producer(state, producer, now)
    if refusal is not None:
        return refusal
    if producer is not None:
        producers = _bounded(producers, now)
    seq, last_seq = request.stream_seq, state.stream_seq
    if seq is not None and last_seq is not None and seq.encode() <= last_seq.encode():
        raise StreamRefusal(409, "Stream-Seq must increase")
    data = (
        encode_json_append(request.body, allow_empty=False) if is_json(state.content_type) else request.body
    )
    tail = state.tail + len(data)
    new_state = attrs.evolve(
        state,
        tail=tail,
        last_access=now,
        producers=producers,
        stream_seq=request.stream_seq if request.stream_seq is not None else state.stream_seq,
        closed=request.close,
        closed_by=producer if request.close else None,
        stored_bytes=state.stored_bytes + len(data),
    )
    headers = {OFFSET: format_offset(tail)}
    if producer is not None:
        headers |= _producer_headers(producer)
    if request.close:
        headers[CLOSED] = "true"
    return AppendPlan(new_state, (tail, data), 200 if producer is not None else 204, headers)


def _append_to_closed(state: StreamState, request: AppendRequest) -> AppendPlan:
    producer = request.producer
    closed_headers = {OFFSET: format_offset(state.tail), CLOSED: "true"}
    if producer is not None and state.closed_by == producer:
        headers = closed_headers | _producer_headers(producer)
        return AppendPlan(None, None, 204, headers)
    if not request.body and request.close and producer is None:
        return AppendPlan(None, None, 204, closed_headers)
    raise StreamRefusal(409, "the stream is closed", closed_headers)


def _close_only(state: StreamState, producer: tuple[str, int, int] | None, now: float) -> AppendPlan:
    headers = {OFFSET: format_offset(state.tail), CLOSED: "true"}
    producers, refusal = _admit_producer(state, producer, now)
    if refusal is not None:
        return refusal
    if producer is not None:
        headers |= _producer_headers(producer)
    new_state = attrs.evolve(
        state, closed=True, closed_by=producer, producers=_bounded(producers, now), last_access=now
    )
    return AppendPlan(new_state, None, 204, headers)


def _admit_producer(
    state: StreamState, producer: tuple[str, int, int] | None, now: float
) -> tuple[dict[str, Producer], AppendPlan | None]:
    """The stream's producers with ``producer``'s request taken (unbounded yet), or the
    refusal or duplicate's plan that answers the request instead."""
    producers = dict(state.producers)
    if producer is not None:
        refusal = _check_producer(state, producer, now)
        if refusal is not None:
            return producers, refusal
        producers[producer[0]] = Producer(producer[1], producer[2], now)
    return producers, None


def _producer_headers(producer: tuple[str, int, int]) -> dict[str, str]:
    return {PRODUCER_EPOCH: str(producer[1]), PRODUCER_SEQ: str(producer[2])}


def _check_producer(state: StreamState, producer: tuple[str, int, int], now: float) -> AppendPlan | None:
    """None if the producer's request is the next one; else the refusal or the duplicate's
    204 (section 5.2.1's validation)."""
    _, epoch, seq = producer
    known = state.producers.get(producer[0])
    if known is not None and now - known.updated_at > PRODUCER_STATE_TTL:
        known = None
    if known is None:
        if seq != 0:
            raise StreamRefusal(
                409, "producer sequence gap", {PRODUCER_EXPECTED_SEQ: "0", PRODUCER_RECEIVED_SEQ: str(seq)}
            )
        return None
    if epoch < known.epoch:
        raise StreamRefusal(403, "stale producer epoch", {PRODUCER_EPOCH: str(known.epoch)})
    if epoch > known.epoch:
        if seq != 0:
            raise StreamRefusal(400, "a new producer epoch must start at sequence 0")
        return None
    if seq <= known.last_seq:
        headers = {PRODUCER_EPOCH: str(epoch), PRODUCER_SEQ: str(known.last_seq)}
        return AppendPlan(None, None, 204, headers)
    if seq == known.last_seq + 1:
        return None
    raise StreamRefusal(
        409,
        "producer sequence gap",
        {PRODUCER_EXPECTED_SEQ: str(known.last_seq + 1), PRODUCER_RECEIVED_SEQ: str(seq)},
    )


def _bounded(producers: dict[str, Producer], now: float) -> dict[str, Producer]:
    live = {key: value for key, value in producers.items() if now - value.updated_at <= PRODUCER_STATE_TTL}
    if len(live) <= MAX_PRODUCERS:
        return live
    newest = sorted(live.items(), key=lambda item: item[1].updated_at)[-MAX_PRODUCERS:]
    return dict(newest)
