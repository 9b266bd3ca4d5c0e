"""What the ingest decoders make of awkward upstream streams, end to end: split and lone
UTF-16 surrogates, a byte-order mark, tool-call fragments without ``index``, and a turn
cut off by ``max_tokens`` in the middle of a tool call."""

from __future__ import annotations

import json
from typing import Any

import trio

from backstream import Config, Store, open_runtime
from backstream.protocol.events import StatusEvent, TextEvent, ToolCallEvent
from tests.helpers import check_contiguous, collect, joined_text, terminal
from tests.upstream_server import (
    FakeUpstream,
    events,
    finish_chunk,
    raw,
    reasoning_chunk,
    sse,
    status,
    streams,
    text_chunk,
    tool_chunk,
    usage_chunk,
)
from tests.ws_helpers import check_contiguous as check_frames
from tests.ws_helpers import raw_client, served, text_of

MSG = [{"role": "user", "content": "hi"}]
GRIN = "\U0001f600"  # one character: "\ud83d\ude00" in JSON escapes

# An emoji split into its two escapes across chunks, lone surrogates both ways, and a
# high surrogate still waiting when the turn ends.
SURROGATE_CHUNKS: list[Any] = [
    text_chunk("a\ud83d"),
    text_chunk("\ude00b"),
    reasoning_chunk("r\ud83d"),
    reasoning_chunk("\ude00"),
    text_chunk("\ud83dc"),
    text_chunk("\ude01d"),
    text_chunk("e\ud83d"),
    finish_chunk(),
    usage_chunk(),
    "[DONE]",
]
SURROGATE_TEXT = f"a{GRIN}b\ufffdc\ufffdde\ufffd"


def test_the_chunks_really_carry_lone_surrogate_escapes() -> None:
    assert b"\\ud83d" in sse(text_chunk("a\ud83d")) and b"\\ude00" in sse(text_chunk("\ude00b"))


async def test_surrogates_reach_watchers_stores_and_job_get_as_text(
    upstream: FakeUpstream, unopened_store: Store
) -> None:
    upstream.script(events(SURROGATE_CHUNKS))
    config = Config(upstream_url=upstream.url, drain_timeout=0)
    async with served(config, store=unopened_store) as srv, raw_client(srv.url) as c:
        await c.hello()
        started = await c.request(
            "job.start", thread_id="t1", message_id="m1", model="gpt-test", messages=MSG, watch=True
        )
        job_id = started["job"]["job_id"]
        frames = await c.events_until_terminal(job_id)  # WebSocket frames: UTF-8 encoded
        check_frames(frames)
        assert text_of(frames) == SURROGATE_TEXT
        reasoning = "".join(e["text"] for f in frames for e in f["events"] if e["kind"] == "reasoning")
        assert reasoning == f"r{GRIN}"
        last = frames[-1]["events"][-1]
        assert last["status"] == "completed" and last["finish_reason"] == "stop"
        info = await c.request("job.get", job_id=job_id, include_content=True)
        assert info["content"] == SURROGATE_TEXT and info["job"]["status"] == "completed"
        # What the store wrote (SQLite rows, Redis entries) reads back as the same text.
        with trio.fail_after(10):
            while not (stored := await unopened_store.get_job(job_id)) or stored.status != "completed":
                await trio.sleep(0.02)
        entries = await unopened_store.read(job_id, 0, 100)
        stored_text = "".join(e.text for e in entries if isinstance(e, TextEvent))
        assert stored_text == SURROGATE_TEXT
        assert isinstance(entries[-1], StatusEvent) and entries[-1].status == "completed"


async def test_surrogates_in_tool_calls_and_errors_are_repaired(upstream: FakeUpstream) -> None:
    upstream.script(
        events(
            [
                tool_chunk(0, call_id="c1", name="clock_now", arguments='{"x": "\ud83d'),
                tool_chunk(0, arguments='\ude00\udc00"}'),
                finish_chunk("tool_calls"),
            ]
        ),
        events([{"error": {"message": "bad \ud800 thing"}}]),
    )
    async with open_runtime(Config(upstream_url=upstream.url, drain_timeout=0)) as rt:
        started = await rt.start_job(
            user="alice", thread_id="t", message_id="m", model="gpt-test", messages=MSG, tools=["clock_now"]
        )
        batches = await collect(rt, started.job_id)
        calls = [e for b in batches for e in b.events if isinstance(e, ToolCallEvent)]
        assert [c.arguments for c in calls] == [f'{{"x": "{GRIN}\ufffd"}}']
        end = terminal(batches)
        assert end.status == "failed" and end.error is not None
        assert end.error.code == "upstream_error" and end.error.message == "bad \ufffd thing"
    # The tool call went back to the model as valid UTF-8 JSON.
    sent = upstream.requests[1]["messages"][-2]["tool_calls"][0]["function"]["arguments"]
    assert sent == f'{{"x": "{GRIN}\ufffd"}}'


