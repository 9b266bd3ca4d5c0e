"""The sans-IO core of Durable Streams: offsets, the append and producer rules, JSON mode,
requests checked from headers, cursors and capability tokens."""

from __future__ import annotations

import pytest

from backstream.protocol.stream_capability import (
    Capability,
    CapabilityError,
    mint_capability,
    verify_capability,
)
from backstream.protocol.streams_state import (
    AppendRequest,
    CreateRequest,
    StreamRefusal,
    StreamState,
    encode_json_append,
    format_offset,
    json_messages,
    parse_offset,
    plan_append,
    plan_create,
    same_config,
)
from backstream.protocol.streams_wire import (
    append_request,
    control_event,
    create_request,
    data_event,
    next_cursor,
    read_query,
)

KEY = b"k" * 32


def new_stream(content_type: str = "text/plain", **fields: object) -> StreamState:
    values: dict[str, object] = {"created_at": 0.0, "last_access": 0.0, **fields}
    return StreamState(incarnation="i", content_type=content_type, **values)  # type: ignore[arg-type]


def headers(**given: str) -> object:
    lowered = {name.replace("_", "-").lower(): value for name, value in given.items()}
    return lambda name: lowered.get(name.lower())


def test_offsets_order_byte_wise_as_positions_do() -> None:
    tokens = [format_offset(n) for n in (0, 5, 10, 999, 10**12)]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    assert [parse_offset(t) for t in tokens] == [0, 5, 10, 999, 10**12]
    assert parse_offset("1_0") > 10**15  # a first part above zero: beyond every stream
    for bad in ("", "_", "1", "a_1", "1_a", "1_2_3", "-1_0", "0_" + "9" * 17, "0,1", "0 1"):
        with pytest.raises(StreamRefusal) as refused:
            parse_offset(bad)
        assert refused.value.status == 400


def test_appends_advance_by_their_bytes_and_close() -> None:
    state = new_stream()
    plan = plan_append(state, AppendRequest(body=b"abc", content_type="text/plain"), 1.0)
    assert plan.status == 204 and plan.message == (3, b"abc")
    assert plan.state is not None and plan.state.tail == 3 and plan.state.last_access == 1.0
    closing = plan_append(plan.state, AppendRequest(body=b"de", content_type="text/plain", close=True), 2.0)
    assert closing.headers["Stream-Closed"] == "true" and closing.state is not None and closing.state.closed
    with pytest.raises(StreamRefusal) as refused:
        plan_append(closing.state, AppendRequest(body=b"x", content_type="text/plain"), 3.0)
    assert refused.value.status == 409 and refused.value.headers["Stream-Next-Offset"] == format_offset(5)
    again = plan_append(closing.state, AppendRequest(body=b"", content_type=None, close=True), 3.0)
    assert again.status == 204 and again.state is None  # closing twice is idempotent


def test_the_conflicts_come_in_the_protocols_order() -> None:
    state = new_stream(stream_seq="b")
    with pytest.raises(StreamRefusal) as wrong_type:
        plan_append(state, AppendRequest(body=b"x", content_type="application/json", stream_seq="a"), 0.0)
    assert wrong_type.value.status == 409 and "content type" in wrong_type.value.message
    with pytest.raises(StreamRefusal) as regressed:
        plan_append(
            state, AppendRequest(body=b"x", content_type="text/plain; charset=utf-8", stream_seq="b"), 0.0
        )
    assert "Stream-Seq" in regressed.value.message
    assert (
        plan_append(state, AppendRequest(body=b"x", content_type="text/plain", stream_seq="c"), 0.0).status
        == 204
    )


def test_idempotent_producers_fence_dedupe_and_find_gaps() -> None:
    state = new_stream()

    def send(epoch: int, seq: int, at: StreamState) -> tuple[int, StreamState, dict[str, str]]:
        request = AppendRequest(body=b"m", content_type="text/plain", producer=("p", epoch, seq))
        try:
            plan = plan_append(at, request, 0.0)
        except StreamRefusal as refusal:
            return refusal.status, at, refusal.headers
        return plan.status, plan.state or at, plan.headers

    status, state, _ = send(0, 0, state)
    assert status == 200
    status, state, _ = send(0, 1, state)
    assert status == 200 and state.tail == 2
    status, state, answer = send(0, 0, state)
    assert status == 204 and answer["Producer-Seq"] == "1" and state.tail == 2  # a retry: nothing written
    status, _, answer = send(0, 3, state)
    assert status == 409 and answer["Producer-Expected-Seq"] == "2" and answer["Producer-Received-Seq"] == "3"
    assert send(1, 1, state)[0] == 400  # a new epoch starts at 0
    status, state, _ = send(1, 0, state)
    assert status == 200
    status, _, answer = send(0, 2, state)
    assert status == 403 and answer["Producer-Epoch"] == "1"  # the zombie is fenced


