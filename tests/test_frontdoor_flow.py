"""End-to-end flows: an independent client, slow clients, the Python client, fuzzing, the schema."""

from __future__ import annotations

import itertools
import json
import socket
import threading
from typing import Any

import jsonschema
import pytest
import trio
import trio_websocket
from hypothesis import given, settings
from hypothesis import strategies as st

from backstream import NotFoundError, UnauthorizedError
from backstream.client import open_client
from backstream.protocol.codec import ProtocolError, decode_client
from backstream.protocol.messages import Pong
from backstream.protocol.schema import json_schema
from backstream.runtime.server.connection import ConnectionLimits
from tests.ws_helpers import Raw, check_contiguous, served, start_fields, text_of


def independent_client_flow(url: str) -> dict[str, Any]:
    """Start, watch, drop the connection midway, reconnect and resume, with the `websockets`
    library (asyncio, in a thread): nothing of backstream's own client code."""
    from websockets.sync.client import connect

    def hello(ws: Any) -> None:
        ws.send(json.dumps({"type": "hello", "id": "h", "protocol": 1, "token": "tok-alice"}))
        assert json.loads(ws.recv())["type"] == "welcome"

    batches: list[dict[str, Any]] = []
    with connect(url) as ws:
        hello(ws)
        ws.send(
            json.dumps(
                {
                    "type": "job.start",
                    "id": "s",
                    **start_fields(params={"max_tokens": 300, "tokens_per_s": 200}),
                    "watch": True,
                }
            )
        )
        started = json.loads(ws.recv())
        assert started["type"] == "job.started"
        job_id = started["job"]["job_id"]
        while not batches or batches[-1]["to_seq"] < 100:  # about a third of the answer
            message = json.loads(ws.recv())
            assert message["type"] == "job.events"
            batches.append(message)
    cut = batches[-1]["to_seq"]  # the connection is gone; the job goes on
    with connect(url) as ws:
        hello(ws)
        ws.send(json.dumps({"type": "job.watch", "id": "w", "job_id": job_id, "after_seq": cut, "epoch": 1}))
        assert json.loads(ws.recv())["type"] == "job.watching"
        while (
            batches[-1]["events"][-1]["kind"] != "status" or batches[-1]["events"][-1]["status"] == "running"
        ):
            batches.append(json.loads(ws.recv()))
        ws.send(json.dumps({"type": "job.get", "id": "g", "job_id": job_id, "include_content": True}))
        info = json.loads(ws.recv())
    return {"batches": batches, "info": info}


async def test_independent_client_drop_and_resume() -> None:
    async with served() as srv:
        result = await trio.to_thread.run_sync(independent_client_flow, srv.url)
    batches, info = result["batches"], result["info"]
    check_contiguous(batches)  # no gap, no repeat across the two connections
    assert text_of(batches) == info["content"]
    assert len(info["content"].split()) == 300 and info["job"]["status"] == "completed"


async def test_client_that_stops_reading_is_closed_4429_and_its_job_completes() -> None:
    # Real clock: a send's wait on the kernel must not be skipped over by a mock clock.
    limits = ConnectionLimits(max_unsent_bytes=64 * 1024, slow_client_timeout=1, send_timeout=10)
    async with served(limits=limits, socket_send_buffer=256 * 1024) as srv, trio.open_nursery() as nursery:
        sock = trio.socket.socket()
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024
        )  # a small window: the backlog stays with the server
        await sock.connect(("127.0.0.1", srv.door.port))
        ws = await trio_websocket.wrap_client_stream(
            nursery, trio.SocketStream(sock), "127.0.0.1", "/v1", message_queue_size=1
        )
        c = Raw(ws)
        await c.hello()
        started = await c.request(
            "job.start", **start_fields(params={"max_tokens": 40_000, "tokens_per_s": 20_000}), watch=True
        )
        job_id = started["job"]["job_id"]
        with trio.fail_after(10):
            while srv.door.statistics().closed_slow == 0:  # the client reads nothing
                await trio.sleep(0.05)
        record = await srv.runtime.get_job(job_id, user="alice")
        assert record.job.status == "running"  # its job goes on
        assert await c.close_code() == 4429  # what it had not read, then the close frame
        await srv.runtime.wait_idle()
        assert (await srv.runtime.get_job(job_id, user="alice")).job.status == "completed"
        nursery.cancel_scope.cancel()


