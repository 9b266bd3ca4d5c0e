"""The front door over real WebSocket connections: every message type and error code."""

from __future__ import annotations

import json

import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from backstream import Config
from backstream.runtime.server.auth import AnyAuthenticator, JWTAuthenticator, StaticTokens, mint_jwt
from backstream.runtime.server.connection import ConnectionLimits
from backstream.runtime.server.frontdoor import FrontDoor, FrontDoorConfig
from tests.ws_helpers import TOKENS, check_contiguous, raw_client, served, start_fields, text_of

SECRET = "s" * 40


async def test_hello_welcome(autojump_clock: trio.testing.MockClock) -> None:
    async with served(Config(max_jobs_per_user=3, batch_ms=40, drain_timeout=0)) as srv:
        async with raw_client(srv.url) as c:
            welcome = await c.hello(client="tests/1")
            assert welcome["type"] == "welcome" and welcome["id"] == "h" and welcome["protocol"] == 1
            assert welcome["user"] == "alice" and welcome["session_id"].startswith("s_")
            assert welcome["server"]["name"] == "backstream"
            assert welcome["limits"] == {"max_message_bytes": 1048576, "max_jobs_per_user": 3, "batch_ms": 40}
            assert set(welcome["features"]) == {"tools", "approvals", "notifications"}
            assert (await c.request("ping"))["type"] == "pong"


