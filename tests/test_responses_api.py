"""The OpenAI Responses API over HTTP, driven by the official ``openai`` package.

``serve()`` runs in the test's trio run on loopback with a loopback upstream; the
synchronous ``openai`` client runs in a worker thread.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import attrs
import httpx
import openai
import pytest
import trio

from backstream.client import open_client
from backstream.runtime.server.serve import ServeHandle, serve
from backstream.runtime.server.settings import ServeSettings
from tests.upstream_server import FakeUpstream, events, finish_chunk, stall_after, streams, tool_chunk

T = TypeVar("T")
WORDS = [f"w{i} " for i in range(40)]


@attrs.define
class Server:
    handle: ServeHandle

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.handle.http_port}/v1"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.handle.port}/v1"

    def client(self, token: str = "tok-alice") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=token, max_retries=0, timeout=30)


@asynccontextmanager
async def served(upstream: FakeUpstream, **settings: Any) -> AsyncIterator[Server]:
    values: dict[str, Any] = {
        "port": 0,
        "http_port": 0,
        "token": ("tok-alice=alice", "tok-bob=bob"),
        "drain_timeout": 0.0,
        "store": "memory",
        "upstream_url": upstream.url,
        "batch_ms": 10.0,
        **settings,
    }
    async with trio.open_nursery() as nursery:
        handle: ServeHandle = await nursery.start(
            lambda task_status: serve(
                ServeSettings.defaults(**values),
                handle_signals=False,
                announce=lambda _: None,
                task_status=task_status,
            )
        )
        yield Server(handle)
        handle.shutdown.set()


async def _append(replies: list[httpx.Response], reply: Awaitable[httpx.Response]) -> None:
    replies.append(await reply)


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


def deltas(evs: list[Any]) -> str:
    return "".join(e.delta for e in evs if e.type == "response.output_text.delta")


async def test_background_stream_break_and_resume_with_starting_after(upstream: FakeUpstream) -> None:
    upstream.script(streams(WORDS, delay=0.02))
    async with served(upstream) as server:
        client = server.client()

        def first_part() -> tuple[str, list[Any]]:
            seen: list[Any] = []
            stream = client.responses.create(model="m", input="count", background=True, stream=True)
            for event in stream:
                seen.append(event)
                if len([e for e in seen if e.type == "response.output_text.delta"]) == 5:
                    break  # the connection drops mid-answer
            stream.close()
            return seen[0].response.id, seen

        response_id, first = await in_thread(first_part)
        last = first[-1].sequence_number

        def rest() -> list[Any]:
            return list(client.responses.retrieve(response_id, stream=True, starting_after=last))

        second = await in_thread(rest)
        numbers = [e.sequence_number for e in first + second]
        assert numbers == list(range(len(numbers)))  # from 0, contiguous, nothing lost or repeated
        assert second[0].sequence_number == last + 1
        assert [e.type for e in first[:2]] == ["response.created", "response.in_progress"]
        assert second[-1].type == "response.completed"
        assert deltas(first) + deltas(second) == "".join(WORDS)
        assert second[-1].response.output_text == "".join(WORDS)
        # A replay of the whole stream after the end numbers every event the same way.
        replay = await in_thread(lambda: list(client.responses.retrieve(response_id, stream=True)))
        assert [e.to_dict() for e in replay] == [e.to_dict() for e in first + second]
        # And the response object, once completed.
        done = await in_thread(lambda: client.responses.retrieve(response_id))
        assert done.status == "completed" and done.output_text == "".join(WORDS)
        assert done.id == response_id and done.usage is not None and done.usage.output_tokens == len(WORDS)
        assert done.metadata == {}  # as sent: none


async def test_foreground_and_background_create_and_sdk_stream_helper(upstream: FakeUpstream) -> None:
    upstream.script(streams(["Hello", " there"]), streams(["Back", "ground"]), streams(["Hel", "per"]))
    async with served(upstream) as server:
        client = server.client()
        response = await in_thread(
            lambda: client.responses.create(
                model="m", input="hi", instructions="be brief", metadata={"thread_id": "t-9", "k": "v"}
            )
        )
        assert response.status == "completed" and response.output_text == "Hello there"
        assert response.instructions == "be brief" and response.metadata == {"thread_id": "t-9", "k": "v"}
        assert upstream.requests[0]["messages"][0] == {"role": "system", "content": "be brief"}
        started = await in_thread(lambda: client.responses.create(model="m", input="hi", background=True))
        assert started.status in ("in_progress", "completed") and started.background is True

        def wait_done() -> Any:
            while True:
                found = client.responses.retrieve(started.id)
                if found.status not in ("queued", "in_progress"):
                    return found

        assert (await in_thread(wait_done)).output_text == "Background"

        def helper() -> str:
            with client.responses.stream(model="m", input=[{"role": "user", "content": "x"}]) as stream:
                return stream.get_final_response().output_text

        assert await in_thread(helper) == "Helper"  # the SDK's own accumulator accepts the events


async def test_a_workflow_named_as_the_model(upstream: FakeUpstream) -> None:
    """``workflow/<name>`` as the model: the workflow gets the user's message as its input's
    ``ask`` and its content is the response's text; an unknown workflow is a 400."""
    async with served(upstream, workflows=("tests.workflow_samples:WORKFLOWS",)) as server:
        client = server.client()
        response = await in_thread(lambda: client.responses.create(model="workflow/shout", input="hello there"))
        assert response.status == "completed" and response.output_text == "You said: HELLO THERE"
        with pytest.raises(openai.BadRequestError, match="unknown workflow 'nope'"):
            await in_thread(lambda: client.responses.create(model="workflow/nope", input="x"))


