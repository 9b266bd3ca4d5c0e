"""The sans-IO parts of the AI SDK endpoint: log -> UI message chunks, UI messages -> chat messages."""

from __future__ import annotations

import json

import pytest

from backstream.protocol.codec import ProtocolError
from backstream.protocol.events import (
    ApprovalEvent,
    ApprovalRequiredEvent,
    ErrorInfo,
    LogEvent,
    ReasoningEvent,
    RewindEvent,
    StatusEvent,
    TextEvent,
    ToolCallDeltaEvent,
    ToolCallEvent,
    ToolResultEvent,
)
from backstream.protocol.ui_chunks import (
    DELTA_FIELDS,
    DeltaCoalescer,
    UIChunkTranslator,
    approval_id,
    parse_approval_id,
)
from backstream.protocol.ui_messages import (
    AbortRequest,
    ResumeRequest,
    SendRequest,
    approval_answers,
    chat_messages,
    coalesce_ms_of,
    decode_request,
    job_key,
    job_options,
)


def translate(
    entries: list[LogEvent], approval_tools: frozenset[str] = frozenset()
) -> list[dict[str, object]]:
    translator = UIChunkTranslator(message_id="j1", job_id="j1", approval_tools=approval_tools)
    out = []
    for entry in entries:
        chunks = translator.feed(entry)
        out += chunks
        assert translator.emitted == len(out)
    return out


def test_a_tool_loop_with_an_approval_becomes_two_segments() -> None:
    log: list[LogEvent] = [
        StatusEvent(1, "running"),
        ReasoningEvent(2, "think"),
        TextEvent(3, "Let me "),
        TextEvent(4, "check."),
        ToolCallDeltaEvent(5, "c1", "rm", '{"p'),
        ToolCallDeltaEvent(6, "c1", "rm", '": 1}'),
        ToolCallEvent(7, "c1", "rm", '{"p": 1}'),
        ApprovalRequiredEvent(8, "c1", "rm", '{"p": 1}'),
        StatusEvent(9, "awaiting_approval"),
        ApprovalEvent(10, "c1", False),
        StatusEvent(11, "running"),
        ToolResultEvent(12, "c1", "rm", "the user declined to run this tool", True),
        TextEvent(13, "OK."),
        StatusEvent(14, "completed", finish_reason="stop"),
    ]
    approval = approval_id("j1", "c1")
    assert translate(log) == [
        {"type": "start", "messageId": "j1"},
        {"type": "start-step"},
        {"type": "reasoning-start", "id": "reasoning-1"},
        {"type": "reasoning-delta", "id": "reasoning-1", "delta": "think"},
        {"type": "reasoning-end", "id": "reasoning-1"},
        {"type": "text-start", "id": "text-2"},
        {"type": "text-delta", "id": "text-2", "delta": "Let me "},
        {"type": "text-delta", "id": "text-2", "delta": "check."},
        {"type": "text-end", "id": "text-2"},
        {"type": "tool-input-start", "toolCallId": "c1", "toolName": "rm"},
        {"type": "tool-input-delta", "toolCallId": "c1", "inputTextDelta": '{"p'},
        {"type": "tool-input-delta", "toolCallId": "c1", "inputTextDelta": '": 1}'},
        {"type": "tool-input-available", "toolCallId": "c1", "toolName": "rm", "input": {"p": 1}},
        {"type": "tool-approval-request", "approvalId": approval, "toolCallId": "c1"},
        {"type": "finish", "finishReason": "tool-calls"},
        {"type": "start", "messageId": "j1"},
        {"type": "tool-approval-response", "approvalId": approval, "approved": False},
        {"type": "tool-output-denied", "toolCallId": "c1"},
        {"type": "finish-step"},
        {"type": "start-step"},
        {"type": "text-start", "id": "text-3"},
        {"type": "text-delta", "id": "text-3", "delta": "OK."},
        {"type": "text-end", "id": "text-3"},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "stop"},
    ]
    translator = UIChunkTranslator(message_id="j1", job_id="j1")
    for entry in log[:9]:
        translator.feed(entry)
    assert translator.paused and translator.emitted == 15
    translator.feed(log[9])
    assert not translator.paused and translator.segment_starts == {"c1": 15}


