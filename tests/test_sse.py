"""The sans-IO SSE decoder and chat-stream assembler."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backstream.protocol.chat_stream import (
    ChatStreamAssembler,
    ChatStreamError,
    Finished,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallDone,
    UsageReport,
)
from backstream.protocol.sse import SSEDecoder, SSEError, SSEEvent


def decode(pieces: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    out = []
    for piece in pieces:
        out.extend(decoder.feed(piece))
    return out + decoder.close()


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_ends(eol: bytes) -> None:
    stream = b"data: one" + eol + eol + b": comment" + eol + b"data: two" + eol + eol
    assert [e.data for e in decode([stream])] == ["one", "two"]


def test_crlf_split_across_reads_is_one_line_end() -> None:
    assert [e.data for e in decode([b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n"])] == ["a", "b"]


def test_multiline_data_event_and_id() -> None:
    events = decode([b"event: update\nid: 7\ndata: line1\ndata:line2\n\n"])
    assert events == [SSEEvent(data="line1\nline2", event="update", id="7")]


def test_comments_and_unknown_fields_are_ignored() -> None:
    events = decode([b": OPENROUTER PROCESSING\n\nretry: 10\nfoo: bar\ndata: x\n\n"])
    assert [e.data for e in events] == ["x"]


def test_utf8_split_across_reads() -> None:
    payload = "data: héllo → 🌍\n\n".encode()
    for cut in range(1, len(payload)):
        assert [e.data for e in decode([payload[:cut], payload[cut:]])] == ["héllo → 🌍"]


def test_last_event_without_blank_line_is_kept() -> None:
    assert [e.data for e in decode([b"data: [DONE]"])] == ["[DONE]"]


def test_overlong_line_is_refused() -> None:
    decoder = SSEDecoder(max_line_chars=100)
    with pytest.raises(SSEError):
        decoder.feed(b"data: " + b"x" * 200)


@given(
    datas=st.lists(
        st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"])), max_size=8
    ),
    eol=st.sampled_from(["\n", "\r\n", "\r"]),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_any_chunking_decodes_the_same(datas: list[str], eol: str, cuts: list[int]) -> None:
    stream = "".join(f"data: {d}{eol}{eol}" for d in datas).encode()
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert [e.data for e in decode(pieces)] == datas


def test_assembler_content_reasoning_finish_usage() -> None:
    asm = ChatStreamAssembler()
    out = []
    out += asm.feed(json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}))
    out += asm.feed(
        json.dumps({"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}, "x": 1}], "y": 2})
    )
    out += asm.feed(json.dumps({"choices": [{"index": 0, "delta": {"content": "Hi"}}]}))
    out += asm.feed(json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    out += asm.feed(json.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}))
    out += asm.feed("[DONE]")
    assert out == [
        ReasoningDelta("hmm"),
        TextDelta("Hi"),
        Finished("stop"),
        UsageReport({"prompt_tokens": 1, "completion_tokens": 2}),
    ]
    assert asm.done and asm.finish_reason == "stop"


def test_tool_calls_assembled_by_index() -> None:
    asm = ChatStreamAssembler()
    chunks = [
        {"index": 1, "id": "call_b", "function": {"name": "calculate", "arguments": ""}},
        {"index": 0, "id": "call_a", "function": {"name": "clock_now", "arguments": "{"}},
        {"index": 1, "function": {"arguments": '{"expr": "1+'}},
        {"index": 0, "function": {"arguments": "}"}},
        {"index": 1, "function": {"arguments": '2"}'}},
    ]
    deltas = []
    for fragment in chunks:
        deltas += asm.feed(json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [fragment]}}]}))
    # Fragments are reported as they come, each with its call's id and name.
    assert deltas == [
        ToolCallDelta(0, "call_a", "clock_now", "{"),
        ToolCallDelta(1, "call_b", "calculate", '{"expr": "1+'),
        ToolCallDelta(0, "call_a", "clock_now", "}"),
        ToolCallDelta(1, "call_b", "calculate", '2"}'),
    ]
    out = asm.feed(json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}))
    assert out == [
        ToolCallDone(0, "call_a", "clock_now", "{}"),
        ToolCallDone(1, "call_b", "calculate", '{"expr": "1+2"}'),
        Finished("tool_calls"),
    ]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ('{"error": {"message": "rate limited upstream"}}', "upstream_error"),
        ('{"choices": [{"index": 0, "delta": {}, "finish_reason": "error"}]}', "upstream_error"),
        ("{oops", "upstream_protocol"),
        ("[1, 2]", "upstream_protocol"),
        ('{"choices": {"index": 0}}', "upstream_protocol"),
        ('{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": "x"}]}}]}', "upstream_protocol"),
    ],
)
def test_assembler_errors(data: str, code: str) -> None:
    with pytest.raises(ChatStreamError) as caught:
        ChatStreamAssembler().feed(data)
    assert caught.value.code == code


def test_tool_argument_buffer_is_bounded() -> None:
    asm = ChatStreamAssembler(max_argument_chars=10)
    fragment = {"index": 0, "id": "c", "function": {"name": "f", "arguments": "x" * 6}}
    asm.feed(json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [fragment]}}]}))
    with pytest.raises(ChatStreamError) as caught:
        asm.feed(json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [fragment]}}]}))
    assert caught.value.code == "output_limit"


_NO_IO_CHECK = """
import importlib, pkgutil, sys, types, pathlib
root = pathlib.Path(sys.argv[1])
# Load backstream.protocol without the parent package's own imports, as a client would.
package = types.ModuleType("backstream")
package.__path__ = [str(root)]
sys.modules["backstream"] = package
for module in pkgutil.iter_modules([str(root / "protocol")]):
    importlib.import_module("backstream.protocol." + module.name)