async def test_cancel_a_running_response(upstream: FakeUpstream) -> None:
    upstream.script(stall_after(["partial "]))
    async with served(upstream) as server:
        client = server.client()
        started = await in_thread(lambda: client.responses.create(model="m", input="go", background=True))
        with trio.fail_after(10):
            while upstream.client_closes == 0:
                got = await in_thread(lambda: client.responses.retrieve(started.id))
                if got.output_text:
                    break
                await trio.sleep(0.05)
        cancelled = await in_thread(lambda: client.responses.cancel(started.id))
        assert cancelled.status == "cancelled" and cancelled.output_text == "partial "
        with trio.fail_after(5):
            while upstream.client_closes == 0:  # the upstream request was closed
                await trio.sleep(0.02)
        await _check_cancelled_stream_parses(client, started.id)
        again = await in_thread(lambda: client.responses.cancel(started.id))
        assert again.status == "cancelled"  # idempotent


async def _check_cancelled_stream_parses(client: openai.OpenAI, response_id: str) -> None:
    """Both ways the pinned SDK reads a stored response's stream parse every event of a
    cancelled one as a typed event; the last is ``response.incomplete`` (OpenAI has no
    ``response.cancelled`` stream event) whose response says ``cancelled``."""
    from openai.types.responses import ResponseIncompleteEvent, ResponseStreamEvent
    from pydantic import TypeAdapter

    known = TypeAdapter(ResponseStreamEvent)

    def read_both() -> tuple[list[Any], list[Any]]:
        raw = list(client.responses.retrieve(response_id, stream=True))
        with client.responses.stream(response_id=response_id) as stream:
            helped = list(stream)
        return raw, helped

    raw, helped = await in_thread(read_both)
    for seen in (raw, helped):
        assert [e.sequence_number for e in seen] == list(range(len(seen)))
        for event in seen:  # a typed class of the union, not an untyped stand-in
            assert isinstance(event, type(known.validate_python(event.to_dict())))
        assert isinstance(seen[-1], ResponseIncompleteEvent)
        assert seen[-1].response.status == "cancelled" and seen[-1].response.output_text == "partial "
    assert [e.type for e in raw] == [e.type for e in helped]


