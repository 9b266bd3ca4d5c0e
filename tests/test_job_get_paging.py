"""``job.get`` pages the content and the tool calls so a large job can always be fetched."""

from __future__ import annotations

import json

import pytest
import trio

from backstream import Config
from backstream.actors.joblog import JobLog, OutputLimitExceeded
from backstream.client import open_client
from backstream.runtime.server.connection import ConnectionLimits
from backstream.runtime.tools.registry import ToolRegistry, tool
from tests.test_tools import tool_turn
from tests.upstream_server import FakeUpstream, streams
from tests.ws_helpers import raw_client, served


def big(size: int) -> str:
    """A large tool output: ``size`` characters, some of them not ASCII."""
    return ("é" + "x" * 99) * (size // 100)


async def test_large_tool_calls_are_fetched_in_pages(upstream: FakeUpstream) -> None:
    calls = [(f"call_{i}", "big", json.dumps({"size": 3000})) for i in range(6)]
    upstream.script(tool_turn(*calls), streams(["done: ", "six results"]))
    tools = ToolRegistry([tool(big, timeout=5, max_output_chars=5000)])
    limits = ConnectionLimits(max_message_bytes=8 * 1024)
    config = Config(upstream_url=upstream.url, drain_timeout=0)
    async with served(config, limits=limits, tools=tools) as srv:
        async with open_client(srv.url, "tok-alice") as client:
            started = await client.start_job(
                thread_id="t",
                message_id="m",
                model="any/model",
                messages=[{"role": "user", "content": "go"}],
                tools=["big"],
            )
            async with client.watch(started.job.job_id) as batches:
                async for _ in batches:
                    pass
            whole = await client.get(started.job.job_id, include_content=True)
        assert whole.content == "done: six results"
        assert [c.call_id for c in whole.tool_calls] == [c[0] for c in calls]
        assert all(c.output == big(3000) for c in whole.tool_calls)
        async with raw_client(srv.url) as raw:
            await raw.hello()
            job_id = started.job.job_id
            pages = []
            offset = calls_offset = 0
            while True:
                page = await raw.request(
                    "job.get",
                    job_id=job_id,
                    include_content=True,
                    offset=offset,
                    tool_calls_offset=calls_offset,
                )
                assert page["type"] == "job.info", page
                assert len(json.dumps(page, ensure_ascii=False, separators=(",", ":")).encode()) <= 8 * 1024
                pages.append(page)
                if "next_tool_calls_offset" not in page:
                    break
                offset += len(page["content"])
                calls_offset = page["next_tool_calls_offset"]
            assert len(pages) >= 3  # 6 calls of ~3 KB in frames of 8 KiB
            assert [c["call_id"] for p in pages for c in p["tool_calls"]] == [c[0] for c in calls]
            assert "".join(p["content"] for p in pages) == "done: six results"


async def test_long_content_is_cut_to_fit_with_next_offset() -> None:
    limits = ConnectionLimits(max_message_bytes=4096)
    async with served(Config(drain_timeout=0), limits=limits) as srv, raw_client(srv.url) as raw:
        await raw.hello()
        started = await raw.request(
            "job.start",
            thread_id="t",
            message_id="m",
            model="backstream/lorem",
            messages=[{"role": "user", "content": "x"}],
            params={"max_tokens": 3000, "tokens_per_s": 1_000_000},
        )
        job_id = started["job"]["job_id"]
        with trio.fail_after(30):
            while (await raw.request("job.get", job_id=job_id))["job"]["status"] == "running":
                await trio.sleep(0.05)
        pieces, offset = [], 0
        while True:
            page = await raw.request("job.get", job_id=job_id, include_content=True, offset=offset)
            pieces.append(page["content"])
            if "next_offset" not in page:
                break
            assert page["next_offset"] == offset + len(page["content"]) and page["content"]
            offset = page["next_offset"]
        assert len(pieces) > 3
        assert len("".join(pieces)) == page["job"]["content_length"]


def test_tool_results_do_not_spend_the_answer_budget() -> None:
    log = JobLog("j", 1, max_output_chars=100)
    log.append_status("running")
    log.append_tool_call("c1", "big", "{}")
    log.append_tool_result("c1", "big", "y" * 500, False)  # far beyond the budget: cut, not fatal
    log.append_text("a" * 98)  # the answer still has its whole budget (less the 2 of "{}")
    with pytest.raises(OutputLimitExceeded):
        log.append_text("bb")  # and the answer's own limit still holds
    (call,) = log.tool_calls()
    assert call.output.startswith("y" * 100) and "cut" in call.output and len(call.output) < 200
    assert log.content() == "a" * 98