importlib.import_module("backstream.protocol")
io = sorted(m for m in sys.modules if m.split(".")[0] in ("trio", "httpx", "trio_websocket", "sniffio"))
assert not io, io
"""


def test_protocol_package_never_imports_io_libraries() -> None:
    root = pathlib.Path(__file__).parent.parent / "backstream"
    result = subprocess.run(
        [sys.executable, "-c", _NO_IO_CHECK, str(root)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_byte_order_mark_at_the_start_is_dropped_even_split() -> None:
    events = decode([b"\xef", b"\xbb\xbfdata: a\n\n", b"data: \xef\xbb\xbfb\n\n"])
    assert [e.data for e in events] == ["a", "\ufeffb"]  # only the stream's first one is a mark


@given(st.lists(st.text(max_size=4), max_size=6))
def test_assembled_text_is_always_encodable(pieces: list[str]) -> None:
    # Text with surrogates anywhere, split anywhere: what comes out encodes as UTF-8, and
    # text that was valid all along comes out unchanged.
    asm = ChatStreamAssembler()
    out: list[str] = []
    for piece in pieces:
        for event in asm.feed(json.dumps({"choices": [{"index": 0, "delta": {"content": piece}}]})):
            assert isinstance(event, TextDelta)
            out.append(event.text)
    for event in asm.feed(json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})):
        if isinstance(event, TextDelta):
            out.append(event.text)
    text = "".join(out)
    text.encode("utf-8")
    joined = "".join(pieces)
    try:
        joined.encode("utf-8")
    except UnicodeEncodeError:
        return
    assert text == joined


def test_truncated_turn_releases_no_tool_calls() -> None:
    asm = ChatStreamAssembler()
    fragment = {"index": 0, "id": "c", "function": {"name": "f", "arguments": '{"a": '}}
    asm.feed(json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [fragment]}}]}))
    out = asm.feed(json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}))
    assert out == [Finished("length")]


def test_tool_call_fragments_before_the_id_come_with_the_first_delta() -> None:
    asm = ChatStreamAssembler()
    early = asm.feed(
        json.dumps(
            {
                "choices": [
                    {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}}
                ]
            }
        )
    )
    assert early == []  # no id and name yet: nothing to attribute it to
    named = {"index": 0, "id": "c1", "function": {"name": "calculate", "arguments": ": 1}"}}
    assert asm.feed(json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [named]}}]})) == [
        ToolCallDelta(0, "c1", "calculate", '{"a": 1}')
    ]
    nameless = {"index": 1, "function": {"arguments": "{}"}}
    assert asm.feed(json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [nameless]}}]})) == []
    out = asm.feed(json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}))
    assert out[:2] == [ToolCallDone(0, "c1", "calculate", '{"a": 1}'), ToolCallDone(1, "call_1", "", "{}")]


def test_argument_fragments_are_reported_as_text_that_encodes() -> None:
    # A pair split across two fragments is reported joined; the reported fragments add up
    # to the finished call's arguments.
    asm = ChatStreamAssembler()
    out = []
    first = {"index": 0, "id": "c1", "function": {"name": "f", "arguments": '{"a": "\ud83d'}}
    second = {"index": 0, "function": {"arguments": '\ude00"}'}}
    for fragment in (first, second):
        out += asm.feed(json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [fragment]}}]}))
    out += asm.feed(json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}))
    deltas = "".join(o.arguments_delta for o in out if isinstance(o, ToolCallDelta))
    done = [o for o in out if isinstance(o, ToolCallDone)]
    assert deltas == done[0].arguments == '{"a": "\U0001f600"}'
    deltas.encode("utf-8")