async def test_tool_loop_with_a_server_tool(upstream: FakeUpstream) -> None:
    upstream.script(
        events(
            [
                tool_chunk(0, call_id="call_1", name="calculate", arguments='{"expression": '),
                tool_chunk(0, arguments='"6*7"}'),
                finish_chunk("tool_calls"),
                "[DONE]",
            ]
        ),
        streams(["The answer is ", "42"]),
    )
    async with served(upstream) as server:
        client = server.client()
        tools: Any = [{"type": "function", "name": "calculate"}]
        evs = await in_thread(
            lambda: list(client.responses.create(model="m", input="6*7?", tools=tools, stream=True))
        )
        final = evs[-1].response
        assert evs[-1].type == "response.completed"
        kinds = [item.type for item in final.output]
        assert kinds == ["function_call", "function_call_output", "message"]
        call, result, _ = final.output
        assert (
            call.name == "calculate"
            and call.call_id == "call_1"
            and json.loads(call.arguments) == {"expression": "6*7"}
        )
        assert result.call_id == "call_1" and result.output == "42"
        assert final.output_text == "The answer is 42"
        assert final.tools[0].name == "calculate"
        assert any(e.type == "response.function_call_arguments.done" for e in evs)
        assert upstream.requests[1]["messages"][-1]["content"] == "42"  # the result went back to the model
        with pytest.raises(openai.BadRequestError) as bad:
            await in_thread(
                lambda: client.responses.create(
                    model="m",
                    input="x",
                    tools=[{"type": "function", "name": "rm_rf"}],  # type: ignore[typeddict-item]
                )
            )
        assert bad.value.status_code == 400 and "rm_rf" in bad.value.message


async def test_another_users_response_is_not_found(upstream: FakeUpstream) -> None:
    async with served(upstream) as server:
        alice, bob = server.client(), server.client("tok-bob")
        created = await in_thread(lambda: alice.responses.create(model="m", input="secret"))
        for call in (
            lambda: bob.responses.retrieve(created.id),
            lambda: bob.responses.cancel(created.id),
            lambda: list(bob.responses.retrieve(created.id, stream=True)),
            lambda: bob.responses.retrieve("resp_does_not_exist"),
        ):
            with pytest.raises(openai.NotFoundError) as missing:
                await in_thread(call)
            assert missing.value.body == {
                "message": "no such job",
                "type": "invalid_request_error",
                "param": None,
                "code": "not_found",
            }
        with pytest.raises(openai.AuthenticationError):
            await in_thread(lambda: server.client("tok-nobody").responses.retrieve(created.id))


def sse_events(lines: list[str]) -> list[tuple[str | None, dict[str, Any]]]:
    """(id, data) of each event in SSE lines."""
    out, event_id = [], None
    for line in lines:
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            out.append((event_id, json.loads(line[6:])))
            event_id = None
    return out


async def test_event_source_resumes_with_last_event_id(upstream: FakeUpstream) -> None:
    upstream.script(streams(WORDS, delay=0.02))
    async with served(upstream) as server:
        client = server.client()
        created = await in_thread(lambda: client.responses.create(model="m", input="x", background=True))
        url = f"{server.base_url}/responses/{created.id}?stream=true"
        async with httpx.AsyncClient(timeout=30) as http:
            first: list[str] = []
            # A browser's EventSource sends no headers of its own choosing: the token is in the query.
            async with http.stream("GET", f"{url}&access_token=tok-alice") as reply:
                assert reply.headers["content-type"].startswith("text/event-stream")
                async for line in reply.aiter_lines():
                    first.append(line)
                    if sum(1 for x in first if '"response.output_text.delta"' in x) == 3:
                        break
            got = sse_events(first)
            last_id = got[-1][0]
            # The id is the offset to resume after the event: its log's epoch and its number.
            assert last_id == f"1_{got[-1][1]['sequence_number']}"
            second: list[str] = []
            headers = {"Authorization": "Bearer tok-alice", "Last-Event-ID": last_id or ""}
            async with http.stream("GET", url, headers=headers) as reply:
                second = [line async for line in reply.aiter_lines()]
        rest = sse_events(second)
        numbers = [data["sequence_number"] for _, data in got + rest]
        assert numbers == list(range(len(numbers)))
        text = "".join(d["delta"] for _, d in got + rest if d["type"] == "response.output_text.delta")
        assert text == "".join(WORDS)
        assert rest[-1][1]["type"] == "response.completed"
        assert all(event_id == f"1_{data['sequence_number']}" for event_id, data in rest)