async def test_requests_sent_right_after_hello_are_answered_in_order_after_welcome(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with served(Config(drain_timeout=0)) as srv, raw_client(srv.url) as c:
        await c.send({"type": "hello", "id": "h", "protocol": 1, "token": "tok-alice"})
        await c.send({"type": "ping", "id": "p1"})
        await c.send({"type": "job.start", "id": "s1", **start_fields("m1"), "watch": True})
        await c.send({"type": "ping", "id": "p2"})
        replies: list[dict[str, object]] = []
        while len(replies) < 4:
            message = await c.recv()
            (replies if "id" in message else c.pushes).append(message)  # batches have no id
        assert [(r["type"], r.get("id")) for r in replies] == [
            ("welcome", "h"),
            ("pong", "p1"),
            ("job.started", "s1"),
            ("pong", "p2"),
        ]
        started = replies[2]["job"]
        assert isinstance(started, dict)
        batches = await c.events_until_terminal(started["job_id"])
        check_contiguous(batches)


async def test_requests_sent_after_a_refused_hello_are_dropped_with_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with served() as srv, raw_client(srv.url) as c:
        await c.send({"type": "hello", "id": "h", "protocol": 1, "token": "wrong"})
        await c.send({"type": "job.start", "id": "s1", **start_fields("m1")})
        reply = await c.recv()
        assert reply["type"] == "error" and reply["code"] == "unauthorized"
        assert await c.close_code() == 4401
        assert c.pushes == []  # nothing answered the start
    async with served() as srv, raw_client(srv.url) as c:
        await c.hello()
        assert (await c.request("job.list"))["jobs"] == []


@pytest.mark.parametrize(
    ("first", "code", "close"),
    [
        ({"type": "hello", "id": "h", "protocol": 1, "token": "wrong"}, "unauthorized", 4401),
        ({"type": "hello", "id": "h", "protocol": 2, "token": "tok-alice"}, "unsupported_protocol", 4400),
        ({"type": "ping", "id": "p"}, "unauthorized", 4401),
        ({"type": "hello", "id": "h", "protocol": 1}, "unauthorized", 4401),
    ],
    ids=["bad-token", "bad-protocol", "request-before-hello", "no-token"],
)
async def test_hello_failures(
    autojump_clock: trio.testing.MockClock, first: dict[str, object], code: str, close: int
) -> None:
    async with served() as srv, raw_client(srv.url) as c:
        await c.send(first)
        reply = await c.recv()
        assert reply["type"] == "error" and reply["code"] == code and reply["id"] == first["id"]
        assert await c.close_code() == close


async def test_no_hello_in_time_closes_4408(autojump_clock: trio.testing.MockClock) -> None:
    async with served(limits=ConnectionLimits(hello_timeout=3)) as srv, raw_client(srv.url) as c:
        t0 = trio.current_time()
        assert await c.close_code() == 4408
        assert trio.current_time() - t0 == pytest.approx(3, abs=0.1)


async def test_bearer_header_authenticates(autojump_clock: trio.testing.MockClock) -> None:
    async with served() as srv:
        async with raw_client(srv.url, extra_headers=[(b"Authorization", b"Bearer tok-bob")]) as c:
            reply = await c.request("hello", id="h", protocol=1)
            assert reply["type"] == "welcome" and reply["user"] == "bob"


async def test_jwt_auth_and_expiry(autojump_clock: trio.testing.MockClock) -> None:
    import time

    auth = AnyAuthenticator([StaticTokens(TOKENS), JWTAuthenticator(SECRET)])
    async with served(auth=auth) as srv:
        async with raw_client(srv.url) as c:
            welcome = await c.hello(token=mint_jwt(SECRET, "carol", ttl=30))
            assert welcome["user"] == "carol"
            t0 = trio.current_time()
            assert await c.close_code() == 4401  # the session ends when the token expires
            assert 25 <= trio.current_time() - t0 <= 31
        async with raw_client(srv.url) as c:
            expired = mint_jwt(SECRET, "carol", ttl=10, now=time.time() - 60)
            reply = await c.hello(token=expired)
            assert reply["code"] == "unauthorized" and "expired" in reply["message"]
            assert await c.close_code() == 4401
        async with raw_client(srv.url) as c:
            forged = mint_jwt("x" * 40, "carol", ttl=30)
            assert (await c.hello(token=forged))["code"] == "unauthorized"


async def test_start_watch_get_list_abort(autojump_clock: trio.testing.MockClock) -> None:
    async with served() as srv, raw_client(srv.url) as c:
        await c.hello()
        started = await c.request("job.start", **start_fields(watch=True))
        assert started["type"] == "job.started" and started["existing"] is False
        job = started["job"]
        assert job["status"] == "running" and job["epoch"] == 1 and job["model"] == "backstream/lorem"
        assert set(job) == {
            "job_id",
            "thread_id",
            "message_id",
            "status",
            "model",
            "seq",
            "epoch",
            "content_length",
            "created_at",
            "updated_at",
            "finished_at",
            "error",
            "usage",
            "watchers",
        }
        job_id = job["job_id"]
        batches = await c.events_until_terminal(job_id)
        check_contiguous(batches)
        text = text_of(batches)
        assert len(text.split()) == 20
        again = await c.request("job.start", **start_fields())
        assert again["existing"] is True and again["job"]["job_id"] == job_id
        info = await c.request("job.get", job_id=job_id, include_content=True, offset=6)
        assert info["type"] == "job.info" and info["content"] == text[6:] and info["tool_calls"] == []
        assert info["job"]["status"] == "completed" and info["job"]["finished_at"].endswith("Z")
        bare = await c.request("job.get", job_id=job_id)
        assert "content" not in bare
        listed = await c.request("job.list", thread_id="t1", status=["completed"], limit=5)
        assert [j["job_id"] for j in listed["jobs"]] == [job_id]
        aborted = await c.request("job.abort", job_id=job_id)
        assert aborted["type"] == "job.abort.result" and aborted["aborted"] is False


async def test_watch_replay_and_resume_from_cursor(autojump_clock: trio.testing.MockClock) -> None:
    async with served() as srv, raw_client(srv.url) as c:
        await c.hello()
        job_id = (await c.request("job.start", **start_fields()))["job"]["job_id"]
        watching = await c.request("job.watch", job_id=job_id, after_seq=0)
        assert watching["type"] == "job.watching" and watching["job"]["job_id"] == job_id
        full = await c.events_until_terminal(job_id)
        last = full[-1]["to_seq"]
        await c.request("job.watch", job_id=job_id, after_seq=7, epoch=1)
        part = await c.events_until_terminal(job_id)
        check_contiguous(part, after_seq=7)
        # Merged text events carry the seq of their last entry, so the expected text after the
        # cursor comes from the log's own entries.
        await srv.runtime.wait_idle()
        entries = await srv.runtime.store.read(job_id, 7, 10_000)
        assert text_of(part) == "".join(e.text for e in entries if e.kind == "text")
        gone = await c.request("job.watch", job_id=job_id, epoch=2)
        assert gone["code"] == "gone"
        beyond = await c.request("job.watch", job_id=job_id, after_seq=last + 1)
        assert beyond["code"] == "bad_request"


async def test_unwatch_stops_batches(autojump_clock: trio.testing.MockClock) -> None:
    async with served() as srv, raw_client(srv.url) as c:
        await c.hello()
        job_id = (
            await c.request("job.start", **start_fields(params={"max_tokens": 100, "tokens_per_s": 10}))
        )["job"]["job_id"]
        await c.request("job.watch", job_id=job_id)
        await trio.sleep(1)
        unwatched = await c.request("job.unwatch", job_id=job_id)
        assert unwatched == {"type": "job.unwatched", "id": unwatched["id"], "job_id": job_id}
        c.pushes.clear()
        await trio.sleep(3)
        assert (await c.request("ping"))["type"] == "pong"
        assert not [p for p in c.pushes if p.get("type") == "job.events"]  # none after job.unwatched
        assert (await c.request("job.get", job_id=job_id))["job"]["watchers"] == 0


async def test_abort_through_the_protocol(autojump_clock: trio.testing.MockClock) -> None:
    async with served() as srv, raw_client(srv.url) as c:
        await c.hello()
        job_id = (
            await c.request("job.start", **start_fields(params={"max_tokens": 100, "tokens_per_s": 10}))
        )["job"]["job_id"]
        await trio.sleep(1)
        result = await c.request("job.abort", job_id=job_id)
        assert result["aborted"] is True and result["job"]["status"] == "aborted"
        assert result["job"]["content_length"] > 0


async def test_another_users_job_is_not_found(autojump_clock: trio.testing.MockClock) -> None:
    async with served() as srv, raw_client(srv.url) as alice, raw_client(srv.url) as bob:
        await alice.hello()
        await bob.hello("tok-bob")
        job_id = (await alice.request("job.start", **start_fields()))["job"]["job_id"]
        answers = []
        for target in (job_id, "j_missing"):
            for kind, fields in [
                ("job.get", {}),
                ("job.watch", {}),
                ("job.abort", {}),
                ("job.approve", {"call_id": "c1", "approved": True}),
            ]:
                reply = await bob.request(kind, job_id=target, **fields)
                answers.append((kind, reply["code"], reply["message"]))
        assert answers[:4] == answers[4:] and {code for _, code, _ in answers} == {"not_found"}
        assert (await bob.request("job.list"))["jobs"] == []
        conflict = await alice.request("job.approve", job_id=job_id, call_id="c1", approved=True)
        assert conflict["code"] == "conflict"


@pytest.mark.parametrize(
    ("frame", "fragment"),
    [
        ("{not json", "not valid JSON"),
        (b"\x01\x02", "binary"),
        ('{"type": "job.fly", "id": "x"}', "unknown message type"),
        ('{"type": "job.get", "id": "x", "job_id": 5}', "job_id"),
        ('{"type": "job.watch", "id": "x", "job_id": "j", "after_seq": "3"}', "after_seq"),
        ('{"type": "job.list", "id": "x", "limit": 1000}', "limit"),
        (
            '{"type": "job.start", "id": "x", "thread_id": "t", "message_id": "m", "model": "backstream/echo"}',
            "messages",
        ),
        ("[" * 200 + "]" * 200, "nested"),
        ('"just a string"', "object"),
        ('{"id": "x"}', "type"),
    ],
)
async def test_bad_input_gets_a_bad_request(
    autojump_clock: trio.testing.MockClock, frame: str | bytes, fragment: str
) -> None:
    async with served() as srv, raw_client(srv.url) as c:
        await c.hello()
        await c.send(frame)
        reply = await c.recv()
        assert reply["type"] == "error" and reply["code"] == "bad_request" and fragment in reply["message"]
        assert "Traceback" not in reply["message"]
        assert (await c.request("ping"))["type"] == "pong"  # the connection goes on


async def test_bad_params_and_models(autojump_clock: trio.testing.MockClock) -> None:
    async with served() as srv, raw_client(srv.url) as c:
        await c.hello()
        reply = await c.request("job.start", **start_fields(params={"api_key": "x"}))
        assert reply["code"] == "bad_request" and "api_key" in reply["message"]
        reply = await c.request("job.start", **start_fields(model="gpt-4o", params={}))
        assert reply["code"] == "bad_request" and "upstream" in reply["message"]


async def test_oversized_frame_closes_1009(autojump_clock: trio.testing.MockClock) -> None:
    async with served(limits=ConnectionLimits(max_message_bytes=1000)) as srv, raw_client(srv.url) as c:
        await c.hello()
        await c.send(json.dumps({"type": "ping", "id": "x", "pad": "x" * 2000}))
        assert await c.close_code() == 1009


async def test_capacity_error_has_retry_hint(autojump_clock: trio.testing.MockClock) -> None:
    async with served(Config(max_jobs_per_user=1, drain_timeout=0)) as srv, raw_client(srv.url) as c:
        await c.hello()
        await c.request("job.start", **start_fields("m1", params={"max_tokens": 100, "tokens_per_s": 1}))
        reply = await c.request("job.start", **start_fields("m2"))
        assert reply["code"] == "capacity" and reply["retry_after_ms"] == 1000


async def test_get_cuts_content_to_fit_a_frame(autojump_clock: trio.testing.MockClock) -> None:
    async with served(limits=ConnectionLimits(max_message_bytes=4000)) as srv, raw_client(srv.url) as c:
        await c.hello()
        job_id = (
            await c.request("job.start", **start_fields(params={"max_tokens": 2000, "tokens_per_s": 10_000}))
        )["job"]["job_id"]
        await trio.sleep(1)
        reply = await c.request("job.get", job_id=job_id, include_content=True)
        assert reply["type"] == "job.info" and reply["next_offset"] == len(reply["content"]) > 1000
        tail = await c.request("job.get", job_id=job_id, include_content=True, offset=10_000)
        assert tail["type"] == "job.info" and "next_offset" not in tail


async def test_origin_allowlist(autojump_clock: trio.testing.MockClock) -> None:
    async with served(allow_origins=("https://app.example",)) as srv:
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(srv.url, extra_headers=[(b"Origin", b"https://evil.example")]):
                pass
        assert rejected.value.status_code == 403
        async with raw_client(srv.url, extra_headers=[(b"Origin", b"https://app.example")]) as c:
            assert (await c.hello())["type"] == "welcome"
        async with raw_client(srv.url) as c:  # no Origin: not a browser
            assert (await c.hello())["type"] == "welcome"


async def test_wrong_path_is_rejected(autojump_clock: trio.testing.MockClock) -> None:
    async with served() as srv:
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(srv.url.replace("/v1", "/v2")):
                pass
        assert rejected.value.status_code == 404


async def test_rate_limit_then_close_1008(autojump_clock: trio.testing.MockClock) -> None:
    limits = ConnectionLimits(rate_per_s=5, rate_burst=5, abuse_limit=10)
    async with served(limits=limits) as srv, raw_client(srv.url) as c:
        await c.hello()
        codes = [(await c.request("ping")).get("code", "ok") for _ in range(8)]
        assert codes[:5] == ["ok"] * 5 and codes[5:] == ["rate_limited"] * 3
        await trio.sleep(1)  # the bucket refills
        assert (await c.request("ping"))["type"] == "pong"
        for _ in range(20):
            await c.send({"type": "ping", "id": "flood"})
        assert await c.close_code() == 1008


async def test_watch_cap_per_connection(autojump_clock: trio.testing.MockClock) -> None:
    async with served(limits=ConnectionLimits(max_watches=2)) as srv, raw_client(srv.url) as c:
        await c.hello()
        ids = []
        for i in range(3):
            started = await c.request(
                "job.start", **start_fields(f"m{i}", params={"max_tokens": 100, "tokens_per_s": 1})
            )
            ids.append(started["job"]["job_id"])
        assert (await c.request("job.watch", job_id=ids[0]))["type"] == "job.watching"
        assert (await c.request("job.watch", job_id=ids[1]))["type"] == "job.watching"
        refused = await c.request("job.watch", job_id=ids[2])
        assert refused["code"] == "bad_request" and "at most 2" in refused["message"]
        assert (await c.request("job.watch", job_id=ids[0], after_seq=1))[
            "type"
        ] == "job.watching"  # a restart


async def test_shutdown_refuses_new_jobs(autojump_clock: trio.testing.MockClock) -> None:
    async with served() as srv, raw_client(srv.url) as c:
        await c.hello()
        srv.runtime.stop_accepting()
        reply = await c.request("job.start", **start_fields())
        assert reply["code"] == "unavailable"


async def test_server_close_1001_reaches_clients(autojump_clock: trio.testing.MockClock) -> None:
    async with served() as srv, raw_client(srv.url) as c:
        await c.hello()
        srv.door.close_all(1001, "server shutting down")
        assert await c.close_code() == 1001


async def test_a_client_that_answers_no_ping_is_closed(autojump_clock: trio.testing.MockClock) -> None:
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage

    async with served(limits=ConnectionLimits(ping_interval=5, idle_timeout=10)) as srv:
        stream = await trio.open_tcp_stream("127.0.0.1", srv.door.port)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host="127.0.0.1", target="/v1")))
        hello = json.dumps({"type": "hello", "id": "h", "protocol": 1, "token": "tok-alice"})
        t0, pings, closed = trio.current_time(), 0, None
        while closed is None:
            ws.receive_data(await stream.receive_some(65536) or None)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    await stream.send_all(ws.send(TextMessage(data=hello)))
                elif isinstance(event, Ping):
                    pings += 1  # and no pong
                elif isinstance(event, CloseConnection):
                    closed = event
        assert pings == 1 and closed.code == 1000 and "pong" in (closed.reason or "")
        assert trio.current_time() - t0 == pytest.approx(
            15, abs=0.5
        )  # the ping at 5 s, then 10 s without a pong


async def test_the_frame_cache_belongs_to_the_front_door() -> None:
    """Watchers of a job on one front door share its encoded frames; another front door of
    the same runtime keeps frames of its own."""
    async with served() as one, trio.open_nursery() as nursery:
        other = FrontDoor(one.runtime, StaticTokens(TOKENS), FrontDoorConfig(port=0))
        await nursery.start(other.run)
        async with raw_client(one.url) as c:
            await c.hello()
            started = await c.request("job.start", **start_fields(watch=True))
            job_id = started["job"]["job_id"]
            first = await c.events_until_terminal(job_id)
        # Replays of the ended job cut the same batches: the second one on a door is a hit.
        for door in (one.door, other):
            for expect_hit in (False, True):
                before = door.frames.hits
                async with raw_client(f"ws://127.0.0.1:{door.port}/v1") as c:
                    await c.hello()
                    assert (await c.request("job.watch", job_id=job_id, after_seq=0))[
                        "type"
                    ] == "job.watching"
                    again = await c.events_until_terminal(job_id)
                assert text_of(again) == text_of(first)
                assert (door.frames.hits > before) == expect_hit
        assert other.frames is not one.door.frames
        nursery.cancel_scope.cancel()
