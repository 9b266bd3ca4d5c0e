"""Per-user caps on what a user holds open: HTTP requests waiting on jobs (event streams and
foreground creates) and WebSocket connections (``/v1`` and ``/v1/ai-sdk``), on one instance
and across instances sharing a Redis prefix."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from backstream import Config, Runtime, Store, open_runtime
from backstream.client import open_client
from backstream.protocol.errors import RateLimitedError
from backstream.runtime.server.auth import StaticTokens
from backstream.runtime.server.frontdoor import FrontDoor, FrontDoorConfig
from backstream.runtime.server.http_app import HttpApp, HttpLimits
from backstream.runtime.server.http_server import HttpServer, HttpServerConfig
from backstream.runtime.server.metrics import metrics_text
from backstream.runtime.server.responses_http import ResponsesApi
from backstream.runtime.server.session import ConnectionLimits
from backstream.runtime.stores.redis import RedisStore
from tests.conftest import delete_prefix, redis_url, require_redis
from tests.upstream_server import FakeUpstream, stall_after

TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}
ALICE = {"authorization": "Bearer tok-alice"}
CREATE = {"model": "m", "input": "hi"}


@attrs.define
class Instance:
    runtime: Runtime
    app: HttpApp
    door: FrontDoor
    http_port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def ws_url(self, path: str = "/v1") -> str:
        return f"ws://127.0.0.1:{self.door.port}{path}"


@asynccontextmanager
async def instance(
    upstream: FakeUpstream, *, store: Store | None = None, max_streams: int = 64, max_connections: int = 32
) -> AsyncIterator[Instance]:
    """A runtime with its WebSocket front door and HTTP app, whose every job stalls upstream."""
    upstream.default = stall_after(["x"])
    config = Config(drain_timeout=0, upstream_url=upstream.url, max_jobs=300, max_jobs_per_user=300)
    limits = HttpLimits(max_streams_per_user=max_streams, rate_per_s=1000, rate_burst=1000)
    auth = StaticTokens(TOKENS)
    async with open_runtime(config, store=store) as rt, trio.open_nursery() as nursery:
        door = FrontDoor(
            rt,
            auth,
            FrontDoorConfig(port=0, limits=ConnectionLimits(max_connections_per_user=max_connections)),
        )
        await nursery.start(door.run)
        app = HttpApp(rt, auth, limits=limits)
        render = metrics_text(rt, door, app)

        async def metrics() -> tuple[int, str, bytes]:
            await trio.lowlevel.checkpoint()
            return 200, "text/plain", render()

        app.status_routes["/metrics"] = metrics
        ResponsesApi(app)
        port = await nursery.start(HttpServer(app, HttpServerConfig(), streams=app.peer_streams).run)
        yield Instance(rt, app, door, port)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def redis_prefix() -> AsyncIterator[str]:
    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    try:
        yield prefix
    finally:
        await delete_prefix(prefix)


def http_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=60, limits=httpx.Limits(max_connections=300, max_keepalive_connections=0)
    )


async def wait_for(predicate: Any, seconds: float = 20) -> None:
    with trio.fail_after(seconds):
        while not predicate():
            await trio.sleep(0.02)


def assert_refused_429(reply: httpx.Response, what: str) -> None:
    assert reply.status_code == 429, reply.text
    error = reply.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limited"
    assert error["message"] == f"at most {what} open at once per user"
    assert reply.headers["retry-after"] == "1"


# -- HTTP: every request that waits on a job holds a stream ------------------------------------


async def test_foreground_creates_that_wait_count_as_streams(upstream: FakeUpstream) -> None:
    async with instance(upstream, max_streams=100) as one, http_client() as http:
        async with trio.open_nursery() as waiting:
            for _ in range(100):  # foreground creates: each waits for its response
                waiting.start_soon(partial(http.post, f"{one.base}/v1/responses", json=CREATE, headers=ALICE))
            await wait_for(lambda: one.app.statistics().streams_open == 100)
            metrics = (await http.get(f"{one.base}/metrics")).text
            assert "backstream_http_streams 100.0" in metrics
            started = one.runtime.statistics().jobs.started_total
            # The 101st request that would wait is refused before its job starts: a foreground
            # create, a streamed create, a stream of an existing response.
            assert_refused_429(
                await http.post(f"{one.base}/v1/responses", json=CREATE, headers=ALICE), "100 streams"
            )
            streamed = {**CREATE, "stream": True}
            assert_refused_429(
                await http.post(f"{one.base}/v1/responses", json=streamed, headers=ALICE), "100 streams"
            )
            assert one.runtime.statistics().jobs.started_total == started
            background = await http.post(
                f"{one.base}/v1/responses", json={**CREATE, "background": True}, headers=ALICE
            )
            assert background.status_code == 200  # it does not wait: no stream held
            job_id = background.json()["id"]
            assert_refused_429(
                await http.get(f"{one.base}/v1/responses/{job_id}?stream=true", headers=ALICE), "100 streams"
            )
            bobs = {"authorization": "Bearer tok-bob"}
            async with http.stream("POST", f"{one.base}/v1/responses", json=streamed, headers=bobs) as bob:
                assert bob.status_code == 200  # another user's streams count apart
            waiting.cancel_scope.cancel()  # the clients leave: their streams are let go
        await wait_for(lambda: one.app.statistics().streams_open == 0)
        async with http.stream("GET", f"{one.base}/v1/responses/{job_id}?stream=true", headers=ALICE) as sse:
            assert sse.status_code == 200
            assert one.app.statistics().streams_open == 1


# -- WebSocket: connections per user ------------------------------------------------------------


async def hello(ws: WebSocketConnection, token: str = "tok-alice") -> dict[str, Any]:
    await ws.send_message(json.dumps({"type": "hello", "id": "h", "protocol": 1, "token": token}))
    with trio.fail_after(10):
        return json.loads(await ws.get_message())  # type: ignore[no-any-return]


async def closed_with(ws: WebSocketConnection) -> tuple[int, str | None]:
    with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
        while True:
            await ws.get_message()
    reason = closed.value.reason
    assert reason is not None
    return reason.code, reason.reason


async def assert_v1_refused(url: str) -> None:
    async with open_websocket_url(url) as ws:
        refusal = await hello(ws)
        assert refusal == {
            "type": "error",
            "id": "h",
            "code": "rate_limited",
            "message": "at most 2 connections open at once per user",
        }
        assert await closed_with(ws) == (4409, "at most 2 connections open at once per user")


async def assert_ai_sdk_refused(url: str) -> None:
    async with open_websocket_url(f"{url}?token=tok-alice") as ws:
        await ws.send_message("{}")  # the AI SDK's transport sends its request at once
        assert await closed_with(ws) == (4409, "at most 2 connections open at once per user")


async def test_connections_per_user_on_v1_and_ai_sdk_together(upstream: FakeUpstream) -> None:
    async with instance(upstream, max_connections=2) as one:
        async with open_websocket_url(one.ws_url()) as first:
            assert (await hello(first))["type"] == "welcome"
            async with open_websocket_url(f"{one.ws_url('/v1/ai-sdk')}?token=tok-alice") as second:
                await wait_for(lambda: one.runtime.seats.count("connections") == 2)
                await assert_v1_refused(one.ws_url())
                await assert_ai_sdk_refused(one.ws_url("/v1/ai-sdk"))
                async with open_websocket_url(one.ws_url()) as bobs:
                    assert (await hello(bobs, "tok-bob"))["type"] == "welcome"  # users count apart
                with pytest.raises(RateLimitedError, match="at most 2 connections"):
                    async with open_client(one.ws_url(), "tok-alice"):
                        pass
                await second.aclose()
                async with open_client(one.ws_url(), "tok-alice") as client:  # a seat came free
                    await client.list_jobs()
                    await assert_ai_sdk_refused(one.ws_url("/v1/ai-sdk"))
        await wait_for(lambda: one.runtime.seats.count("connections") == 0)


# -- across instances on one Redis prefix ---------------------------------------------------------


async def test_both_caps_hold_across_instances_on_one_redis(upstream: FakeUpstream) -> None:
    async with redis_prefix() as prefix, http_client() as http:
        stores = [RedisStore(redis_url(), prefix=prefix) for _ in range(2)]
        async with (
            instance(upstream, store=stores[0], max_streams=2, max_connections=2) as one,
            instance(upstream, store=stores[1], max_streams=2, max_connections=2) as two,
        ):
            async with trio.open_nursery() as waiting:
                waiting.start_soon(partial(http.post, f"{one.base}/v1/responses", json=CREATE, headers=ALICE))
                streamed = {**CREATE, "stream": True}
                waiting.start_soon(
                    partial(http.post, f"{two.base}/v1/responses", json=streamed, headers=ALICE)
                )
                await wait_for(
                    lambda: one.app.statistics().streams_open == 1 and two.app.statistics().streams_open == 1
                )
                for each in (one, two):
                    reply = await http.post(f"{each.base}/v1/responses", json=CREATE, headers=ALICE)
                    assert_refused_429(reply, "2 streams")
                waiting.cancel_scope.cancel()
            await wait_for(lambda: one.app.statistics().streams_open + two.app.statistics().streams_open == 0)
            async with open_websocket_url(one.ws_url()) as first:
                assert (await hello(first))["type"] == "welcome"
                async with open_websocket_url(f"{two.ws_url('/v1/ai-sdk')}?token=tok-alice"):
                    await wait_for(lambda: two.runtime.seats.count("connections") == 1)
                    await assert_v1_refused(two.ws_url())
                    await assert_ai_sdk_refused(one.ws_url("/v1/ai-sdk"))
                # Let go of on one instance, taken on the other.
                async with open_websocket_url(two.ws_url()) as again:
                    assert (await hello(again))["type"] == "welcome"


async def test_the_python_client_backs_off_while_its_users_connections_are_all_open(
    upstream: FakeUpstream,
) -> None:
    async with instance(upstream, max_connections=1) as one:
        async with open_client(one.ws_url(), "tok-alice", reconnect_base=0.05, reconnect_max=0.2) as client:
            await client.list_jobs()
            one.door.close_all(1012, "restarting")  # the client's connection drops...
            await wait_for(lambda: one.runtime.seats.count("connections") == 0)
            async with open_websocket_url(one.ws_url()) as other:  # ...and another takes the seat
                assert (await hello(other))["type"] == "welcome"
                async with trio.open_nursery() as nursery:
                    listed = trio.Event()

                    async def list_jobs() -> None:
                        await client.list_jobs()  # reconnects: refused 4409, retried after backoff
                        listed.set()

                    nursery.start_soon(list_jobs)
                    await trio.sleep(0.6)
                    assert not listed.is_set()
                    await other.aclose()
                    with trio.fail_after(5):
                        await listed.wait()
            assert client.reconnects == 1


def test_the_caps_are_settings_of_serve(tmp_path: Path) -> None:
    from backstream.runtime.server.serve import front_door_config
    from backstream.runtime.server.settings import load_settings
    from tests.test_serve_settings import _parser

    defaults = load_settings(_parser().parse_args([]), env={})
    assert (defaults.max_connections_per_user, defaults.max_streams_per_user) == (32, 64)
    assert front_door_config(defaults).limits.max_connections_per_user == 32
    flag = load_settings(_parser().parse_args(["--max-connections-per-user", "3"]), env={})
    assert front_door_config(flag).limits.max_connections_per_user == 3
    env = load_settings(_parser().parse_args([]), env={"BACKSTREAM_MAX_STREAMS_PER_USER": "5"})
    assert env.max_streams_per_user == 5
    config = tmp_path / "serve.toml"
    config.write_text("max_connections_per_user = 7\n")
    assert (
        load_settings(_parser().parse_args(["--config", str(config)]), env={}).max_connections_per_user == 7
    )
    with pytest.raises(
        ValueError, match=r"--max-streams-per-user \(BACKSTREAM_MAX_STREAMS_PER_USER\): 0 must"
    ):
        front_door_config(load_settings(_parser().parse_args(["--max-streams-per-user", "0"]), env={}))