async def test_capacity_is_a_429_with_retry_after(upstream: FakeUpstream) -> None:
    upstream.script(stall_after(["a"]))
    async with served(upstream, max_jobs_per_user=1) as server:
        client = server.client()
        running = await in_thread(lambda: client.responses.create(model="m", input="x", background=True))
        with pytest.raises(openai.RateLimitError) as limited:
            await in_thread(lambda: client.responses.create(model="m", input="y", background=True))
        assert limited.value.status_code == 429
        assert int(limited.value.response.headers["retry-after"]) >= 1
        assert limited.value.body["code"] == "capacity"  # type: ignore[index]
        await in_thread(lambda: client.responses.cancel(running.id))


async def test_bad_input_is_a_400_in_openai_error_shape(upstream: FakeUpstream) -> None:
    async with served(upstream) as server:
        auth = {"Authorization": "Bearer tok-alice"}
        async with httpx.AsyncClient(base_url=server.base_url, headers=auth) as http:
            cases = [
                ({"model": "m", "input": 5}, "input"),
                ({"input": "x"}, "model"),
                ({"model": "m", "input": "x", "background": "yes"}, "background"),
                ({"model": "m", "input": "x", "conversation": "c"}, "conversation"),
                (
                    {"model": "m", "input": [{"role": "user", "content": [{"type": "input_image"}]}]},
                    "input[0].content",
                ),
            ]
            for body, param in cases:
                reply = await http.post("/responses", json=body)
                assert reply.status_code == 400, body
                error = reply.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}
                assert error["type"] == "invalid_request_error" and error["code"] == "bad_request"
                assert error["param"] == param
            broken = await http.post(
                "/responses", content=b"{not json", headers={"content-type": "application/json"}
            )
            assert broken.status_code == 400 and broken.json()["error"]["code"] == "bad_request"
            huge = await http.post("/responses", json={"model": "m", "input": "x" * (2 * 1024 * 1024)})
            assert huge.status_code == 413
            nowhere = await http.get("/nowhere")
            assert nowhere.status_code == 404 and nowhere.json()["error"]["code"] == "not_found"
            anonymous = await http.post(
                "/responses", json={"model": "m", "input": "x"}, headers={"Authorization": ""}
            )
            assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
            bad_cursor = await http.get("/responses/x?stream=true&starting_after=abc")
            assert bad_cursor.status_code == 400 and bad_cursor.json()["error"]["param"] == "starting_after"


