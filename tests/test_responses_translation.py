"""The log -> Responses events translation: shapes the openai package validates, and numbering
that depends on the log only (not on how reads were batched, nor on where they were read)."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from backstream import Config, open_runtime
from backstream.protocol.events import (
    ErrorInfo,
    LogEvent,
    ReasoningEvent,
    RewindEvent,
    StatusEvent,
    TextEvent,
    ToolCallEvent,
    ToolResultEvent,
)
from backstream.protocol.responses import ResponseSource, ResponsesTranslator, parse_create, response_status
from backstream.runtime.stores.sqlite import SqliteStore

SOURCE = ResponseSource(
    response_id="job_01ABC",
    created_at=1_700_000_000.5,
    model="m",
    params={"temperature": 0.5},
    annotations={"metadata": {"k": "v"}, "background": True},
    thread_id="t1",
)


def a_log(status: StatusEvent | None = None) -> list[LogEvent]:
    entries: list[LogEvent] = [
        ReasoningEvent(1, "think"),
        ReasoningEvent(2, "ing"),
        ToolCallEvent(3, "c1", "calculate", '{"expression":"1+1"}'),
        ToolResultEvent(4, "c1", "calculate", "2", False),
        TextEvent(5, "one "),
        TextEvent(6, "plus one "),
        TextEvent(7, "is two"),
    ]
    entries.append(
        status
        or StatusEvent(
            8,
            "completed",
            finish_reason="stop",
            usage={"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5},
        )
    )
    return entries


def translate(entries: list[LogEvent]) -> list[dict[str, Any]]:
    translator = ResponsesTranslator(SOURCE)
    return translator.start() + translator.feed_all(entries)


def test_events_validate_as_the_sdk_types() -> None:
    adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(ResponseStreamEvent)
    evs = translate(a_log())
    for event in evs:
        adapter.validate_python(event)  # raises on a wrong shape
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    final = Response.model_validate(evs[-1]["response"])
    assert final.status == "completed" and final.output_text == "one plus one is two"
    assert [item.type for item in final.output] == [
        "reasoning",
        "function_call",
        "function_call_output",
        "message",
    ]
    assert final.usage is not None and final.usage.total_tokens == 5
    kinds = [e["type"] for e in evs]
    assert kinds.count("response.output_text.delta") == 3  # one per text entry
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 4


def test_a_rewind_closes_what_it_withdrew_and_the_response_leaves_it_out() -> None:
    """A turn run again after a crash (``restart``): the deltas sent stay sent, but the item
    they went into ends at once with what stands of it, and the final response holds only
    the text that stands, as ``job.get`` does."""
    adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(ResponseStreamEvent)
    entries: list[LogEvent] = [
        StatusEvent(1, "running"),
        TextEvent(2, "Kept. "),
        ToolCallEvent(3, "c1", "calculate", '{"expression":"1+1"}'),
        ToolResultEvent(4, "c1", "calculate", "2", False),
        TextEvent(5, "Withdr"),
        TextEvent(6, "awn"),
        RewindEvent(7, to_seq=4, content_length=6),
        TextEvent(8, "The answer is 2."),
        StatusEvent(9, "completed", finish_reason="stop"),
    ]
    evs = translate(entries)
    for event in evs:
        adapter.validate_python(event)
    closed = [e for e in evs if e["type"] == "response.output_item.done" and e["item"]["type"] == "message"]
    assert [(e["output_index"], e["item"]["status"]) for e in closed] == [
        (0, "completed"),
        (3, "incomplete"),
        (4, "completed"),
    ]
    assert closed[1]["item"]["content"][0]["text"] == ""  # nothing of it stands
    final = Response.model_validate(evs[-1]["response"])
    assert final.output_text == "Kept. The answer is 2."
    assert [item.type for item in final.output] == [
        "message",
        "function_call",
        "function_call_output",
        "message",
    ]


def test_a_rewind_into_an_open_item_keeps_its_pieces_up_to_the_cut() -> None:
    entries: list[LogEvent] = [
        TextEvent(1, "one "),
        TextEvent(2, "two "),
        RewindEvent(3, to_seq=1, content_length=4),
        TextEvent(4, "three"),
        StatusEvent(5, "completed", finish_reason="stop"),
    ]
    evs = translate(entries)
    done = [e for e in evs if e["type"] == "response.output_text.done"]
    assert [e["text"] for e in done] == ["one ", "three"]
    assert Response.model_validate(evs[-1]["response"]).output_text == "one three"


def test_item_ids_and_numbers_are_a_function_of_the_log() -> None:
    assert translate(a_log()) == translate(a_log())
    ids = [e["item"]["id"] for e in translate(a_log()) if e["type"] == "response.output_item.added"]
    assert ids == ["rs_01ABC_1", "fc_01ABC_3", "fco_01ABC_4", "msg_01ABC_5"]


def test_a_gap_in_the_log_is_refused() -> None:
    translator = ResponsesTranslator(SOURCE)
    translator.feed(TextEvent(1, "a"))
    with pytest.raises(ValueError, match="contiguous"):
        translator.feed(TextEvent(3, "c"))


@pytest.mark.parametrize(
    ("status", "expected", "event"),
    [
        (StatusEvent(8, "aborted"), "cancelled", "response.incomplete"),
        (StatusEvent(8, "interrupted"), "incomplete", "response.incomplete"),
        (
            StatusEvent(8, "failed", error=ErrorInfo("upstream_timeout", "no byte")),
            "failed",
            "response.failed",
        ),
        (
            StatusEvent(8, "failed", error=ErrorInfo("output_limit", "too long")),
            "incomplete",
            "response.incomplete",
        ),
        (StatusEvent(8, "completed", finish_reason="length"), "incomplete", "response.incomplete"),
    ],
)
def test_terminal_statuses(status: StatusEvent, expected: str, event: str) -> None:
    evs = translate(a_log(status))
    assert evs[-1]["type"] == event and evs[-1]["response"]["status"] == expected
    assert response_status(status.status, status.error, status.finish_reason) == expected
    message = evs[-1]["response"]["output"][-1]
    assert message["status"] == "incomplete" and message["content"][0]["text"] == "one plus one is two"
    if expected == "failed":
        error = evs[-1]["response"]["error"]
        assert error == {
            "code": "server_error",
            "message": "no byte",
            "type": "upstream_timeout",
            "param": None,
        }


def test_parse_create() -> None:
    parsed = parse_create(
        {
            "model": "m",
            "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
            "instructions": "be brief",
            "max_output_tokens": 50,
            "metadata": {"thread_id": "t7"},
            "tools": [{"type": "function", "name": "calculate"}],
            "store": True,
        }
    )
    assert parsed.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"})
    assert parsed.params == {"max_tokens": 50} and parsed.tools == ("calculate",) and parsed.thread_id == "t7"
    assert not parsed.background and not parsed.stream


async def test_live_batched_reads_number_like_the_stored_log(tmp_path: Any) -> None:
    """A watch without text merging yields the log as stored, whatever the batching: live, from
    memory, gives the same events (and numbers) as a replay of the store after the end."""
    words = " ".join(f"w{i}" for i in range(60))
    config = Config(drain_timeout=0, echo_words_per_s=2000, batch_ms=5)
    async with open_runtime(config, store=SqliteStore(f"{tmp_path}/s.db")) as rt:
        job = await rt.start_job(
            user="u",
            thread_id="t",
            message_id="m",
            model="backstream/echo",
            messages=[{"role": "user", "content": words}],
        )
        record, _ = await rt.job_log(job.job_id, user="u")
        live = ResponsesTranslator(_source(record))
        live_events = live.start()
        batch_sizes, merged_texts = [], 0
        async with rt.watch(job.job_id, user="u", merge_text=False) as batches:
            async for batch in batches:
                batch_sizes.append(len(batch.events))
                assert [e.seq for e in batch.events] == list(range(batch.from_seq, batch.to_seq + 1))
                live_events += live.feed_all(batch.events)
        async with rt.watch(job.job_id, user="u") as batches:
            async for batch in batches:
                merged_texts += sum(1 for e in batch.events if isinstance(e, TextEvent))
        await rt.wait_idle()
        record, stored = await rt.job_log(job.job_id, user="u")
        replayed = ResponsesTranslator(_source(record))
        replay_events = replayed.start() + replayed.feed_all(stored)
    text_entries = sum(1 for e in stored if isinstance(e, TextEvent))
    assert text_entries == 60 and merged_texts < text_entries  # a merged read would lose per-seq deltas
    assert live_events == replay_events
    for after in (-1, 0, 5, 33, len(replay_events) - 1):  # any resume point gets exactly the rest
        assert [e for e in replay_events if e["sequence_number"] > after] == replay_events[after + 1 :]


def _source(record: Any) -> ResponseSource:
    return ResponseSource(
        record.job_id,
        record.created_at,
        record.model,
        record.request.params,
        record.request.annotations,
        record.thread_id,
    )
