"""Subprocess tools under their limits: a call that goes over one is an error result and
the job goes on (real child processes, a real loopback listener)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator

import attrs
import pytest

from backstream import Config, open_runtime
from backstream.protocol.events import ToolResultEvent
from backstream.runtime.tools.registry import Tool, ToolLimits, ToolRegistry, run_tool, tool
from backstream.runtime.tools.sandbox import platform_gaps
from tests import sample_tools
from tests.helpers import collect, joined_text, terminal
from tests.test_tools import start, tool_turn
from tests.upstream_server import FakeUpstream, streams


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A loopback listener nobody should reach (non-blocking: accept says whether anyone did)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sock.setblocking(False)
        yield sock


def was_reached(sock: socket.socket) -> bool:
    try:
        sock.accept()[0].close()
    except BlockingIOError:
        return False
    return True


async def run_in_a_job(upstream: FakeUpstream, item: Tool, arguments: str) -> ToolResultEvent:
    """Run one call of ``item`` inside a job; the job must end ``completed`` all the same."""
    upstream.script(tool_turn(("c1", item.name, arguments)), streams(["carried on"]))
    tools = ToolRegistry.with_builtins()
    tools.register(item)
    async with open_runtime(Config(upstream_url=upstream.url, drain_timeout=0), tools=tools) as rt:
        batches = await collect(rt, await start(rt, [item.name]))
        assert terminal(batches).status == "completed" and joined_text(batches) == "carried on"
    assert upstream.requests[1]["messages"][-1]["role"] == "tool"  # the model read the error
    return next(ev for b in batches for ev in b.events if isinstance(ev, ToolResultEvent))


@pytest.mark.parametrize(
    ("item", "arguments", "fragment"),
    [
        (sample_tools.cpu_limited, "{}", "went over its CPU-time limit (1 s)"),
        (sample_tools.memory_limited, '{"mib": 1024}', "MemoryError"),
        (sample_tools.files_limited, '{"count": 200}', "Too many open files"),
        (sample_tools.processes_limited, '{"count": 200}', "over the tool's process limit, 8"),
    ],
    ids=["cpu", "address-space", "open-files", "processes"],
)
async def test_a_call_over_its_limit_is_an_error_result_and_the_job_goes_on(
    upstream: FakeUpstream, item: Tool, arguments: str, fragment: str
) -> None:
    result = await run_in_a_job(upstream, item, arguments)
    assert result.is_error and fragment in result.output, result.output


@pytest.mark.parametrize(
    ("item", "arguments", "output"),
    [
        (sample_tools.memory_limited, '{"mib": 16}', "held 16 MiB"),
        (sample_tools.files_limited, '{"count": 8}', "opened 8"),
        (sample_tools.processes_limited, '{"count": 4}', "forked 4"),
    ],
    ids=["address-space", "open-files", "processes"],
)
async def test_a_call_within_its_limits_runs(item: Tool, arguments: str, output: str) -> None:
    outcome = await run_tool(item, arguments)
    assert (outcome.output, outcome.is_error) == (output, False)


async def test_a_tool_without_network_cannot_reach_a_loopback_listener(
    upstream: FakeUpstream, listener: socket.socket
) -> None:
    port = listener.getsockname()[1]
    result = await run_in_a_job(upstream, sample_tools.offline, f'{{"port": {port}}}')
    assert result.is_error and "the tool has no network" in result.output, result.output
    assert not was_reached(listener)
    # The same tool with its network reaches it: the listener is reachable from a child.
    outcome = await run_tool(sample_tools.online, f'{{"port": {port}}}')
    assert (outcome.output, outcome.is_error) == ("connected", False) and was_reached(listener)


async def test_a_limit_the_child_cannot_apply_fails_the_call_before_the_tool_runs(
    listener: socket.socket,
) -> None:
    unknown_user = attrs.evolve(sample_tools.online, limits=ToolLimits(user="no-such-user-for-backstream"))
    outcome = await run_tool(unknown_user, f'{{"port": {listener.getsockname()[1]}}}')
    assert outcome.is_error and "no such user 'no-such-user-for-backstream'" in outcome.output
    assert not was_reached(listener)


def test_limits_are_checked_where_tools_are_declared() -> None:
    with pytest.raises(ValueError, match="cpu_seconds must be a positive integer"):
        ToolLimits(cpu_seconds=0)
    with pytest.raises(ValueError, match="limits need isolation='subprocess'"):
        tool(sample_tools.add, limits=ToolLimits())
    assert sample_tools.hang_isolated.limits is None  # the defaults: ToolLimits()
    assert ToolLimits() == ToolLimits(
        cpu_seconds=60, address_space_mib=2048, open_files=256, processes=64, network=True, user=None
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="the warning is for a server running as root")
def test_registering_a_tool_that_runs_as_root_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="backstream.tools"):
        ToolRegistry().register(sample_tools.hang_isolated)
        ToolRegistry().register(sample_tools.processes_limited)  # has a user of its own
    assert [r.getMessage() for r in caplog.records] == [
        "tool 'hang_isolated' runs as root: it can lift its own limits and its process limit does "
        "not hold; give it a user of its own (ToolLimits(user=...))"
    ]


def test_what_a_platform_cannot_apply_is_named() -> None:
    assert platform_gaps("linux", has_proc=True) == {}
    assert set(platform_gaps("darwin", has_proc=False)) == {"processes", "address_space_mib"}
    assert set(platform_gaps("freebsd", has_proc=False)) == {"processes"}