async def test_python_client_resumes_after_a_dropped_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with served() as srv, open_client(srv.url, "tok-alice") as client:
        started = await client.start_job(
            thread_id="t",
            message_id="m",
            model="backstream/lorem",
            messages=[{"role": "user", "content": "x"}],
            params={"max_tokens": 200, "tokens_per_s": 100},
        )
        text, seqs, dropped = "", [], False
        async with client.watch(started.job.job_id) as batches:
            async for batch in batches:
                seqs.append((batch.from_seq, batch.to_seq))
                text += batch.text
                if not dropped and batch.to_seq > 50:
                    dropped = True
                    await client.drop_connection()
                    await trio.sleep(0.5)
        assert client.reconnects == 1
        assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(seqs))
        info = await client.get(started.job.job_id, include_content=True)
        assert info.content == text and info.job.status == "completed"
        with pytest.raises(NotFoundError):
            await client.get("j_nope")
        assert (await client.list_jobs(thread_id="t")).jobs[0].job_id == started.job.job_id
        assert isinstance(await client.ping(), Pong)


async def test_python_client_typed_errors(autojump_clock: trio.testing.MockClock) -> None:
    async with served() as srv:
        with pytest.raises(UnauthorizedError):
            async with open_client(srv.url, "wrong"):
                pass
        async with open_client(srv.url, "tok-bob", token_in_header=True) as client:
            assert client.user == "bob"


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.binary(max_size=50),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
            ),
            max_leaves=20,
        ).map(json.dumps),
        st.fixed_dictionaries(
            {
                "type": st.sampled_from(
                    [
                        "hello",
                        "job.start",
                        "job.watch",
                        "job.get",
                        "job.list",
                        "job.approve",
                        "notifications.read",
                        "thread.mute",
                        "ping",
                    ]
                )
            },
            optional={
                "id": st.one_of(st.text(max_size=70), st.integers(), st.none()),
                "job_id": st.one_of(st.text(max_size=5), st.integers()),
                "after_seq": st.one_of(st.integers(), st.text(max_size=3), st.booleans()),
                "limit": st.integers(),
                "messages": st.lists(st.dictionaries(st.text(max_size=5), st.text(max_size=5))),
                "protocol": st.integers(),
                "ids": st.lists(st.text(max_size=3)),
            },
        ).map(json.dumps),
    )
)
def test_decoder_raises_nothing_but_protocol_error(frame: str | bytes) -> None:
    try:
        decode_client(frame)
    except ProtocolError as exc:
        assert exc.code == "bad_request"


def test_schema_validates_what_the_codec_writes() -> None:
    from backstream.protocol.codec import batch_message, encode
    from backstream.protocol.events import Batch, ErrorInfo, JobSummary, StatusEvent, TextEvent, ToolCallEvent
    from backstream.protocol.messages import ErrorMessage, JobInfoMessage, JobStarted

    schema = json_schema()
    validator = jsonschema.Draft202012Validator({**schema, "$ref": "#/properties/server"})
    summary = JobSummary(
        "j",
        "t",
        "m",
        "failed",
        "x",
        3,
        1,
        2,
        "a",
        "b",
        "c",
        ErrorInfo("upstream_http", "x", 502),
        {"prompt_tokens": 1},
        0,
    )
    frames = [
        encode(JobStarted(id="r", job=summary, existing=False)),
        encode(JobInfoMessage(id="r", job=summary, content="hi")),
        encode(ErrorMessage(id=None, code="capacity", message="m", retry_after_ms=5)),
        encode(
            batch_message(
                Batch(
                    "j",
                    1,
                    1,
                    3,
                    (
                        TextEvent(1, "a"),
                        ToolCallEvent(2, "c", "n", "{}"),
                        StatusEvent(3, "completed", finish_reason="stop"),
                    ),
                )
            )
        ),
    ]
    for frame in frames:
        validator.validate(json.loads(frame))
    client = jsonschema.Draft202012Validator({**schema, "$ref": "#/properties/client"})
    client.validate({"type": "job.watch", "id": "r", "job_id": "j", "after_seq": 3})
    with pytest.raises(jsonschema.ValidationError):
        client.validate({"type": "job.watch", "id": "r"})
    assert threading.active_count() >= 1