def test_a_call_asking_approval_is_shown_when_asked_in_a_step_of_its_own() -> None:
    """The calls that run once the decisions are in stay in the step before the one asked,
    so the last step holds only decided or asked calls (what the AI SDK's helper needs)."""
    log: list[LogEvent] = [
        StatusEvent(1, "running"),
        ToolCallDeltaEvent(2, "c1", "calc", '{"e": "1+1"}'),
        ToolCallDeltaEvent(3, "d1", "rm", '{"p": 1}'),
        ToolCallDeltaEvent(4, "d2", "rm", '{"p": 2}'),
        ToolCallEvent(5, "c1", "calc", '{"e": "1+1"}'),
        ToolCallEvent(6, "d1", "rm", '{"p": 1}'),
        ToolCallEvent(7, "d2", "rm", '{"p": 2}'),
        ApprovalRequiredEvent(8, "d1", "rm", '{"p": 1}'),
        StatusEvent(9, "awaiting_approval"),
        ApprovalEvent(10, "d1", True),
        StatusEvent(11, "running"),
        ApprovalRequiredEvent(12, "d2", "rm", '{"p": 2}'),
        StatusEvent(13, "awaiting_approval"),
        ApprovalEvent(14, "d2", True),
        StatusEvent(15, "running"),
        ToolResultEvent(16, "c1", "calc", "2", False),
        ToolResultEvent(17, "d1", "rm", "ok", False),
        ToolResultEvent(18, "d2", "rm", "ok", False),
        StatusEvent(19, "completed", finish_reason="stop"),
    ]
    first, second = approval_id("j1", "d1"), approval_id("j1", "d2")
    assert translate(log, frozenset({"rm"})) == [
        {"type": "start", "messageId": "j1"},
        {"type": "start-step"},
        {"type": "tool-input-start", "toolCallId": "c1", "toolName": "calc"},
        {"type": "tool-input-delta", "toolCallId": "c1", "inputTextDelta": '{"e": "1+1"}'},
        {"type": "tool-input-available", "toolCallId": "c1", "toolName": "calc", "input": {"e": "1+1"}},
        {"type": "finish-step"},
        {"type": "start-step"},
        {"type": "tool-input-start", "toolCallId": "d1", "toolName": "rm"},
        {"type": "tool-input-available", "toolCallId": "d1", "toolName": "rm", "input": {"p": 1}},
        {"type": "tool-approval-request", "approvalId": first, "toolCallId": "d1"},
        {"type": "finish", "finishReason": "tool-calls"},
        {"type": "start", "messageId": "j1"},
        {"type": "tool-approval-response", "approvalId": first, "approved": True},
        {"type": "finish-step"},
        {"type": "start-step"},
        {"type": "tool-input-start", "toolCallId": "d2", "toolName": "rm"},
        {"type": "tool-input-available", "toolCallId": "d2", "toolName": "rm", "input": {"p": 2}},
        {"type": "tool-approval-request", "approvalId": second, "toolCallId": "d2"},
        {"type": "finish", "finishReason": "tool-calls"},
        {"type": "start", "messageId": "j1"},
        {"type": "tool-approval-response", "approvalId": second, "approved": True},
        {"type": "tool-output-available", "toolCallId": "c1", "output": "2"},
        {"type": "tool-output-available", "toolCallId": "d1", "output": "ok"},
        {"type": "tool-output-available", "toolCallId": "d2", "output": "ok"},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "stop"},
    ]


def test_a_call_of_an_approval_tool_that_never_asks_is_shown_before_its_result_or_the_end() -> None:
    """Past ``max_tool_calls`` (or not enabled) a call gets its result without asking; a job
    that ends first leaves its input as it stood."""
    answered = translate(
        [
            StatusEvent(1, "running"),
            ToolCallEvent(2, "d1", "rm", "{}"),
            ToolResultEvent(3, "d1", "rm", "over the limit", True),
        ],
        frozenset({"rm"}),
    )
    assert answered[2:] == [
        {"type": "tool-input-start", "toolCallId": "d1", "toolName": "rm"},
        {"type": "tool-input-available", "toolCallId": "d1", "toolName": "rm", "input": {}},
        {"type": "tool-output-error", "toolCallId": "d1", "errorText": "over the limit"},
    ]
    cut = translate(
        [StatusEvent(1, "running"), ToolCallDeltaEvent(2, "d1", "rm", '{"p'), StatusEvent(3, "aborted")],
        frozenset({"rm"}),
    )
    assert cut[2:] == [
        {"type": "tool-input-start", "toolCallId": "d1", "toolName": "rm"},
        {"type": "tool-input-delta", "toolCallId": "d1", "inputTextDelta": '{"p'},
        {"type": "abort", "reason": "the job was aborted"},
    ]