async def test_stream_offsets_are_fenced_by_epoch_and_bare_numbers_still_resume(
    upstream: FakeUpstream,
) -> None:
    upstream.script(streams(WORDS))
    async with served(upstream) as server:
        client = server.client()
        created = await in_thread(lambda: client.responses.create(model="m", input="x", background=True))
        url = f"/responses/{created.id}?stream=true"
        auth = {"Authorization": "Bearer tok-alice"}
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            full = sse_events((await http.get(url, headers=auth)).text.splitlines())
            stale = await http.get(url, headers={**auth, "Last-Event-ID": "2_3"})
            assert stale.status_code == 410 and stale.json()["error"]["code"] == "gone"
            bad = await http.get(url, headers={**auth, "Last-Event-ID": "1_x"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"
            bare = sse_events((await http.get(f"{url}&starting_after=3", headers=auth)).text.splitlines())
            fenced = sse_events(
                (await http.get(url, headers={**auth, "Last-Event-ID": "1_3"})).text.splitlines()
            )
        assert bare == fenced == full[4:]
        assert [event_id for event_id, _ in full] == [f"1_{n}" for n in range(len(full))]


async def test_http_and_websocket_see_the_same_jobs(upstream: FakeUpstream) -> None:
    upstream.script(streams(["over ", "http"]), streams(["over ", "ws"]))
    async with served(upstream) as server:
        client = server.client()
        created = await in_thread(lambda: client.responses.create(model="m", input="x", background=True))
        async with open_client(server.ws_url, "tok-alice") as ws:
            async with ws.watch(created.id) as batches:
                text = "".join([batch.text async for batch in batches])
            assert text == "over http"
            info = await ws.get(created.id, include_content=True)
            assert info.job.status == "completed"
            started = await ws.start_job(
                thread_id="t", message_id="m1", model="m", messages=[{"role": "user", "content": "x"}]
            )
            async with ws.watch(started.job.job_id) as batches:
                async for _ in batches:
                    pass
        over_ws = await in_thread(lambda: client.responses.retrieve(started.job.job_id))
        assert over_ws.status == "completed" and over_ws.output_text == "over ws"
        assert over_ws.metadata == {}  # the thread is the job's, not metadata


async def test_metrics_on_a_port_of_their_own(upstream: FakeUpstream) -> None:
    async with served(upstream, metrics_port=0) as server:
        assert server.handle.metrics_port is not None
        async with httpx.AsyncClient() as http:
            public = f"http://127.0.0.1:{server.handle.http_port}"
            private = f"http://127.0.0.1:{server.handle.metrics_port}"
            assert (await http.get(f"{public}/metrics")).status_code == 404
            assert (await http.get(f"{public}/healthz")).text == "ok\n"
            metrics = (await http.get(f"{private}/metrics")).text
            assert "backstream_jobs_running" in metrics and "backstream_http_streams 0.0" in metrics
            assert "backstream_http_requests_total 2.0" in metrics  # the two on the public port
            assert (await http.get(f"{private}/readyz")).status_code == 200
            assert (await http.post(f"{private}/v1/responses", json={})).status_code == 404


async def test_a_client_that_does_not_read_is_cut_off_and_resumes() -> None:
    """The server keeps at most one write per stream; a reader that stops is cut off after
    ``slow_client_timeout`` and its job goes on. It resumes later from its last event."""
    from backstream import Config, open_runtime
    from backstream.runtime.server.auth import StaticTokens
    from backstream.runtime.server.http_app import HttpApp, HttpLimits
    from backstream.runtime.server.http_server import HttpServer, HttpServerConfig
    from backstream.runtime.server.responses_http import ResponsesApi

    limits = HttpLimits(slow_client_timeout=0.5, send_timeout=1.0, max_unsent_bytes=16 * 1024)
    async with (
        open_runtime(Config(drain_timeout=0, max_output_chars=5_000_000)) as rt,
        trio.open_nursery() as nursery,
    ):
        app = HttpApp(rt, StaticTokens({"tok": "alice"}), limits=limits)
        ResponsesApi(app)
        server = HttpServer(app, HttpServerConfig(socket_send_buffer=16 * 1024), streams=app.peer_streams)
        port = await nursery.start(server.run)
        job = await rt.start_job(
            user="alice",
            thread_id="t",
            message_id="m",
            model="backstream/lorem",
            messages=[{"role": "user", "content": "x"}],
            params={"max_tokens": 20_000, "tokens_per_s": 100_000},
        )
        import socket as stdlib_socket

        sock = trio.socket.socket()
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port))
        request = f"GET /v1/responses/{job.job_id}?stream=true HTTP/1.1\r\nhost: x\r\nauthorization: Bearer tok\r\n\r\n"
        await sock.send(request.encode())
        with trio.fail_after(15):
            while not app.statistics().streams_open:
                await trio.sleep(0.01)
            while app.statistics().streams_open:  # it never reads: the server lets go of the stream
                await trio.sleep(0.05)
        received = b""
        with trio.fail_after(10):
            while chunk := await sock.recv(65536):  # what the kernel held, then the end
                received += chunk
        sock.close()
        assert b"response.completed" not in received
        assert app.statistics().streams_cut == 1
        await rt.wait_idle()
        info = await rt.get_job(job.job_id, user="alice")
        assert info.job.status == "completed"  # the job went on
        last = max(
            int(line[4:].partition("_")[2])  # "<epoch>_<n>"; starting_after takes the bare n
            for line in received.decode(errors="replace").splitlines()
            if line.startswith("id: ")
        )
        async with httpx.AsyncClient(timeout=30) as http:
            reply = await http.get(
                f"http://127.0.0.1:{port}/v1/responses/{job.job_id}?stream=true&starting_after={last}",
                headers={"authorization": "Bearer tok"},
            )
        rest = sse_events(reply.text.splitlines())
        assert rest[0][1]["sequence_number"] == last + 1 and rest[-1][1]["type"] == "response.completed"
        server.stop_accepting()


