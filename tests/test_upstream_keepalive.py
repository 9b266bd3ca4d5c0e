"""Which upstream connections go back to the pool, against a real loopback upstream.

The client decodes chunked bodies itself, so h11 never sees their end and cannot decide
keep-alive: the client does, from the response head. A connection whose server said
``Connection: close``, spoke HTTP/1.0, or delimited the body by closing must not be
reused; the pool's statistics tell whether it was.
"""

from __future__ import annotations

from backstream import Config, open_runtime
from backstream.runtime.models.http1 import HTTP1Pool, PoolStatistics
from tests.helpers import run_one_after_another
from tests.upstream_server import FakeUpstream, streams


def _pool(upstream: FakeUpstream) -> HTTP1Pool:
    return HTTP1Pool(
        upstream.url + "/chat/completions",
        connect_timeout=5,
        idle_timeout=5,
        max_connections=4,
        max_keepalive=4,
    )


async def _post(pool: HTTP1Pool) -> bytes:
    async with pool.stream_post(b'{"model": "m"}', {}) as response:
        assert response.status_code == 200
        body = b""
        while data := await response.receive_some():
            body += data
        return body


async def test_a_kept_alive_connection_is_reused(upstream: FakeUpstream) -> None:
    upstream.script(streams(["a"]), streams(["b"]))
    pool = _pool(upstream)
    bodies = [await _post(pool), await _post(pool)]
    assert b'"a"' in bodies[0] and b'"b"' in bodies[1]
    assert upstream.connections == 1
    assert pool.statistics() == PoolStatistics(opened=1, reused=1, kept=2, closed=0, idle=1)
    await pool.aclose()
    assert pool.statistics().idle == 0


async def test_connection_close_is_never_pooled_and_the_next_request_opens_a_new_one(
    upstream: FakeUpstream,
) -> None:
    upstream.script(streams(["first"], closing=True), streams(["second"], closing=True), streams(["third"]))
    pool = _pool(upstream)
    bodies = [await _post(pool) for _ in range(3)]
    assert [b'"first"' in bodies[0], b'"second"' in bodies[1], b'"third"' in bodies[2]] == [True] * 3
    assert all(body.endswith(b"data: [DONE]\n\n") for body in bodies)
    assert upstream.connections == 3 and len(upstream.requests) == 3
    # No request was tried on a closed connection: each closing one was closed, not kept.
    assert pool.statistics() == PoolStatistics(opened=3, reused=0, kept=1, closed=2, idle=1)
    assert upstream.client_closes == 0  # the server closed them, after complete responses
    await pool.aclose()


async def test_an_http10_body_ended_by_the_close_is_complete_and_not_pooled(upstream: FakeUpstream) -> None:
    upstream.script(streams(["old", " server"], version="1.0"), streams(["next"]))
    pool = _pool(upstream)
    first = await _post(pool)
    assert b'"old"' in first and b'" server"' in first and first.endswith(b"data: [DONE]\n\n")
    assert b'"next"' in await _post(pool)
    assert upstream.connections == 2
    assert pool.statistics() == PoolStatistics(opened=2, reused=0, kept=1, closed=1, idle=1)
    await pool.aclose()


async def test_a_body_that_ends_after_done_is_read_to_its_end_and_its_connection_reused(
    upstream: FakeUpstream,
) -> None:
    """The client stops assembling at ``[DONE]``, but reads the body's end that follows in a
    later read, so the next turn goes over the same connection."""
    upstream.script(streams(["one"], end_after=0.05), streams(["two"], end_after=0.05))
    async with open_runtime(Config(upstream_url=upstream.url, drain_timeout=0)) as rt:
        await run_one_after_another(rt, ["m1", "m2"])
        pool = rt.statistics().upstream_pool
        info = await rt.get_job((await rt.list_jobs(user="alice"))[0].job_id, user="alice", include_content=True)
    assert info.job.status == "completed" and info.content == "two"
    assert len(upstream.requests) == 2 and upstream.connections == 1
    assert pool is not None and (pool.opened, pool.reused, pool.closed) == (1, 1, 0)