@pytest.mark.parametrize(
    ("terminal", "tail"),
    [
        (
            StatusEvent(3, "failed", error=ErrorInfo("upstream_http", "upstream answered HTTP 500")),
            [
                {"type": "finish-step"},
                {"type": "error", "errorText": "upstream answered HTTP 500 (upstream_http)"},
                {"type": "finish", "finishReason": "error"},
            ],
        ),
        (StatusEvent(3, "aborted"), [{"type": "abort", "reason": "the job was aborted"}]),
        (
            StatusEvent(3, "interrupted"),
            [{"type": "finish-step"}, {"type": "finish", "finishReason": "interrupted"}],
        ),
        (
            StatusEvent(3, "completed", finish_reason="length"),
            [{"type": "finish-step"}, {"type": "finish", "finishReason": "length"}],
        ),
    ],
)
def test_how_a_job_ends(terminal: StatusEvent, tail: list[dict[str, object]]) -> None:
    chunks = translate([StatusEvent(1, "running"), TextEvent(2, "Hi"), terminal])
    assert chunks[-len(tail) - 1] == {"type": "text-end", "id": "text-1"}
    assert chunks[-len(tail) :] == tail


def test_tool_outputs_and_bad_arguments() -> None:
    chunks = translate(
        [
            StatusEvent(1, "running"),
            ToolCallEvent(2, "a", "f", "{not json"),
            ToolCallEvent(3, "b", "g", ""),
            ToolResultEvent(4, "a", "f", "invalid JSON", True),
            ToolResultEvent(5, "b", "g", '{"rows": [1, 2]}', False),
        ]
    )
    assert chunks[3]["type"] == "tool-input-error" and chunks[3]["input"] == "{not json"
    assert chunks[5] == {"type": "tool-input-available", "toolCallId": "b", "toolName": "g", "input": {}}
    assert chunks[6] == {"type": "tool-output-error", "toolCallId": "a", "errorText": "invalid JSON"}
    assert chunks[7] == {"type": "tool-output-available", "toolCallId": "b", "output": {"rows": [1, 2]}}


def test_approval_ids_name_the_job_and_call() -> None:
    assert parse_approval_id(approval_id("j_1", "call/x")) == ("j_1", "call/x")
    assert parse_approval_id("nope") is None


def test_frames_are_decoded_strictly() -> None:
    send = decode_request(
        json.dumps(
            {
                "type": "send",
                "requestId": "r1",
                "id": "chat",
                "trigger": "submit-message",
                "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": "hi"}]}],
                "headers": {},
                "body": {"model": "m"},
                "metadata": None,
            }
        )
    )
    assert isinstance(send, SendRequest) and send.message_id is None and send.body == {"model": "m"}
    assert decode_request('{"type":"resume","requestId":"r","id":"c","lastSequence":4}') == ResumeRequest(
        "r", "c", 4, {}
    )
    assert decode_request('{"type":"abort","requestId":"r"}') == AbortRequest("r")
    for bad, request_id in [
        ('{"type":"send"}', None),
        ('{"type":"resume","requestId":"r","id":"c","lastSequence":-1}', "r"),
        ('{"type":"nope","requestId":"r"}', "r"),
        ('{"type":"send","requestId":"r","id":"c","trigger":"x","messages":[]}', "r"),
        ("[1]", None),
    ]:
        with pytest.raises(ProtocolError) as raised:
            decode_request(bad)
        assert raised.value.code == "bad_request" and raised.value.request_id == request_id