def test_sigterm_ends_streams_and_drains_then_the_response_is_incomplete(tmp_path: Any) -> None:
    """A real process: SIGTERM ends open streams at once (clients resume elsewhere), drains
    jobs, exits; after a restart the interrupted job reads as an incomplete response."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from bench._procs import free_port, wait_for_port

    port, http_port = free_port(), free_port()
    command = [
        sys.executable,
        "-m",
        "backstream",
        "serve",
        "--port",
        str(port),
        "--http-port",
        str(http_port),
        "--drain-timeout",
        "1",
        "--store",
        f"sqlite:///{tmp_path}/jobs.db",
        "--continuation",
        "backstream/*=interrupt",  # the job ends at the drain, rather than left for the next run
    ]
    env = {**os.environ, "BACKSTREAM_TOKENS": "tok=alice"}
    server = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(http_port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="tok", max_retries=0)
        stream = client.responses.create(
            model="backstream/lorem", input="x", max_output_tokens=10_000, background=True, stream=True
        )
        seen = []
        for event in stream:
            seen.append(event)
            if event.type == "response.output_text.delta":
                break
        t0 = time.monotonic()
        server.send_signal(signal.SIGTERM)
        rest = list(stream)  # the server ends the stream: no terminal event, no error
        assert not any(e.type.startswith("response.complete") for e in rest)
        assert server.wait(timeout=15) == 0
        assert time.monotonic() - t0 < 8
        response_id = seen[0].response.id
        server = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
        wait_for_port(http_port)
        found = client.responses.retrieve(response_id)
        assert found.status == "incomplete" and found.incomplete_details is not None
        assert found.incomplete_details.reason == "interrupted" and found.output_text  # content kept
        replay = list(client.responses.retrieve(response_id, stream=True))
        assert replay[-1].type == "response.incomplete"
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0
    finally:
        if server.poll() is None:
            server.kill()


async def test_the_guides_sdk_example_runs(upstream: FakeUpstream) -> None:
    import pathlib
    import re
    import subprocess
    import sys

    guide = (pathlib.Path(__file__).parent.parent / "docs" / "http-apis.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", guide, flags=re.S) if "from openai" in b)
    async with served(upstream, token=("tokA=alice",)) as server:
        code = example.replace("127.0.0.1:8766", f"127.0.0.1:{server.handle.http_port}")
        result = await trio.to_thread.run_sync(
            lambda: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        )
    assert result.returncode == 0, result.stderr
    assert "completed 'hello there'" in result.stdout and "response.completed" in result.stdout


@pytest.mark.redis
async def test_a_stream_resumes_on_another_instance(upstream: FakeUpstream) -> None:
    """Two servers share a Redis store: a stream started on one resumes on the other with the
    same numbering (it is a function of the stored log)."""
    from tests.test_thread_history import two_instances_on_redis

    upstream.script(streams(WORDS, delay=0.02))
    async with two_instances_on_redis(upstream) as handles:
        a, b = (Server(h).client() for h in handles)

        def first_part() -> list[Any]:
            seen: list[Any] = []
            with a.responses.create(model="m", input="x", background=True, stream=True) as stream:
                for event in stream:
                    seen.append(event)
                    if event.type == "response.output_text.delta" and len(seen) > 8:
                        break
            return seen

        first = await in_thread(first_part)
        response_id, last = first[0].response.id, first[-1].sequence_number
        rest = await in_thread(
            lambda: list(b.responses.retrieve(response_id, stream=True, starting_after=last))
        )
        numbers = [e.sequence_number for e in first + rest]
        assert numbers == list(range(len(numbers)))
        assert deltas(first) + deltas(rest) == "".join(WORDS)
        assert rest[-1].type == "response.completed"
        whole_on_a = await in_thread(lambda: list(a.responses.retrieve(response_id, stream=True)))
        assert [e.to_dict() for e in whole_on_a] == [e.to_dict() for e in first + rest]


async def test_rate_limit_idempotency_key_and_cors(upstream: FakeUpstream) -> None:
    async with served(upstream, allow_origin=("https://app.example",)) as server:
        auth = {"Authorization": "Bearer tok-alice"}
        async with httpx.AsyncClient(base_url=server.base_url, headers=auth) as http:
            body = {"model": "m", "input": "x"}
            once = await http.post("/responses", json=body, headers={"Idempotency-Key": "k1"})
            again = await http.post("/responses", json=body, headers={"Idempotency-Key": "k1"})
            other = await http.post("/responses", json=body)
            assert once.json()["id"] == again.json()["id"] != other.json()["id"]
            preflight = await http.options(
                "/responses",
                headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
            )
            assert preflight.status_code == 204
            assert preflight.headers["access-control-allow-origin"] == "https://app.example"
            assert "authorization" in preflight.headers["access-control-allow-headers"]
            foreign = await http.get("/responses/x", headers={"Origin": "https://evil.example"})
            assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "forbidden"
            # Burst 40, then 20/s: bursts of 50 at once outrun the refill however slow the
            # machine (a few bursts at most; a limit that never comes fails the test).
            replies: list[httpx.Response] = []
            for _ in range(10):
                async with trio.open_nursery() as burst:
                    for _ in range(50):
                        burst.start_soon(lambda: _append(replies, http.get("/responses/nope")))
                if any(r.status_code == 429 for r in replies):
                    break
            statuses = {r.status_code for r in replies}
            assert statuses == {404, 429}
            limited = next(r for r in replies if r.status_code == 429)
            assert (
                limited.json()["error"]["code"] == "rate_limited" and int(limited.headers["retry-after"]) >= 1
            )
            assert (
                await http.get("/responses/nope", headers={"Authorization": "Bearer tok-bob"})
            ).status_code == 404


async def test_starting_after_past_the_end_of_a_finished_response_is_a_400(upstream: FakeUpstream) -> None:
    upstream.script(streams(["a", "b"]), stall_after(["partial "]))
    async with served(upstream) as server:
        client = server.client()
        done = await in_thread(lambda: client.responses.create(model="m", input="x"))
        url = f"/responses/{done.id}?stream=true"
        auth = {"Authorization": "Bearer tok-alice"}
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            last = len(sse_events((await http.get(url, headers=auth)).text.splitlines())) - 1
            at_end = await http.get(f"{url}&starting_after={last}", headers=auth)
            assert at_end.status_code == 200 and sse_events(at_end.text.splitlines()) == []
            for query, header, param in (
                (f"&starting_after={last + 1}", {}, "starting_after"),
                ("&starting_after=999", {}, "starting_after"),
                ("", {"Last-Event-ID": f"1_{last + 1}"}, "Last-Event-ID"),
            ):
                past = await http.get(url + query, headers={**auth, **header})
                assert past.status_code == 400, (query, header)
                error = past.json()["error"]
                assert error["code"] == "bad_request" and error["param"] == param
                assert error["type"] == "invalid_request_error" and str(last) in error["message"]
            stale = await http.get(url, headers={**auth, "Last-Event-ID": f"2_{last + 5}"})
            assert stale.status_code == 410  # another epoch is gone, wherever it points
            # A running response with a cursor ahead of what exists waits for it.
            running = await in_thread(lambda: client.responses.create(model="m", input="y", background=True))
            ahead = f"/responses/{running.id}?stream=true&starting_after=50"
            async with http.stream("GET", ahead, headers=auth) as waiting:
                assert waiting.status_code == 200
                with trio.move_on_after(0.3) as quiet:
                    async for line in waiting.aiter_lines():
                        assert line.startswith(":") or not line  # keep-alive at most
                assert quiet.cancelled_caught
            await in_thread(lambda: client.responses.cancel(running.id))
