"""Sync tools run on a thread pool of their own; subprocess tools are killed promptly."""

from __future__ import annotations

import threading

import trio

from backstream import Config, open_runtime
from backstream.protocol.events import StatusEvent
from backstream.runtime.tools.registry import ToolRegistry, run_tool, tool
from tests import sample_tools
from tests.upstream_server import FakeUpstream


def _blocking_tool(release: threading.Event, name: str = "hang") -> object:
    def hang() -> str:
        """Block until released (a hang a thread cannot escape)."""
        release.wait(30)
        return "released"

    return tool(hang, name=name, timeout=0.05)


async def test_hung_sync_tools_never_starve_the_shared_thread_pool() -> None:
    release = threading.Event()
    tools = ToolRegistry([_blocking_tool(release)], max_threads=4)  # type: ignore[list-item]
    try:
        outcomes = [await tools.run("hang", "{}") for _ in range(45)]  # more than trio's 40 threads
        assert all(o.is_error for o in outcomes)
        assert "timed out after 0.05 s" in outcomes[0].output
        # Once the pool is full, a call that gets no thread says so.
        assert "could not start" in outcomes[-1].output and "4 threads" in outcomes[-1].output
        stats = tools.statistics()
        assert stats.abandoned == 4 and stats.busy == 4 and stats.starved_total == 41
        # The rest of the server still gets threads: host-name lookups, default to_thread calls.
        with trio.fail_after(5):
            assert await trio.to_thread.run_sync(lambda: 42) == 42
            assert await trio.socket.getaddrinfo("localhost", 80)
    finally:
        release.set()
    with trio.fail_after(5):
        while tools.statistics().abandoned:
            await trio.sleep(0.01)
    assert tools.statistics().busy == 0 and tools.statistics().abandoned_total == 4
    assert (await tools.run("hang", "{}")).output == "released"  # the pool is whole again


async def test_run_tool_without_a_registry_uses_a_bounded_default_pool() -> None:
    release = threading.Event()
    hang = _blocking_tool(release)
    try:
        for _ in range(45):
            assert (await run_tool(hang, "{}")).is_error  # type: ignore[arg-type]
        with trio.fail_after(5):
            assert await trio.to_thread.run_sync(lambda: 1) == 1
    finally:
        release.set()


async def test_a_subprocess_tool_that_ignores_sigterm_is_killed_half_a_second_later() -> None:
    t0 = trio.current_time()
    outcome = await run_tool(sample_tools.stubborn_isolated, '{"seconds": 60}')
    elapsed = trio.current_time() - t0
    assert outcome.is_error and "timed out after 2 s" in outcome.output
    assert elapsed < 4.5  # 2 s timeout + 0.5 s grace, not trio's default 5 s


async def test_other_jobs_still_reach_the_upstream_by_name_after_many_hung_tool_calls(
    upstream: FakeUpstream,
) -> None:
    release = threading.Event()
    tools = ToolRegistry([_blocking_tool(release)])  # type: ignore[list-item]
    by_name = upstream.url.replace("127.0.0.1", "localhost")  # a host-name lookup on a thread
    try:
        async with open_runtime(Config(upstream_url=by_name, drain_timeout=0), tools=tools) as rt:
            for _ in range(45):  # more hung calls than trio's shared pool has threads
                assert (await rt.tools.run("hang", "{}")).is_error
            started = await rt.start_job(
                user="bob",
                thread_id="t",
                message_id="m",
                model="any/model",
                messages=[{"role": "user", "content": "hi"}],
            )
            with trio.fail_after(5):
                async with rt.watch(started.job_id, user="bob") as batches:
                    async for batch in batches:
                        last = batch.events[-1]
            assert isinstance(last, StatusEvent) and last.status == "completed", last
    finally:
        release.set()
