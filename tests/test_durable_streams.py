"""Durable streams beyond the conformance suite: the official Python and TypeScript clients,
isolation between users and the bounds of capability URLs, a job read as a stream from every
offset, and a SQLite server killed with SIGKILL mid-writes."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import trio
from durable_streams import DurableStream

from backstream.protocol.events import Batch, LogEvent
from backstream.protocol.projections import UIChunkProjection
from backstream.runtime.server.auth import mint_jwt
from backstream.runtime.server.serve import ServeHandle, serve
from backstream.runtime.server.settings import ServeSettings
from backstream.runtime.stores.memory import MemoryStore
from tests.node_tools import require_node
from tests.redis_servers import RedisNode, require_redis_binaries
from tests.streams_server import PACKAGE, TOKEN, stop, streams_server

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_the_python_client_writes_and_reads(tmp_path: Path) -> None:
    with streams_server("memory", tmp_path) as server:
        url = f"{server.base}/v1/streams/py/one"
        with DurableStream.create(url, content_type="application/json", headers=AUTH) as handle:
            handle.append({"n": 1})
            handle.append({"n": 2})
            assert handle.stream(live=False).read_json() == [{"n": 1}, {"n": 2}]
            tail = handle.head().offset
            threading.Timer(0.3, lambda: handle.append({"n": 3})).start()
            with handle.stream(offset=tail, live="long-poll") as live:
                got = next(iter(live.iter_json()))
            assert got == {"n": 3}


def test_the_typescript_client_writes_and_reads(tmp_path: Path) -> None:
    node = require_node(PACKAGE, "@durable-streams/client")
    with streams_server("memory", tmp_path) as server:
        url = server.capability_base("node/") + "/node/one"
        done = subprocess.run(
            [node, "client-check.mjs", url], cwd=PACKAGE, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        read = json.loads(done.stdout)
        assert read["caughtUp"] == [{"n": 1}, {"n": 2}]
        assert read["live"] == [{"n": 1}, {"n": 2}, {"n": 3}]
        # What the TypeScript client wrote, read over plain HTTP with the bearer token.
        plain = httpx.get(f"{server.base}/v1/streams/node/one?offset=-1", headers=AUTH)
        assert plain.json() == [{"n": 1}, {"n": 2}, {"n": 3}]
        assert plain.headers["stream-next-offset"] == read["offset"]


def test_users_and_capabilities_are_bounded(tmp_path: Path) -> None:
    with streams_server("memory", tmp_path, tokens=("other=bob",)) as server:
        base = f"{server.base}/v1/streams"
        assert httpx.put(f"{base}/mine", headers=AUTH, content=b"secret").status_code == 201
        bob = {"Authorization": "Bearer other"}
        # Bob's "mine" is another stream: alice's is invisible to him.
        assert httpx.get(f"{base}/mine", headers=bob).status_code == 404
        assert httpx.put(f"{base}/mine", headers=bob, content=b"bob's").status_code == 201
        assert httpx.get(f"{base}/mine", headers=AUTH).content == b"secret"
        assert httpx.get(f"{base}/mine").status_code == 401
        reader = server.capability_base("mi", write=False)
        assert httpx.get(f"{reader}/mine").content == b"secret"
        assert (
            httpx.post(f"{reader}/mine", content=b"x", headers={"content-type": "text/plain"}).status_code
            == 403
        )
        assert httpx.get(f"{reader}/other").status_code == 404  # outside its prefix
        forged = reader[:-3] + ("AAA" if not reader.endswith("AAA") else "BBB")
        assert httpx.get(f"{forged}/mine").status_code == 401
        minted = httpx.post(
            f"{server.base}/v1/stream-capabilities", headers=AUTH, json={"prefix": "", "ttl_s": 1}
        ).json()
        short = minted["path"]
        assert httpx.get(f"{server.base}{short}mine").status_code == 200  # it lives 1 s at least
        time.sleep(max(minted["expires_at"] - time.time(), 0) + 0.05)
        assert httpx.get(f"{server.base}{short}mine").status_code == 401
        # A job's stream is read-only.
        refused = httpx.post(
            f"{base}/jobs/j_x", headers={**AUTH, "content-type": "application/json"}, content=b"1"
        )
        assert refused.status_code == 405
        assert httpx.put(f"{base}/jobs/j_x", headers=AUTH).status_code == 405


def test_jwts_and_the_cookie_from_an_allowed_origin_authenticate(tmp_path: Path) -> None:
    secret = "a-jwt-secret-of-at-least-thirty-two-bytes"
    page = "http://app.example"
    args = ("--auth-cookie", "bs_token", "--allow-origin", page)
    with streams_server("memory", tmp_path, args=args, BACKSTREAM_JWT_SECRET=secret) as server:
        url = f"{server.base}/v1/streams/by-jwt"
        jwt = {"Authorization": f"Bearer {mint_jwt(secret, 'carol')}"}
        assert httpx.put(url, headers=jwt, content=b"hi").status_code == 201
        cookie = {"Cookie": f"bs_token={mint_jwt(secret, 'carol')}"}
        from_page = httpx.get(url, headers={**cookie, "Origin": page})
        assert from_page.content == b"hi" and from_page.headers["access-control-allow-origin"] == page
        # A cookie counts only from a listed Origin: another site, or none, is refused.
        assert httpx.get(url, headers={**cookie, "Origin": "http://evil.example"}).status_code == 403
        assert httpx.get(url, headers=cookie).status_code == 403
        assert httpx.get(url, headers=AUTH).status_code == 404  # the static token's user is another


def _expected_chunks(job_id: str, events: list[LogEvent]) -> list[object]:
    """The job's log through the AI SDK endpoint's translation, computed here."""
    projection = UIChunkProjection(job_id)
    projection.begin(-1)
    return list(projection.project(Batch(job_id, 1, 1, events[-1].seq, tuple(events))))


async def test_a_jobs_stream_from_every_offset_equals_its_log() -> None:
    store = MemoryStore()
    settings = ServeSettings.defaults(
        port=0, http_port=0, token=(f"{TOKEN}=alice",), store="memory", drain_timeout=0.0
    )
    async with trio.open_nursery() as nursery:
        handle: ServeHandle = await nursery.start(
            lambda task_status: serve(
                settings, store=store, handle_signals=False, announce=lambda _: None, task_status=task_status
            )
        )
        base = f"http://127.0.0.1:{handle.http_port}"
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=30) as http:
            body = {"model": "backstream/lorem", "input": "write", "background": True}
            created = await http.post("/v1/responses", json=body)
            job_id = created.json()["id"]
            path = f"/v1/streams/jobs/{job_id}"
            assert created.headers["link"] == f'<{path}>; rel="durable-stream"'
            # Live over SSE until the stream closes: the whole answer as it was written.
            live: list[object] = []
            async with http.stream("GET", path, params={"offset": "-1", "live": "sse"}) as sse:
                event = ""
                async for line in sse.aiter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:") and event == "data":
                        live += json.loads(line[5:])
            whole = await http.get(path, params={"offset": "-1"})
            assert whole.headers["stream-closed"] == "true"
            chunks = whole.json()
            assert chunks == live and chunks[0]["type"] == "start" and chunks[-1]["type"] == "finish"
            events = await store.read(job_id, 0, 100_000)
            assert chunks == _expected_chunks(job_id, list(events))
            epoch = whole.headers["stream-next-offset"].split("_")[0]
            for count in range(len(chunks) + 1):
                offset = f"{epoch}_{count:016d}"
                part = await http.get(path, params={"offset": offset})
                assert part.json() == chunks[count:], count
            tail = whole.headers["stream-next-offset"]
            at_end = await http.get(path, params={"offset": tail, "live": "long-poll"})
            assert at_end.status_code == 204 and at_end.headers["stream-closed"] == "true"
            head = await http.head(path)
            assert head.headers["stream-next-offset"] == tail and head.headers["stream-closed"] == "true"
            stale = await http.get(path, params={"offset": f"{int(epoch) + 1:016d}_0000000000000000"})
            assert stale.status_code == 410
            text = "".join(c["delta"] for c in chunks if c["type"] == "text-delta")
            stored = (await http.get(f"/v1/responses/{job_id}")).json()
            assert text == stored["output"][0]["content"][0]["text"]
        handle.shutdown.set()


def test_sqlite_keeps_every_acknowledged_append_through_kill_9(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/streams.db"
    acknowledged: list[int] = []
    with streams_server(store, tmp_path) as server:
        url = f"{server.base}/v1/streams/durable"
        assert httpx.put(url, headers={**AUTH, "content-type": "application/json"}).status_code == 201

        def write() -> None:
            with httpx.Client(headers={**AUTH, "content-type": "application/json"}, timeout=5) as http:
                for n in range(100_000):
                    try:
                        reply = http.post(url, content=json.dumps({"n": n}))
                    except httpx.HTTPError:
                        return
                    if reply.status_code != 204:
                        return
                    acknowledged.append(n)

        writer = threading.Thread(target=write)
        writer.start()
        while len(acknowledged) < 200:
            time.sleep(0.01)
        stop(server, signal.SIGKILL)
        writer.join()
    with streams_server(store, tmp_path) as again:
        kept = httpx.get(f"{again.base}/v1/streams/durable?offset=-1", headers=AUTH).json()
    values = [item["n"] for item in kept]
    assert values[: len(acknowledged)] == acknowledged  # in order, none lost
    assert len(values) <= len(acknowledged) + 1  # at most the one in flight at the kill


@pytest.mark.redis
def test_two_instances_on_redis_share_streams_and_wake_each_others_readers(tmp_path: Path) -> None:
    require_redis_binaries()
    redis = RedisNode(tmp_path).start()
    try:
        url = f"redis://127.0.0.1:{redis.port}/0"
        with (
            streams_server(url, tmp_path, long_poll_s=10) as one,
            streams_server(url, tmp_path, long_poll_s=10) as two,
        ):
            headers = {**AUTH, "content-type": "text/plain"}
            assert (
                httpx.put(f"{one.base}/v1/streams/shared", headers=headers, content=b"a").status_code == 201
            )
            assert (
                httpx.put(f"{two.base}/v1/streams/shared", headers=headers, content=b"a").status_code == 200
            )
            tail = httpx.head(f"{two.base}/v1/streams/shared", headers=AUTH).headers["stream-next-offset"]
            threading.Timer(
                0.5, lambda: httpx.post(f"{one.base}/v1/streams/shared", headers=headers, content=b"b")
            ).start()
            started = time.monotonic()
            polled = httpx.get(
                f"{two.base}/v1/streams/shared",
                params={"offset": tail, "live": "long-poll"},
                headers=AUTH,
                timeout=20,
            )
            assert polled.status_code == 200 and polled.content == b"b"
            # Woken by the announcement of the other instance's write (0.5 s in), before the
            # first poll (1 s) and far before the timeout (10 s).
            assert time.monotonic() - started < 0.9
    finally:
        redis.kill()


def test_rates_and_sizes_are_limited_per_user(tmp_path: Path) -> None:
    with streams_server("memory", tmp_path, BACKSTREAM_STREAMS_RATE_PER_S="2") as server:
        url = f"{server.base}/v1/streams/limited"
        with httpx.Client(headers={**AUTH, "content-type": "application/octet-stream"}, timeout=30) as http:
            assert http.put(url).status_code == 201
            # A body past --max-message-bytes: a 413 the client reads (the rest of the body is
            # read and dropped), on a connection that goes on.
            too_large = http.post(url, content=b"x" * (2 * 1024 * 1024))
            assert too_large.status_code == 413 and "connection" not in too_large.headers
            statuses = [http.head(url).status_code for _ in range(6)]
            assert statuses[0] == 200 and statuses[-1] == 429  # a burst of twice the rate, then 429
            time.sleep(1.1)
            assert http.head(url).status_code == 200  # the bucket refills
