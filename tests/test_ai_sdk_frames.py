"""/v1/ai-sdk frames out: text coalescing (``coalesce_ms``) and the slow-client gate, over real
WebSocket connections on the real clock (the gate asks the kernel, which a mock clock skips)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio
import trio_websocket
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from backstream import Config
from backstream.runtime.server.connection import ConnectionLimits
from tests.test_ai_sdk import ai_sdk_server, ended, only_job
from tests.test_ai_sdk_server import chunks_of, response, resume_frame, send_frame, url

FAST = {"model": "backstream/lorem", "params": {"max_tokens": 200, "tokens_per_s": 200}}


def assembled_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["delta"] for c in chunks if c["type"] == "text-delta")


async def test_coalesced_frames_are_few_contiguous_and_whole() -> None:
    async with ai_sdk_server(Config(drain_timeout=0)) as server:
        async with open_websocket_url(url(server) + "&coalesce_ms=100") as ws:
            await ws.send_message(send_frame("s", "c1", "go", FAST))
            with trio.fail_after(30):
                frames = await response(ws, "s")
            live = chunks_of(frames)
            job = await only_job(server.runtime, "c1")
            info = await ended(server.runtime, job.job_id)
            assert [seq for seq, _ in live] == list(range(len(live)))
            chunks = [c for _, c in live]
            assert assembled_text(chunks) == info.content and len(info.content.split()) == 200
            deltas = [c for c in chunks if c["type"] == "text-delta"]
            # 200 entries over about a second, at most one text frame per 100 ms: about ten
            # (the bound leaves room for a loaded machine stretching the job to four seconds).
            assert len(deltas) <= 40, len(deltas)
            assert len(live) < info.job.seq // 4, (len(live), info.job.seq)
            assert chunks[-1] == {"type": "finish", "finishReason": "stop"}

            # A replay from the start (the AI SDK's resume) gives the whole message again.
            await ws.send_message(resume_frame("r", "c1"))
            replay = chunks_of(await response(ws, "r"))
            assert [seq for seq, _ in replay] == list(range(len(replay)))
            assert assembled_text([c for _, c in replay]) == info.content
            assert len(replay) <= len(live)
            # A resume from a sequence cannot be honoured: the numbering depended on timing.
            await ws.send_message(resume_frame("t", "c1", last_sequence=3))
            (error,) = await response(ws, "t")
            assert error["type"] == "error" and "lastSequence cannot be honoured" in error["errorText"]

        # Without coalescing, the same job is one chunk frame per text entry.
        async with open_websocket_url(url(server)) as ws:
            await ws.send_message(resume_frame("r", "c1"))
            plain = [c for _, c in chunks_of(await response(ws, "r"))]
            assert len([c for c in plain if c["type"] == "text-delta"]) == 200
            assert assembled_text(plain) == info.content


async def test_the_operator_default_and_bad_values() -> None:
    async with ai_sdk_server(Config(drain_timeout=0), ai_sdk_coalesce_ms=100) as server:
        async with open_websocket_url(url(server)) as ws:
            await ws.send_message(send_frame("s", "c1", "go", FAST))
            chunks = [c for _, c in chunks_of(await response(ws, "s"))]
            assert len([c for c in chunks if c["type"] == "text-delta"]) <= 40
        async with open_websocket_url(url(server) + "&coalesce_ms=0") as ws:  # a client opts out
            await ws.send_message(resume_frame("r", "c1"))
            chunks = [c for _, c in chunks_of(await response(ws, "r"))]
            assert len([c for c in chunks if c["type"] == "text-delta"]) == 200
        for value in ("-1", "fast", "10001", "1e3"):
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_websocket_url(url(server) + f"&coalesce_ms={value}"):
                    pass
            assert rejected.value.status_code == 400
            assert b"coalesce_ms must be an integer" in (rejected.value.body or b"")


async def test_a_client_that_stops_reading_is_closed_4429_and_resumes_whole() -> None:
    limits = ConnectionLimits(max_unsent_bytes=64 * 1024, slow_client_timeout=1, send_timeout=30)
    big = {"model": "backstream/lorem", "params": {"max_tokens": 40_000, "tokens_per_s": 20_000}}
    async with (
        ai_sdk_server(Config(drain_timeout=0), limits=limits, socket_send_buffer=256 * 1024) as server,
        trio.open_nursery() as nursery,
    ):
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # the backlog stays with the server
        await sock.connect(("127.0.0.1", server.door.port))
        ws = await trio_websocket.wrap_client_stream(
            nursery, trio.SocketStream(sock), "127.0.0.1", "/v1/ai-sdk?token=tok-alice", message_queue_size=1
        )
        await ws.send_message(send_frame("s", "slow", "go", big))
        # The gate closes it after slow_client_timeout, long before a send's deadline would.
        with trio.fail_after(15):
            while server.door.statistics().closed_slow == 0:  # the client reads nothing
                await trio.sleep(0.05)
        job_id = (await only_job(server.runtime, "slow")).job_id
        assert (await server.runtime.get_job(job_id, user="alice")).job.status == "running"  # it goes on
        with pytest.raises(ConnectionClosed) as closed, trio.fail_after(60):
            while True:  # what it had not read, then the close frame
                await ws.get_message()
        assert closed.value.reason.code == 4429
        # 40,000 entries: on two cores shared with the rest of the suite, it may take a while.
        info = await ended(server.runtime, job_id, timeout=120)
        assert info.job.status == "completed"
        async with open_websocket_url(url(server)) as again:
            await again.send_message(resume_frame("r", "slow"))
            with trio.fail_after(60):
                frames = await response(again, "r")
        assert assembled_text([c for _, c in chunks_of(frames)]) == info.content
        assert len(info.content.split()) == 40_000
        nursery.cancel_scope.cancel()