async def test_lone_surrogates_from_a_client_become_replacement_characters(upstream: FakeUpstream) -> None:
    upstream.script(streams(["ok"]))
    config = Config(upstream_url=upstream.url, drain_timeout=0)
    async with served(config) as srv, raw_client(srv.url) as c:
        await c.hello()
        frame = json.dumps(
            {
                "type": "job.start",
                "id": "s1",
                "thread_id": "t\ud83d",
                "message_id": "m\udc00",
                "model": "gpt-test",
                "messages": [{"role": "user", "content": "x\ud83d\ude00y\ud83d"}],
                "watch": True,
            }
        )
        assert "\\ud83d" in frame
        await c.send(frame)
        reply = await c.recv()
        assert reply["type"] == "job.started", reply
        assert reply["job"]["thread_id"] == "t\ufffd" and reply["job"]["message_id"] == "m\ufffd"
        frames = await c.events_until_terminal(reply["job"]["job_id"])
        assert text_of(frames) == "ok"
    assert upstream.requests[0]["messages"] == [{"role": "user", "content": f"x{GRIN}y\ufffd"}]


async def test_a_byte_order_mark_does_not_drop_the_first_event(upstream: FakeUpstream) -> None:
    upstream.script(
        raw(
            [b"\xef\xbb", b"\xbf" + sse(text_chunk("first")), sse(text_chunk(" second")), sse(finish_chunk())]
        )
    )
    async with open_runtime(Config(upstream_url=upstream.url, drain_timeout=0)) as rt:
        started = await rt.start_job(
            user="alice", thread_id="t", message_id="m", model="gpt-test", messages=MSG
        )
        batches = await collect(rt, started.job_id)
        assert joined_text(batches) == "first second"
        assert terminal(batches).status == "completed"


def _bare_fragment(call_id: str | None, name: str | None, arguments: str) -> dict[str, Any]:
    chunk = tool_chunk(0, call_id=call_id, name=name, arguments=arguments)
    del chunk["choices"][0]["delta"]["tool_calls"][0]["index"]
    return chunk


async def test_tool_call_fragments_without_index_are_assembled_by_id(upstream: FakeUpstream) -> None:
    upstream.script(
        events(
            [
                _bare_fragment("call_a", "calculate", '{"expression": '),
                _bare_fragment(None, None, '"1+2"}'),
                _bare_fragment("call_b", "clock_now", "{}"),
                finish_chunk("tool_calls"),
            ]
        ),
        streams(["done"]),
    )
    async with open_runtime(Config(upstream_url=upstream.url, drain_timeout=0)) as rt:
        started = await rt.start_job(
            user="alice",
            thread_id="t",
            message_id="m",
            model="gpt-test",
            messages=MSG,
            tools=["calculate", "clock_now"],
        )
        batches = await collect(rt, started.job_id)
        check_contiguous(batches)
        calls = [e for b in batches for e in b.events if isinstance(e, ToolCallEvent)]
        assert [(c.call_id, c.name, c.arguments) for c in calls] == [
            ("call_a", "calculate", '{"expression": "1+2"}'),
            ("call_b", "clock_now", "{}"),
        ]
        assert terminal(batches).status == "completed"
    results = [m for m in upstream.requests[1]["messages"] if m["role"] == "tool"]
    assert (results[0]["tool_call_id"], results[0]["content"]) == ("call_a", "3")
    assert [m["tool_call_id"] for m in results] == ["call_a", "call_b"]


async def test_a_turn_cut_off_inside_a_tool_call_ends_without_running_it(upstream: FakeUpstream) -> None:
    # A strict upstream refuses a conversation whose tool call has invalid arguments.
    upstream.script(
        events(
            [
                text_chunk("Let me compute. "),
                tool_chunk(0, call_id="c1", name="calculate", arguments='{"expression": "1+'),
                finish_chunk("length"),
                usage_chunk(),
                "[DONE]",
            ]
        ),
        status(500, body='{"error": {"message": "invalid tool call arguments"}}'),
    )
    async with open_runtime(Config(upstream_url=upstream.url, drain_timeout=0)) as rt:
        started = await rt.start_job(
            user="alice", thread_id="t", message_id="m", model="gpt-test", messages=MSG, tools=["calculate"]
        )
        batches = await collect(rt, started.job_id)
        check_contiguous(batches)
        kinds = [e.kind for b in batches for e in b.events]
        # Its argument fragments were streamed as they came; the call itself never ran.
        assert "tool_call" not in kinds and "tool_result" not in kinds and "text" in kinds
        end = terminal(batches)
        assert end.status == "completed" and end.finish_reason == "length"
        info = await rt.get_job(started.job_id, user="alice", include_content=True)
        assert info.content == "Let me compute. " and info.tool_calls == ()
    assert len(upstream.requests) == 1


async def test_upstream_connections_are_reused_and_a_stale_one_replaced(upstream: FakeUpstream) -> None:
    closing = streams(["one"], done=False)

    async def then_close(reply: Any) -> None:
        await closing(reply)
        await trio.sleep(0.05)  # the client has pooled the connection by now
        await reply.drop()

    upstream.script(streams(["a"], done=False), then_close, streams(["two"]))
    async with open_runtime(Config(upstream_url=upstream.url, drain_timeout=0)) as rt:
        texts = []
        for n in range(3):
            started = await rt.start_job(
                user="alice", thread_id="t", message_id=f"m{n}", model="gpt-test", messages=MSG
            )
            batches = await collect(rt, started.job_id)
            assert terminal(batches).status == "completed"
            texts.append(joined_text(batches))
            await trio.sleep(0.2)
    assert texts == ["a", "one", "two"]
    assert len(upstream.requests) == 3
    assert upstream.connections == 2  # the first two shared one; the closed one was replaced
