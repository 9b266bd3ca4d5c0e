"""``job.start`` with ``previous_job_id``: the server builds the conversation from the
thread's stored job, so a client sends only the new message, on any instance."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from backstream.client import open_client
from backstream.protocol.errors import BadRequestError, NotFoundError
from backstream.runtime.server.serve import ServeHandle, serve
from backstream.runtime.server.settings import ServeSettings
from tests.conftest import delete_prefix, redis_url, require_redis
from tests.upstream_server import FakeUpstream, streams


@asynccontextmanager
async def two_instances_on_redis(upstream: FakeUpstream) -> AsyncIterator[list[ServeHandle]]:
    from backstream.runtime.stores.redis import RedisStore

    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    try:
        async with trio.open_nursery() as nursery:
            handles: list[ServeHandle] = []
            for _ in range(2):
                values = ServeSettings.defaults(
                    port=0,
                    http_port=0,
                    token=("tok-alice=alice", "tok-bob=bob"),
                    drain_timeout=0.0,
                    upstream_url=upstream.url,
                    batch_ms=10.0,
                )
                store = RedisStore(redis_url(), prefix=prefix)
                handles.append(
                    await nursery.start(
                        lambda task_status, v=values, s=store: serve(
                            v, store=s, handle_signals=False, announce=lambda _: None, task_status=task_status
                        )
                    )
                )
            yield handles
            for handle in handles:
                handle.shutdown.set()
    finally:
        await delete_prefix(prefix)


def ws_url(handle: ServeHandle) -> str:
    return f"ws://127.0.0.1:{handle.port}/v1"


async def run_to_end(client: Any, **start: Any) -> str:
    started = await client.start_job(model="m", **start)
    async with client.watch(started.job.job_id) as batches:
        async for _ in batches:
            pass
    return str(started.job.job_id)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


async def test_a_thread_continued_by_previous_job_id_on_another_instance(upstream: FakeUpstream) -> None:
    upstream.script(
        streams(["Hi ", "Ann"]), streams(["You are ", "Ann"]), streams(["Bye"]), streams(["Again"])
    )
    async with two_instances_on_redis(upstream) as (a, b):
        async with open_client(ws_url(a), "tok-alice") as on_a, open_client(ws_url(b), "tok-alice") as on_b:
            first = await run_to_end(
                on_a,
                thread_id="t1",
                message_id="m1",
                messages=[{"role": "system", "content": "be brief"}, user("I am Ann")],
            )
            second = await run_to_end(
                on_b, thread_id="t1", message_id="m2", messages=[user("Who am I?")], previous_job_id=first
            )
            third = await run_to_end(
                on_a, thread_id="t1", message_id="m3", messages=[user("bye")], previous_job_id=second
            )
            assert upstream.requests[2]["messages"] == [
                {"role": "system", "content": "be brief"},  # a job's own system message stays
                user("I am Ann"),
                {"role": "assistant", "content": "Hi Ann"},
                user("Who am I?"),
                {"role": "assistant", "content": "You are Ann"},
                user("bye"),
            ]
            assert (await on_b.get(third, include_content=True)).content == "Bye"
            # Refusals, before anything starts: another thread's job, another user's, one
            # no longer stored (deleted here; expired after its retention alike).
            with pytest.raises(BadRequestError) as other_thread:
                await on_a.start_job(
                    model="m", thread_id="t2", message_id="m4", messages=[user("x")], previous_job_id=first
                )
            assert "thread 't1'" in other_thread.value.message
            async with open_client(ws_url(b), "tok-bob") as bob:
                with pytest.raises(NotFoundError) as not_bobs:
                    await bob.start_job(
                        model="m",
                        thread_id="t1",
                        message_id="m5",
                        messages=[user("x")],
                        previous_job_id=first,
                    )
            assert not_bobs.value.message == f"Previous job with id '{first}' not found."
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{a.http_port}/v1") as http:
                deleted = await http.delete(
                    f"/responses/{first}", headers={"Authorization": "Bearer tok-alice"}
                )
                assert deleted.status_code == 200 and deleted.json()["deleted"] is True
            with pytest.raises(NotFoundError):
                await on_b.start_job(
                    model="m", thread_id="t1", message_id="m6", messages=[user("x")], previous_job_id=first
                )
            # The jobs after it hold the whole conversation: the thread goes on from them.
            last = await run_to_end(
                on_b, thread_id="t1", message_id="m7", messages=[user("again")], previous_job_id=third
            )
            assert [m["content"] for m in upstream.requests[3]["messages"]][-3:] == ["bye", "Bye", "again"]
            # A job is a response: the Responses API continues the same thread on the other instance.
            upstream.script(streams(["over http"]))
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{a.http_port}/v1") as http:
                body = {"model": "m", "input": "and now?", "previous_response_id": last}
                reply = await http.post(
                    "/responses", json=body, headers={"Authorization": "Bearer tok-alice"}
                )
                assert (
                    reply.status_code == 200
                    and reply.json()["output"][0]["content"][0]["text"] == "over http"
                )
            assert [m["content"] for m in upstream.requests[4]["messages"]][-3:] == [
                "again",
                "Again",
                "and now?",
            ]
            assert (await on_b.get(reply.json()["id"])).job.thread_id == "t1"
            assert len(upstream.requests) == 5


CLIENT_TOOLS = [
    {
        "type": "function",
        "function": {"name": "getLocation", "parameters": {"type": "object", "properties": {}}},
    }
]


async def test_client_side_tools_over_the_protocol(upstream: FakeUpstream) -> None:
    """``params.client_tools``: the job ends with the client's call open (its ``tool_call``
    logged, no result); the next job of the thread answers it with a ``tool`` message."""
    from tests.test_responses_api import served
    from tests.test_tools import tool_turn

    upstream.script(tool_turn(("call_l", "getLocation", "{}")), streams(["In ", "Paris."]))
    async with served(upstream) as server, open_client(server.ws_url, "tok-alice") as client:
        first = await run_to_end(
            client,
            thread_id="t1",
            message_id="m1",
            messages=[user("where am I?")],
            params={"client_tools": CLIENT_TOOLS},
        )
        info = await client.get(first, include_content=True)
        assert info.job.status == "completed"
        assert [(c.call_id, c.name, c.output) for c in info.tool_calls] == [("call_l", "getLocation", None)]
        with pytest.raises(BadRequestError) as unanswered:
            await client.start_job(
                model="m", thread_id="t1", message_id="m2", messages=[user("well?")], previous_job_id=first
            )
        assert "No tool output found for function call call_l" in unanswered.value.message
        answer = {"role": "tool", "tool_call_id": "call_l", "content": "Paris"}
        second = await run_to_end(
            client, thread_id="t1", message_id="m3", messages=[answer], previous_job_id=first
        )
        assert (await client.get(second, include_content=True)).content == "In Paris."
        sent = upstream.requests[1]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
        assert sent[1]["tool_calls"][0]["id"] == "call_l" and sent[2] == answer
        assert "client_tools" not in upstream.requests[0] and upstream.requests[0]["tools"] == CLIENT_TOOLS
