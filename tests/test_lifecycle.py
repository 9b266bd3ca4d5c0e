"""Jobs from start to end against a real loopback upstream."""

from __future__ import annotations

import pytest
import trio

import backstream
from backstream import Config, open_runtime
from backstream.protocol.events import ReasoningEvent, StatusEvent, TextEvent
from tests.helpers import check_contiguous, collect, joined_text, terminal
from tests.upstream_server import (
    FakeUpstream,
    drop_after,
    events,
    finish_chunk,
    open_fake_upstream,
    reasoning_chunk,
    stall_after,
    stall_before_headers,
    status,
    streams,
    text_chunk,
    usage_chunk,
)

MSG = [{"role": "user", "content": "hi"}]


def cfg(upstream: FakeUpstream, **kw: object) -> Config:
    return Config(upstream_url=upstream.url, drain_timeout=0, **kw)  # type: ignore[arg-type]


async def start(rt: backstream.Runtime, message_id: str = "m1", user: str = "alice", **kw: object) -> str:
    started = await rt.start_job(
        user=user,
        thread_id="t1",
        message_id=message_id,
        model=str(kw.pop("model", "gpt-test")),
        messages=MSG,
        **kw,  # type: ignore[arg-type]
    )
    return started.job_id


async def test_completes_with_content_usage_and_request_shape(upstream: FakeUpstream) -> None:
    upstream.script(streams(["Hel", "lo", " there"]))
    async with open_runtime(cfg(upstream, upstream_api_key="sk-test")) as rt:
        job_id = await start(rt, params={"temperature": 0.2})
        batches = await collect(rt, job_id)
        check_contiguous(batches)
        assert joined_text(batches) == "Hello there"
        end = terminal(batches)
        assert end.status == "completed" and end.finish_reason == "stop"
        assert end.usage == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
        info = await rt.get_job(job_id, user="alice", include_content=True)
        assert info.content == "Hello there"
        assert info.job.status == "completed" and info.job.content_length == 11
        assert info.job.seq == end.seq and info.job.finished_at is not None
    body = upstream.requests[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "gpt-test" and body["messages"] == MSG and body["temperature"] == 0.2


async def test_reasoning_is_logged_apart_from_content(upstream: FakeUpstream) -> None:
    upstream.script(
        events(
            [
                reasoning_chunk("think "),
                reasoning_chunk("more"),
                text_chunk("answer"),
                finish_chunk(),
                usage_chunk(),
                "[DONE]",
            ]
        )
    )
    async with open_runtime(cfg(upstream)) as rt:
        batches = await collect(rt, await start(rt))
        kinds = [type(ev) for b in batches for ev in b.events]
        assert kinds == [StatusEvent, ReasoningEvent, ReasoningEvent, TextEvent, StatusEvent]
        assert joined_text(batches) == "answer"


async def test_abort_mid_stream_closes_upstream_and_keeps_content(upstream: FakeUpstream) -> None:
    upstream.script(stall_after(["partial ", "answer"]))
    async with open_runtime(cfg(upstream)) as rt:
        job_id = await start(rt)
        async with rt.watch(job_id, user="alice") as batches:
            seen = ""
            async for batch in batches:
                seen += batch.text
                if seen == "partial answer":
                    break
        closed = upstream.client_closed
        result = await rt.abort(job_id, user="alice")
        assert result.aborted and result.job.status == "aborted"
        with trio.fail_after(1):
            await closed.wait()  # the upstream saw its connection closed
        info = await rt.get_job(job_id, user="alice", include_content=True)
        assert info.content == "partial answer" and info.job.status == "aborted"
        again = await rt.abort(job_id, user="alice")
        assert not again.aborted and again.job.status == "aborted"


async def test_abort_before_upstream_headers(upstream: FakeUpstream) -> None:
    upstream.script(stall_before_headers())
    async with open_runtime(cfg(upstream)) as rt:
        arrived = upstream.request_arrived
        job_id = await start(rt)
        await arrived.wait()
        closed = upstream.client_closed
        result = await rt.abort(job_id, user="alice")
        assert result.aborted
        with trio.fail_after(1):
            await closed.wait()
        batches = await collect(rt, job_id)
        assert terminal(batches).status == "aborted" and joined_text(batches) == ""


async def test_job_timeout_keeps_content(
    upstream: FakeUpstream, autojump_clock: trio.testing.MockClock
) -> None:
    upstream.script(streams(["a"] * 100, delay=1.0))
    async with open_runtime(cfg(upstream, job_timeout=10.5)) as rt:
        t0 = trio.current_time()
        batches = await collect(rt, await start(rt))
        end = terminal(batches)
        assert end.status == "failed" and end.error is not None and end.error.code == "timeout"
        assert joined_text(batches) == "a" * 10
        assert 10.5 <= trio.current_time() - t0 < 11


async def test_upstream_idle_timeout(upstream: FakeUpstream, autojump_clock: trio.testing.MockClock) -> None:
    upstream.script(stall_after(["so far"]))
    async with open_runtime(cfg(upstream, upstream_idle_timeout=7)) as rt:
        t0 = trio.current_time()
        batches = await collect(rt, await start(rt))
        end = terminal(batches)
        assert end.status == "failed" and end.error is not None and end.error.code == "upstream_timeout"
        assert joined_text(batches) == "so far"
        assert 7 <= trio.current_time() - t0 < 8


async def test_an_upstream_slower_than_its_idle_timeout_in_all_but_no_gap_completes(
    upstream: FakeUpstream, autojump_clock: trio.testing.MockClock
) -> None:
    # 30 s of stream, a token every 6 s, idle timeout 7 s: the body's one deadline moves
    # forward as bytes arrive, so only a gap of 7 s (plus its slack) would end it.
    upstream.script(streams(["a"] * 5, delay=6.0))
    async with open_runtime(cfg(upstream, upstream_idle_timeout=7)) as rt:
        t0 = trio.current_time()
        batches = await collect(rt, await start(rt))
        assert terminal(batches).status == "completed"
        assert joined_text(batches) == "aaaaa"
        assert trio.current_time() - t0 >= 24


@pytest.mark.parametrize(
    ("scenario", "code", "text"),
    [
        (status(400, body='{"error":{"message":"bad model"}}'), "upstream_http", ""),
        (events([text_chunk("a"), {"error": {"message": "overloaded", "code": 502}}]), "upstream_error", "a"),
        (events([text_chunk("a"), finish_chunk("error")]), "upstream_error", "a"),
        (events([text_chunk("a"), text_chunk("b")]), "upstream_protocol", "ab"),
        (events([text_chunk("a"), "{not json"]), "upstream_protocol", "a"),
        (drop_after(["a", "b"]), "upstream_protocol", "ab"),
    ],
    ids=["http-400", "error-event", "finish-error", "no-finish", "malformed", "dropped"],
)
async def test_upstream_failures_keep_partial_content(
    upstream: FakeUpstream, scenario: object, code: str, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.script(scenario)  # type: ignore[arg-type]
    async with open_runtime(cfg(upstream)) as rt:
        job_id = await start(rt)
        batches = await collect(rt, job_id)
        end = terminal(batches)
        assert end.status == "failed" and end.error is not None and end.error.code == code
        assert joined_text(batches) == text
        info = await rt.get_job(job_id, user="alice", include_content=True)
        assert info.content == text and info.job.error == end.error
    assert len(upstream.requests) == 1  # failures after the first token are never retried
    if code == "upstream_http":  # the body is the operator's to read, not the user's
        assert end.error.http_status == 400
        assert end.error.message == "upstream answered HTTP 400 (Bad Request)"
        assert any("bad model" in r.getMessage() for r in caplog.records if r.name == "backstream.upstream")


async def test_429_then_success_honours_retry_after(
    upstream: FakeUpstream, autojump_clock: trio.testing.MockClock
) -> None:
    upstream.script(status(429, headers={"retry-after": "7"}), status(503), streams(["ok"]))
    async with open_runtime(cfg(upstream, upstream_retry_base=0.1)) as rt:
        t0 = trio.current_time()
        batches = await collect(rt, await start(rt))
        assert terminal(batches).status == "completed" and joined_text(batches) == "ok"
        assert 7 <= trio.current_time() - t0 < 8  # 7 s from Retry-After, then a short backoff
    assert len(upstream.requests) == 3


async def test_retries_are_bounded(upstream: FakeUpstream, autojump_clock: trio.testing.MockClock) -> None:
    upstream.script(*[status(502)] * 5)
    async with open_runtime(cfg(upstream, upstream_max_retries=2)) as rt:
        batches = await collect(rt, await start(rt))
        end = terminal(batches)
        assert end.error is not None and end.error.code == "upstream_http" and end.error.http_status == 502
    assert len(upstream.requests) == 3


async def test_drop_before_first_token_is_retried(
    upstream: FakeUpstream, autojump_clock: trio.testing.MockClock
) -> None:
    upstream.script(drop_after([]), streams(["fine"]))
    async with open_runtime(cfg(upstream)) as rt:
        batches = await collect(rt, await start(rt))
        assert terminal(batches).status == "completed" and joined_text(batches) == "fine"
    assert len(upstream.requests) == 2


async def test_unreachable_upstream(autojump_clock: trio.testing.MockClock) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there: connections are refused
    config = Config(upstream_url=f"http://127.0.0.1:{port}/v1", upstream_max_retries=1, drain_timeout=0)
    async with open_runtime(config) as rt:
        started = await rt.start_job(user="a", thread_id="t", message_id="m", model="x", messages=MSG)
        batches = await collect(rt, started.job_id, user="a")
        end = terminal(batches)
        assert end.error is not None and end.error.code == "upstream_unreachable"


@pytest.mark.parametrize(
    ("host", "url_host"),
    [("::1", "[::1]"), ("127.0.0.1", "localhost")],
    ids=["an IPv6 address, connected to directly", "a name, resolved"],
)
async def test_the_upstream_may_be_named_by_address_or_by_name(host: str, url_host: str) -> None:
    async with trio.open_nursery() as nursery:
        upstream = await open_fake_upstream(nursery, host, url_host)
        upstream.script(streams(["over ", "there"]))
        async with open_runtime(cfg(upstream)) as rt:
            batches = await collect(rt, await start(rt))
            assert terminal(batches).status == "completed" and joined_text(batches) == "over there"
        nursery.cancel_scope.cancel()


async def test_no_upstream_configured_is_a_bad_request() -> None:
    async with open_runtime(Config(drain_timeout=0)) as rt:
        with pytest.raises(backstream.BadRequestError, match="needs an upstream"):
            await rt.start_job(user="a", thread_id="t", message_id="m", model="gpt-4o", messages=MSG)
        with pytest.raises(backstream.BadRequestError, match="unknown built-in"):
            await rt.start_job(user="a", thread_id="t", message_id="m", model="backstream/nope", messages=MSG)


async def test_output_limit_keeps_what_fits(upstream: FakeUpstream) -> None:
    upstream.script(streams(["12345", "67890", "abcde"]))
    async with open_runtime(cfg(upstream, max_output_chars=8)) as rt:
        job_id = await start(rt)
        batches = await collect(rt, job_id)
        end = terminal(batches)
        assert end.error is not None and end.error.code == "output_limit"
        assert joined_text(batches) == "12345678"
        assert (await rt.get_job(job_id, user="alice")).job.content_length == 8
