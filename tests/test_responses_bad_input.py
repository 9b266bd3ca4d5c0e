"""Hostile or odd bodies on the HTTP front door, over real HTTP: each is refused with a 400
(or 409) in OpenAI's error shape or repaired, never a 500, never a traceback in the log."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from backstream.runtime.server.serve import serve
from backstream.runtime.server.settings import ServeSettings
from tests.test_responses_api import Server, in_thread, served
from tests.upstream_server import FakeUpstream, events, finish_chunk, streams, tool_chunk
from tests.ws_helpers import raw_client

AUTH = {"Authorization": "Bearer tok-alice", "content-type": "application/json"}


def _refused(reply: httpx.Response, status: int = 400, code: str = "bad_request") -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error: dict[str, Any] = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return error


async def test_lone_surrogates_are_repaired_as_on_the_websocket(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.script(streams(["ok"]))
    async with served(upstream, store=f"sqlite:///{tmp_path / 'jobs.db'}") as server:
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH) as http:
            # Escaped: valid JSON, not valid text. A pair split over two escapes is one character.
            body = r'{"model":"m","input":"a\ud800b \ud83d\ude00","metadata":{"k\udc00":"\udfff"}}'
            reply = await http.post("/responses", content=body.encode())
            assert reply.status_code == 200, reply.text
            assert reply.json()["metadata"] == {"k\ufffd": "\ufffd"}
            assert upstream.requests[0]["messages"][-1]["content"] == "a\ufffdb \U0001f600"
            stored = await http.get(f"/responses/{reply.json()['id']}")  # read back from SQLite
            assert stored.json()["metadata"] == {"k\ufffd": "\ufffd"}
            # Encoded raw in the bytes: not UTF-8 at all, so not JSON.
            raw = await http.post("/responses", content=b'{"model":"m","input":"a\xed\xa0\x80"}')
            _refused(raw)


async def test_json_nested_too_deep_is_a_400_and_logs_no_error(
    upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    async with served(upstream) as server:
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH) as http:
            with caplog.at_level(logging.DEBUG):
                deep = await http.post("/responses", content=b"[" * 200_000 + b"]" * 200_000)
                assert "64" in _refused(deep)["message"]
                nested: Any = "x"
                for _ in range(65):
                    nested = [nested]
                over = {"model": "m", "input": "x", "metadata": {"k": nested}}
                _refused(await http.post("/responses", content=json.dumps(over).encode()))
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
async def test_non_finite_numbers_are_refused_on_http_and_websocket(
    upstream: FakeUpstream, number: str
) -> None:
    async with served(upstream) as server:
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH) as http:
            body = '{"model":"m","input":"x","temperature":NUMBER}'.replace("NUMBER", number)
            assert "number" in _refused(await http.post("/responses", content=body.encode()))["message"]
        async with raw_client(server.ws_url) as ws:
            await ws.hello()
            start = (
                '{"type":"job.start","id":"s1","thread_id":"t","message_id":"m1","model":"m",'
                '"messages":[{"role":"user","content":"x"}],"params":{"temperature":NUMBER}}'
            ).replace("NUMBER", number)
            await ws.send(start)
            reply = await ws.recv()
            assert reply["type"] == "error" and reply["code"] == "bad_request" and reply["id"] == "s1"
    assert upstream.requests == []  # nothing started


async def test_idempotency_key_too_long_or_reused_with_another_body_is_refused(
    upstream: FakeUpstream,
) -> None:
    async with served(upstream) as server:
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH) as http:
            body = {"model": "m", "input": "x", "background": True, "metadata": {"a": "1", "b": "2"}}
            too_long = await http.post("/responses", json=body, headers={"Idempotency-Key": "k" * 201})
            assert _refused(too_long)["param"] == "Idempotency-Key"
            longest = await http.post("/responses", json=body, headers={"Idempotency-Key": "k" * 200})
            assert longest.status_code == 200
            first = await http.post("/responses", json=body, headers={"Idempotency-Key": "k1"})
            # The same body in another order and spacing is the same request: the same job.
            same = json.dumps(dict(reversed(body.items())), indent=2).encode()
            again = await http.post("/responses", content=same, headers={"Idempotency-Key": "k1"})
            assert first.status_code == again.status_code == 200
            assert first.json()["id"] == again.json()["id"] != longest.json()["id"]
            changed = await http.post(
                "/responses", json={**body, "input": "y"}, headers={"Idempotency-Key": "k1"}
            )
            error = _refused(changed, 409, "conflict")
            assert error["param"] == "Idempotency-Key" and "different" in error["message"]


@pytest.mark.redis
async def test_idempotency_key_reuse_is_refused_on_another_instance(upstream: FakeUpstream) -> None:
    from backstream.runtime.stores.redis import RedisStore
    from tests.conftest import delete_prefix, redis_url, require_redis

    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    try:
        async with trio.open_nursery() as nursery:
            ports = []
            handles = []
            for _ in range(2):
                settings = ServeSettings.defaults(
                    port=0,
                    http_port=0,
                    token=("tok-alice=alice",),
                    drain_timeout=0.0,
                    upstream_url=upstream.url,
                )
                store = RedisStore(redis_url(), prefix=prefix)
                handle = await nursery.start(
                    lambda task_status, v=settings, s=store: serve(
                        v, store=s, handle_signals=False, announce=lambda _: None, task_status=task_status
                    )
                )
                handles.append(handle)
                ports.append(handle.http_port)
            body = {"model": "m", "input": "x", "background": True}
            key = {"Idempotency-Key": "shared-key"}
            replies = []
            for port, sent in zip(ports, [body, body, {**body, "input": "z"}], strict=False):
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/v1", headers=AUTH) as http:
                    replies.append(await http.post("/responses", json=sent, headers=key))
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[1]}/v1", headers=AUTH) as http:
                replies.append(await http.post("/responses", json={**body, "input": "z"}, headers=key))
            assert replies[0].json()["id"] == replies[1].json()["id"]
            _refused(replies[-1], 409, "conflict")
            for handle in handles:
                handle.shutdown.set()
    finally:
        await delete_prefix(prefix)


async def test_metadata_is_returned_exactly_as_given(upstream: FakeUpstream) -> None:
    upstream.script(streams(["a"]), streams(["b"]))
    async with served(upstream) as server:
        client = server.client()
        given = await in_thread(lambda: client.responses.create(model="m", input="x", metadata={"bar": "x"}))
        assert given.metadata == {"bar": "x"}
        none = await in_thread(lambda: client.responses.create(model="m", input="x"))
        assert none.metadata == {}
        assert (await in_thread(lambda: client.responses.retrieve(given.id))).metadata == {"bar": "x"}


def _two_calls() -> Any:
    return events(
        [
            tool_chunk(0, call_id="call_1", name="calculate", arguments='{"expression": "6*7"}'),
            tool_chunk(1, call_id="call_2", name="calculate", arguments='{"expression": "1+1"}'),
            finish_chunk("tool_calls"),
            "[DONE]",
        ]
    )


async def test_max_tool_calls_caps_the_server_tool_calls_of_a_response(upstream: FakeUpstream) -> None:
    upstream.script(_two_calls(), streams(["done"]))
    async with served(upstream) as server:
        client = server.client()
        tools: Any = [{"type": "function", "name": "calculate"}]
        response = await in_thread(
            lambda: client.responses.create(model="m", input="x", tools=tools, max_tool_calls=1)
        )
        assert response.status == "completed" and response.max_tool_calls == 1
        outputs = [item for item in response.output if item.type == "function_call_output"]
        assert len(outputs) == 2 and outputs[0].output == "42"
        assert "max_tool_calls" in outputs[1].output  # the second call did not run; the model is told
        second = upstream.requests[1]
        assert [m["content"] for m in second["messages"] if m["role"] == "tool"] == ["42", outputs[1].output]
        assert second["tool_choice"] == "none"  # no call left: the model answers in text
        assert "max_tool_calls" not in upstream.requests[0]  # a job's parameter, not the model's
        with pytest.raises(openai.BadRequestError) as bad:
            await in_thread(lambda: client.responses.create(model="m", input="x", max_tool_calls=-1))
        assert bad.value.status_code == 400 and "max_tool_calls" in bad.value.message


async def test_max_tool_calls_is_also_a_job_param_over_websocket(upstream: FakeUpstream) -> None:
    upstream.script(_two_calls(), streams(["done"]))
    async with served(upstream) as server:
        async with raw_client(server.ws_url) as ws:
            await ws.hello()
            started = await ws.request(
                "job.start",
                thread_id="t",
                message_id="m1",
                model="m",
                messages=[{"role": "user", "content": "x"}],
                tools=["calculate"],
                params={"max_tool_calls": 0},
                watch=True,
            )
            assert started["type"] == "job.started", started
            batches = await ws.events_until_terminal(started["job"]["job_id"])
            results = [ev for b in batches for ev in b["events"] if ev["kind"] == "tool_result"]
            assert len(results) == 2 and all(
                r["is_error"] and "max_tool_calls" in r["output"] for r in results
            )
            refused = await ws.request("job.start", **{**_start(), "params": {"max_tool_calls": "2"}})
            assert refused["type"] == "error" and refused["code"] == "bad_request"


def _start() -> dict[str, Any]:
    return {
        "thread_id": "t",
        "message_id": "m2",
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
    }


__all__ = ["Server"]
