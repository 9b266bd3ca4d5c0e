"""Client-side tools on ``/v1/ai-sdk`` with the real ``ai`` package, in Chromium: the page
answers a tool call with ``addToolOutput`` and the Chat's next send goes on from it, beside
a server tool that ran in the same step."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from backstream import Config
from backstream.runtime.tools.registry import ToolRegistry
from tests import node_tools
from tests.test_ai_sdk import ai_sdk_server, ended, run_node
from tests.test_tools import tool_turn
from tests.upstream_server import FakeUpstream, streams


@pytest.fixture
def chromium() -> str:
    node_tools.require_node(Path(__file__).resolve().parent.parent / "clients" / "ai-sdk-tests", "ai")
    return node_tools.require_chromium()  # outside the trio run, so that a skip keeps its message


async def test_a_client_side_tool_round_trip_in_chromium(
    upstream: FakeUpstream, tmp_path: Path, chromium: str
) -> None:
    upstream.script(
        tool_turn(("call_loc", "getLocation", "{}"), ("call_calc", "calculate", '{"expression": "6*7"}')),
        streams(["You are in Paris; ", "6*7 is 42."]),
    )
    with socket.socket() as probe:  # a free port for the page, whose Origin the server lists
        probe.bind(("127.0.0.1", 0))
        page_port = probe.getsockname()[1]
    config = Config(upstream_url=upstream.url, drain_timeout=0)
    page_origin = f"http://127.0.0.1:{page_port}"
    tools = ToolRegistry.with_builtins()
    async with ai_sdk_server(
        config, tools=tools, auth_cookie="bs_token", allow_origins=(page_origin,)
    ) as server:
        reported = await run_node(
            "client-tools.test.mjs",
            server,
            tmp_path,
            BACKSTREAM_CHROMIUM=chromium,
            BACKSTREAM_AUTH_COOKIE="bs_token",
            BACKSTREAM_PAGE_PORT=str(page_port),
        )
        rt = server.runtime
        first, second = reversed(await rt.list_jobs(user="alice", thread_id=reported["chatId"]))
        # The first job ended with the page's call open: the server ran only its own tool.
        info = await ended(rt, first.job_id)
        assert info.job.status == "completed" and reported["assistantId"] == first.job_id
        assert [(c.call_id, c.output) for c in info.tool_calls] == [("call_loc", None), ("call_calc", "42")]
        offered = {tool["function"]["name"] for tool in upstream.requests[0]["tools"]}
        assert offered == {"getLocation", "calculate"}
        # The second went on from the whole conversation the page sent, its output included.
        assert (await ended(rt, second.job_id)).content == "You are in Paris; 6*7 is 42."
        sent = upstream.requests[1]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
        assert [c["id"] for c in sent[1]["tool_calls"]] == ["call_loc", "call_calc"]
        assert {(m["tool_call_id"], m["content"]) for m in sent[2:]} == {
            ("call_loc", "Paris"),
            ("call_calc", "42"),
        }
        assert len(upstream.requests) == 2
