"""/v1/ai-sdk over a raw WebSocket: numbering, resume from a sequence, handshakes and bad frames;
and the tool_call_delta opt-in on /v1."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection, open_websocket_url

from backstream import Config
from backstream.runtime.server.connection import MAX_HELLO_BYTES
from backstream.runtime.server.frontdoor import UNAUTHORIZED_REASON
from backstream.runtime.server.session import ConnectionLimits
from backstream.runtime.stores.sqlite import SqliteStore
from tests.test_ai_sdk import AiSdkServer, ai_sdk_server, ended, only_job
from tests.test_tools import tool_turn
from tests.upstream_server import FakeUpstream, streams
from tests.ws_helpers import check_contiguous, raw_client, served, start_fields


def send_frame(request_id: str, chat_id: str, text: str, body: dict[str, Any] | None = None) -> str:
    return json.dumps(
        {
            "type": "send",
            "requestId": request_id,
            "id": chat_id,
            "trigger": "submit-message",
            "messageId": None,
            "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": text}]}],
            "headers": {},
            "body": body or {},
            "metadata": None,
        }
    )


def resume_frame(request_id: str, chat_id: str, last_sequence: int | None = None) -> str:
    frame: dict[str, Any] = {
        "type": "resume",
        "requestId": request_id,
        "id": chat_id,
        "headers": {},
        "body": {},
    }
    if last_sequence is not None:
        frame["lastSequence"] = last_sequence
    return json.dumps(frame)


async def response(ws: WebSocketConnection, request_id: str) -> list[dict[str, Any]]:
    """The frames of one request, from ``start`` (or ``error``/``no-active``) to ``end``."""
    frames = []
    with trio.fail_after(30):
        while True:
            frame = json.loads(await ws.get_message())
            assert frame["requestId"] == request_id, frame
            frames.append(frame)
            if frame["type"] in ("end", "error", "no-active"):
                return frames


def chunks_of(frames: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    return [(f["sequence"], f["chunk"]) for f in frames if f["type"] == "chunk"]


def url(server: AiSdkServer, token: str = "tok-alice") -> str:
    return f"{server.url}?token={token}"


async def test_numbering_is_the_same_live_and_replayed_from_the_store(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.script(
        tool_turn(("call_1", "calculate", '{"expression": "2+2"}')),
        streams([f"word{i} " for i in range(40)], delay=0.005),
    )
    store = SqliteStore(str(tmp_path / "jobs.db"))
    config = Config(upstream_url=upstream.url, drain_timeout=0, batch_ms=200)
    async with ai_sdk_server(config, store=store) as server, open_websocket_url(url(server)) as ws:
        body = {"model": "m", "tools": ["calculate"]}
        await ws.send_message(send_frame("live", "c1", "count", body))
        live = chunks_of(await response(ws, "live"))
        assert [seq for seq, _ in live] == list(range(len(live)))
        job = await only_job(server.runtime, "c1")
        info = await ended(server.runtime, job.job_id)
        texts = [c["delta"] for _, c in live if c["type"] == "text-delta"]
        assert "".join(texts) == info.content
        # One text-delta per log entry, however the watch batched them (batch_ms 200 merges
        # many entries on /v1): the numbering does not depend on timing.
        assert len(texts) == 40
        with trio.fail_after(10):
            while server.runtime._registry.live(job.job_id) is not None:
                await trio.sleep(0.02)  # once the actor is gone, replays read the store
        await ws.send_message(resume_frame("replay", "c1"))
        replay = await response(ws, "replay")
        assert replay[0]["type"] == "start" and chunks_of(replay) == live
        await ws.send_message(resume_frame("tail", "c1", last_sequence=20))
        assert chunks_of(await response(ws, "tail")) == live[21:]
        await ws.send_message(resume_frame("past", "c1", last_sequence=len(live) + 5))
        assert chunks_of(await response(ws, "past")) == []


async def test_resume_of_a_running_job_goes_on_live() -> None:
    config = Config(drain_timeout=0)
    async with ai_sdk_server(config) as server, open_websocket_url(url(server)) as ws:
        body = {"model": "backstream/lorem", "params": {"max_tokens": 30, "tokens_per_s": 30}}
        await ws.send_message(send_frame("s", "c2", "go", body))
        with trio.fail_after(10):
            while True:  # read a few chunks, then leave the request unread
                frame = json.loads(await ws.get_message())
                if frame.get("sequence", 0) >= 5:
                    break
        async with open_websocket_url(url(server)) as second:
            await second.send_message(resume_frame("r", "c2"))
            frames = await response(second, "r")
        chunks = [c for _, c in chunks_of(frames)]
        assert chunks[0] == {"type": "start", "messageId": (await only_job(server.runtime, "c2")).job_id}
        assert chunks[-1] == {"type": "finish", "finishReason": "stop"}
        info = await ended(server.runtime, (await only_job(server.runtime, "c2")).job_id)
        assert "".join(c["delta"] for c in chunks if c["type"] == "text-delta") == info.content


async def closed_unread(target: str, headers: list[tuple[str, str]]) -> tuple[int, str | None]:
    """Open, send a ``send`` frame, and return the close code and reason; fail on any frame."""
    async with open_websocket_url(target, extra_headers=headers) as ws:
        with contextlib.suppress(ConnectionClosed):
            await ws.send_message(send_frame("s", "chat-refused", "hello"))
        with trio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
            frame = await ws.get_message()
            pytest.fail(f"a frame came: {frame}")
    return closed.value.reason.code, closed.value.reason.reason


async def test_handshakes_auth_and_origin() -> None:
    """Without valid credentials the socket is closed 4401 with a reason a page can show,
    and nothing is read or started; a foreign Origin is refused in the handshake."""
    async with ai_sdk_server(auth_cookie="bs", allow_origins=("https://app.example",)) as server:
        for target, headers in [
            (server.url, []),
            (server.url, [("Cookie", "other=tok-alice")]),
            (server.url, [("Cookie", "bs=forged"), ("Origin", "https://app.example")]),
            (url(server, "wrong"), []),
        ]:
            assert await closed_unread(target, headers) == (4401, UNAUTHORIZED_REASON)
        # An unauthenticated first frame is read no further than a /v1 hello.
        async with open_websocket_url(server.url) as ws:
            with contextlib.suppress(ConnectionClosed):
                await ws.send_message("x" * (MAX_HELLO_BYTES + 1))
            with trio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == 1009
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(server.url, extra_headers=[("Origin", "https://evil.example")]):
                pass
        assert rejected.value.status_code == 403
        assert await server.runtime.list_jobs(user="alice") == []
        stats = server.door.statistics()
        assert (stats.connections, stats.requests, stats.frames_sent) == (0, 0, 0)
        for target, headers in [
            (server.url, [("Cookie", "a=1; bs=tok-alice"), ("Origin", "https://app.example")]),
            (server.url, [("Authorization", "Bearer tok-alice")]),
            (url(server), []),
        ]:
            async with open_websocket_url(target, extra_headers=headers) as ws:
                await ws.send_message(resume_frame("r", "nothing-here"))
                assert await response(ws, "r") == [{"type": "no-active", "requestId": "r"}]


async def test_bad_frames_get_readable_errors() -> None:
    async with ai_sdk_server() as server, open_websocket_url(url(server)) as ws:
        await ws.send_message('{"type":"fly","requestId":"a"}')
        assert await response(ws, "a") == [
            {"type": "error", "requestId": "a", "errorText": "unknown frame type 'fly'"}
        ]
        await ws.send_message(send_frame("b", "c", "hi", {"model": "nope/none"}))
        (error,) = await response(ws, "b")
        assert error["type"] == "error" and "needs an upstream" in error["errorText"]
        await ws.send_message(send_frame("c", "c", "hi", {"params": {"api_key": "x"}}))
        (error,) = await response(ws, "c")
        assert error["errorText"] == "params may not hold api_key"
        await ws.send_message('{"type":"abort","requestId":"unknown"}')  # nothing to stop: ignored
        await ws.send_message(resume_frame("d", "c"))
        assert await response(ws, "d") == [{"type": "no-active", "requestId": "d"}]
        await ws.send_message("not json")  # no requestId to answer: the connection is closed
        with pytest.raises(ConnectionClosed) as closed:
            with trio.fail_after(10):
                await ws.get_message()
        assert closed.value.reason.code == 1008


async def test_v1_watch_carries_tool_call_deltas_only_when_asked(upstream: FakeUpstream) -> None:
    upstream.script(
        tool_turn(("call_1", "calculate", '{"expression": "1+1"}')),
        streams(["two"]),
        tool_turn(("call_2", "calculate", '{"expression": "2+2"}')),
        streams(["four"]),
    )
    async with served(Config(upstream_url=upstream.url, drain_timeout=0)) as server:
        async with raw_client(server.url) as client:
            await client.hello()
            fields = start_fields(model="m", tools=["calculate"], params={}, watch=True)
            started = await client.request("job.start", **fields)
            batches = await client.events_until_terminal(started["job"]["job_id"])
            check_contiguous(batches)
            kinds = [e["kind"] for b in batches for e in b["events"]]
            assert "tool_call_delta" not in kinds and "tool_call" in kinds
            fields = start_fields(
                "m2", model="m", tools=["calculate"], params={}, watch=True, tool_call_deltas=True
            )
            started = await client.request("job.start", **fields)
            batches = await client.events_until_terminal(started["job"]["job_id"])
            check_contiguous(batches)
            deltas = [e for b in batches for e in b["events"] if e["kind"] == "tool_call_delta"]
            assert [d["arguments_delta"] for d in deltas] == ['{"expressi', 'on": "2+2"}']
            assert {(d["call_id"], d["name"]) for d in deltas} == {("call_2", "calculate")}
            # A later watch without the option skips them too, batches still contiguous.
            watching = await client.request("job.watch", job_id=started["job"]["job_id"], after_seq=0)
            assert watching["type"] == "job.watching"
            again = await client.events_until_terminal(started["job"]["job_id"])
            check_contiguous(again)
            assert all(e["kind"] != "tool_call_delta" for b in again for e in b["events"])


async def test_abort_during_admission_and_of_resumes() -> None:
    slow = {"model": "backstream/lorem", "params": {"max_tokens": 500, "tokens_per_s": 20}}
    async with ai_sdk_server() as server, open_websocket_url(url(server)) as ws:
        # An abort right behind its send: the job is aborted once admitted, nothing streamed.
        await ws.send_message(send_frame("s1", "early", "go", slow))
        await ws.send_message('{"type":"abort","requestId":"s1"}')
        with trio.fail_after(10):
            while not await server.runtime.list_jobs(user="alice", thread_id="early"):
                await trio.sleep(0.02)
        early = await ended(server.runtime, (await only_job(server.runtime, "early")).job_id)
        assert early.job.status == "aborted"

        await ws.send_message(send_frame("s2", "kept", "go", slow))
        assert json.loads(await ws.get_message())["type"] == "start"
        job_id = (await only_job(server.runtime, "kept")).job_id
        # A resume replaced by a newer one (as Chat does): its abort does not stop the job.
        await ws.send_message(resume_frame("r1", "kept"))
        await ws.send_message('{"type":"abort","requestId":"r1"}')
        await ws.send_message(resume_frame("r2", "kept"))
        await trio.sleep(1.0)
        assert (await server.runtime.get_job(job_id, user="alice")).job.status == "running"
        # A resume stopped for good: after the grace, the job is aborted.
        await ws.send_message('{"type":"abort","requestId":"r2"}')
        assert (await ended(server.runtime, job_id)).job.status == "aborted"


async def test_bytes_sent_are_counted_in_utf8_bytes() -> None:
    """The AI SDK endpoint counts what it sends as /v1 does: bytes, not characters."""
    async with ai_sdk_server() as server, open_websocket_url(url(server)) as ws:
        before = server.door.statistics().bytes_sent
        await ws.send_message(
            send_frame("a", "chat-u", "héllo wörld ✓ ünïcode", {"model": "backstream/echo"})
        )
        received = chars = 0
        with trio.fail_after(30):
            while True:
                raw = await ws.get_message()
                received += len(raw.encode())
                chars += len(raw)
                if json.loads(raw)["type"] == "end":
                    break
        assert received > chars  # the echoed text was not ASCII
        assert server.door.statistics().bytes_sent - before == received


async def test_rate_limit_is_charged_before_decoding_but_aborts_get_through() -> None:
    async with ai_sdk_server(limits=ConnectionLimits(rate_per_s=0.001, rate_burst=2)) as server:
        async with open_websocket_url(url(server)) as ws:
            await ws.send_message("not json, but it costs a token")  # no requestId: refused, 1008
            with pytest.raises(ConnectionClosed) as closed:
                with trio.fail_after(10):
                    await ws.get_message()
            assert closed.value.reason.code == 1008
        async with open_websocket_url(url(server)) as ws:
            await ws.send_message(resume_frame("r1", "c"))
            await ws.send_message(resume_frame("r2", "c"))
            await ws.send_message(resume_frame("r3", "c"))  # over the rate: refused undecoded
            await ws.send_message('{"type":"abort","requestId":"r9"}')  # never refused
            frames = [json.loads(await ws.get_message()) for _ in range(3)]
            refused = [f for f in frames if f["type"] == "error"]
            assert refused == [
                {"type": "error", "requestId": "r3", "errorText": "too many requests; slow down"}
            ]
            with trio.move_on_after(0.5):  # the abort was not answered with an error
                extra = await ws.get_message()
                raise AssertionError(f"unexpected frame {extra}")
            assert server.door.statistics().requests >= 4