def test_json_mode_flattens_one_level_and_refuses_what_is_not_json() -> None:
    assert encode_json_append(b'[{"a":1},[2,3]]', allow_empty=False) == b'{"a":1},[2,3],'
    assert encode_json_append(b' "x" ', allow_empty=False) == b'"x",'
    assert encode_json_append(b"[]", allow_empty=True) == b""
    for bad in (b"[]", b"[1,", b"NaN", b"\xff"):
        with pytest.raises(StreamRefusal):
            encode_json_append(bad, allow_empty=False)
    assert json_messages([b'{"a":1},', b"2,3,"]) == b'[{"a":1},2,3]'
    assert json_messages([]) == b"[]"


def test_a_fork_inherits_its_sources_type_offset_and_expiry() -> None:
    source = new_stream("application/json", tail=40, ttl_seconds=60)
    request = CreateRequest(content_type=None, forked_from="src", fork_offset=30, fork_offset_given=True)
    state, messages = plan_create(request, incarnation="f", now=5.0, source=source, forked_from="src")
    assert (state.content_type, state.fork_offset, state.tail, state.ttl_seconds) == (
        "application/json",
        30,
        30,
        60,
    )
    assert messages == [] and same_config(state, request, "src")
    with pytest.raises(StreamRefusal) as beyond:
        plan_create(
            CreateRequest(content_type=None, forked_from="src", fork_offset=41, fork_offset_given=True),
            incarnation="f",
            now=0.0,
            source=source,
            forked_from="src",
        )
    assert beyond.value.status == 400


def test_expiry_slides_with_access_or_is_absolute() -> None:
    assert not new_stream(ttl_seconds=10, last_access=100.0).expired(109.9)
    assert new_stream(ttl_seconds=10, last_access=100.0).expired(110.0)
    assert new_stream(expires_at="1970-01-01T00:01:40Z").expired(100.0)
    assert not new_stream(expires_at="1970-01-01T00:01:40Z").expired(99.0)
    state = new_stream(ttl_seconds=3, producers={}, closed_by=("p", 1, 2), closed=True)
    assert StreamState.from_json(state.to_json()) == state


def test_headers_are_checked_into_requests() -> None:
    made = create_request(headers(Content_Type="text/plain", Stream_TTL="60"), b"", resolve_source=str)
    assert (made.content_type, made.ttl_seconds) == ("text/plain", 60)
    for bad in ({"Stream_TTL": "+60"}, {"Stream_TTL": "1e3"}, {"Stream_Expires_At": "soon"},
                {"Stream_TTL": "1", "Stream_Expires_At": "2030-01-01T00:00:00Z"}, {"Stream_Fork_Sub_Offset": "0"}):  # fmt: skip
        with pytest.raises(StreamRefusal) as refused:
            create_request(headers(**bad), b"", resolve_source=str)
        assert refused.value.status == 400, bad
    assert append_request(headers(Stream_Closed="TRUE"), b"").close
    assert not append_request(headers(Stream_Closed="yes", Content_Type="text/plain"), b"x").close
    for bad_append in ({"Producer_Id": "p"}, {"Producer_Id": "", "Producer_Epoch": "0", "Producer_Seq": "0"},
                       {"Producer_Id": "p", "Producer_Epoch": "1.0", "Producer_Seq": "0"},
                       {"Producer_Id": "p", "Producer_Epoch": str(2**53), "Producer_Seq": "0"}):  # fmt: skip
        with pytest.raises(StreamRefusal):
            append_request(headers(Content_Type="text/plain", **bad_append), b"x")
    with pytest.raises(StreamRefusal):
        append_request(headers(), b"x")  # a body needs a Content-Type
    with pytest.raises(StreamRefusal):
        read_query({"offset": ["-1", "now"]})
    with pytest.raises(StreamRefusal):
        read_query({"live": ["sse"]})  # a live read needs an offset
    assert read_query({"offset": [format_offset(7)], "live": ["long-poll"]}).position == 7


def test_cursors_move_forward_even_when_a_client_is_ahead() -> None:
    now = 1_800_000_000.0
    current = next_cursor(now, None, 100)
    assert next_cursor(now, str(int(current) - 5), 100) == current
    ahead = int(next_cursor(now, current, 100))
    assert ahead > int(current)
    assert next_cursor(now, "garbage", 100) == current


def test_sse_events_frame_lines_and_encode_binary() -> None:
    assert data_event(b"a\nb", base64_encoded=False) == b"event: data\ndata:a\ndata:b\n\n"
    assert data_event(b"\x00\xff", base64_encoded=True) == b"event: data\ndata:AP8=\n\n"
    closed = control_event("0_1", closed=True, up_to_date=True, cursor="9")
    assert b'"streamClosed":true' in closed and b"streamCursor" not in closed


def test_capabilities_are_signed_bounded_and_expire() -> None:
    token = mint_capability(KEY, Capability("alice", "chat/", 1000.0, False))
    granted = verify_capability(KEY, token, 999.0)
    assert granted.user == "alice" and granted.covers("chat/1") and not granted.covers("other")
    assert not granted.writable
    for bad, now in ((token, 1000.0), (token[:-2] + "AA", 0.0), ("x.y", 0.0), (token, 0.0)):
        if bad == token and now == 0.0:
            assert verify_capability(KEY, bad, now).user == "alice"
            continue
        with pytest.raises(CapabilityError):
            verify_capability(KEY, bad, now)
    with pytest.raises(CapabilityError):
        verify_capability(b"another key" * 3, token, 0.0)