def test_ui_messages_become_chat_messages() -> None:
    messages = [
        {"id": "s", "role": "system", "parts": [{"type": "text", "text": "Be brief."}]},
        {
            "id": "u1",
            "role": "user",
            "parts": [
                {"type": "text", "text": "What is in "},
                {"type": "file", "mediaType": "image/png", "url": "data:image/png;base64,AAAA"},
            ],
        },
        {
            "id": "a1",
            "role": "assistant",
            "parts": [
                {"type": "step-start"},
                {"type": "reasoning", "text": "hmm"},
                {"type": "text", "text": "Looking."},
                {
                    "type": "tool-look",
                    "toolCallId": "c1",
                    "state": "output-available",
                    "input": {"x": 1},
                    "output": {"ok": True},
                },
                {
                    "type": "dynamic-tool",
                    "toolName": "rm",
                    "toolCallId": "c2",
                    "state": "output-denied",
                    "input": {},
                },
                {"type": "tool-late", "toolCallId": "c3", "state": "input-available", "input": {}},
                {"type": "step-start"},
                {"type": "text", "text": "A cat."},
            ],
        },
        {
            "id": "u2",
            "role": "user",
            "parts": [{"type": "text", "text": "Thanks"}, {"type": "data-x", "data": 1}],
        },
    ]
    assert chat_messages(messages) == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
        {
            "role": "assistant",
            "content": "Looking.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "look", "arguments": '{"x": 1}'}},
                {"id": "c2", "type": "function", "function": {"name": "rm", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"ok": true}'},
        {"role": "tool", "tool_call_id": "c2", "content": "the user declined to run this tool"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Thanks"},
    ]
    with pytest.raises(ProtocolError, match="data: URL"):
        chat_messages(
            [
                {
                    "role": "user",
                    "parts": [{"type": "file", "mediaType": "application/pdf", "url": "https://x"}],
                }
            ]
        )
    with pytest.raises(ProtocolError, match="no text"):
        chat_messages([{"role": "user", "parts": []}])


def test_keys_options_and_approval_answers() -> None:
    def send(messages: list[dict[str, object]]) -> SendRequest:
        return SendRequest("r", "chat", "submit-message", None, tuple(messages), {})

    one = send([{"id": "u1", "role": "user", "parts": []}])
    assert job_key(one) == job_key(send([{"id": "u1", "role": "user", "parts": []}]))
    assert job_key(one) != job_key(send([{"id": "u2", "role": "user", "parts": []}]))
    assert job_key(one) != job_key(one, regenerating="j_1")
    assert job_key(send([{"id": "a", "role": "assistant", "parts": []}])) is None
    assert job_options({}, "backstream/echo").model == "backstream/echo"
    with pytest.raises(ProtocolError, match="tools"):
        job_options({"tools": "calculate"}, "m")
    answered = {
        "type": "tool-rm",
        "toolCallId": "c1",
        "state": "approval-responded",
        "approval": {"id": "j/c1", "approved": True},
    }
    assert [a.approved for a in approval_answers([{"role": "assistant", "parts": [answered]}])] == [True]
    assert approval_answers([{"role": "user", "parts": [answered]}]) == []


def test_coalescer_merges_adjacent_deltas_of_one_part_and_keeps_order() -> None:
    coalescer = DeltaCoalescer(max_chars=10)
    given: list[dict[str, object]] = [
        {"type": "text-start", "id": "text-1"},
        {"type": "text-delta", "id": "text-1", "delta": "Hel"},
        {"type": "text-delta", "id": "text-1", "delta": "lo "},
        {"type": "text-delta", "id": "text-1", "delta": "world"},  # past max_chars: a new chunk
        {"type": "text-end", "id": "text-1"},
        {"type": "reasoning-delta", "id": "reasoning-2", "delta": "a"},
        {"type": "text-delta", "id": "text-3", "delta": "b"},  # another type: not merged
        {"type": "text-delta", "id": "text-4", "delta": "c"},  # another part: not merged
        {"type": "tool-input-delta", "toolCallId": "call_1", "inputTextDelta": '{"a"'},
        {"type": "tool-input-delta", "toolCallId": "call_1", "inputTextDelta": ": 1}"},
    ]
    copies = json.loads(json.dumps(given))
    out = []
    for chunk in given:
        out += coalescer.add(chunk)
        assert coalescer.pending is None or coalescer.pending["type"] in DELTA_FIELDS
    out += coalescer.flush()
    assert given == copies  # what the caller holds is not changed
    assert out == [
        {"type": "text-start", "id": "text-1"},
        {"type": "text-delta", "id": "text-1", "delta": "Hello "},
        {"type": "text-delta", "id": "text-1", "delta": "world"},
        {"type": "text-end", "id": "text-1"},
        {"type": "reasoning-delta", "id": "reasoning-2", "delta": "a"},
        {"type": "text-delta", "id": "text-3", "delta": "b"},
        {"type": "text-delta", "id": "text-4", "delta": "c"},
        {"type": "tool-input-delta", "toolCallId": "call_1", "inputTextDelta": '{"a": 1}'},
    ]
    assert coalescer.flush() == [] and coalescer.pending is None


def test_coalesce_ms_of_the_url() -> None:
    assert coalesce_ms_of("token=x", 0) == 0
    assert coalesce_ms_of("token=x", 50) == 50
    assert coalesce_ms_of("token=x&coalesce_ms=100", 50) == 100
    assert coalesce_ms_of("coalesce_ms=0", 50) == 0
    for bad in ("-5", "1.5", "x", "10001", "٣"):
        with pytest.raises(ProtocolError, match="coalesce_ms must be an integer"):
            coalesce_ms_of(f"coalesce_ms={bad}", 0)


def test_a_rewind_ends_the_text_part_and_says_what_to_drop() -> None:
    chunks = translate(
        [
            StatusEvent(1, "running"),
            TextEvent(2, "Hel"),
            RewindEvent(3, to_seq=1, content_length=0),
            TextEvent(4, "Hi"),
            StatusEvent(5, "completed"),
        ]
    )
    types = [c["type"] for c in chunks]
    rewind = types.index("data-backstream-rewind")
    assert types[rewind - 1] == "text-end"  # the withdrawn part is closed first
    assert chunks[rewind] == {"type": "data-backstream-rewind", "data": {"toSeq": 1, "contentLength": 0}}
    assert [c.get("delta") for c in chunks[rewind:] if c["type"] == "text-delta"] == ["Hi"]  # a new part
    assert types[rewind + 1] == "text-start"
