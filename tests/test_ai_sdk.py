"""The /v1/ai-sdk endpoint driven by the real ``ai`` package (WebSocketChatTransport) in Node.

Each test starts a server in this trio run, runs one Node test file from
clients/ai-sdk-tests/test against it, and then checks what Node reported
against the server's own view of the jobs.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from backstream import Config, Runtime, Store, open_runtime
from backstream.runtime.server.auth import StaticTokens
from backstream.runtime.server.frontdoor import UNAUTHORIZED_REASON, FrontDoor, FrontDoorConfig
from backstream.runtime.tools.demo import send_note
from backstream.runtime.tools.registry import ToolRegistry
from tests import node_tools, sample_tools
from tests.test_tools import tool_turn
from tests.upstream_server import FakeUpstream, streams
from tests.ws_helpers import TOKENS

PACKAGE = Path(__file__).resolve().parent.parent / "clients" / "ai-sdk-tests"


def require_node() -> str:
    """Node and the npm packages; under CI a missing one fails, elsewhere it skips."""
    return node_tools.require_node(PACKAGE, "ai", "playwright-core", "typescript")


@pytest.fixture(autouse=True)
def _node_is_here() -> None:
    """Checked before the trio run starts, so that a skip keeps its message."""
    require_node()


@attrs.define
class AiSdkServer:
    runtime: Runtime
    door: FrontDoor

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.door.port}/v1/ai-sdk"


@asynccontextmanager
async def ai_sdk_server(
    config: Config | None = None,
    *,
    tools: ToolRegistry | None = None,
    store: Store | None = None,
    **door: Any,
) -> AsyncIterator[AiSdkServer]:
    config = config or Config(drain_timeout=0)
    async with open_runtime(config, tools=tools, store=store) as rt, trio.open_nursery() as nursery:
        front = FrontDoor(rt, StaticTokens(TOKENS), FrontDoorConfig(port=0, **door))
        await nursery.start(front.run)
        yield AiSdkServer(rt, front)
        nursery.cancel_scope.cancel()


async def run_node(test_file: str, server: AiSdkServer, tmp_path: Path, **env: str) -> dict[str, Any]:
    """Run one Node test file against the server; return what it reported."""
    node = require_node()
    result = tmp_path / f"{test_file}.json"
    with trio.fail_after(120):
        done = await trio.run_process(
            [node, "--test", "--test-timeout=60000", f"test/{test_file}"],
            cwd=PACKAGE,
            env={
                **os.environ,
                "BACKSTREAM_AI_SDK_URL": server.url,
                "BACKSTREAM_RESULT_FILE": str(result),
                **env,
            },
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, output
    reported: dict[str, Any] = json.loads(result.read_text())
    return reported


async def only_job(rt: Runtime, thread_id: str, user: str = "alice") -> Any:
    jobs = await rt.list_jobs(user=user, thread_id=thread_id)
    assert len(jobs) == 1, jobs
    return jobs[0]


async def ended(rt: Runtime, job_id: str, timeout: float = 30) -> Any:
    with trio.fail_after(timeout):
        while True:
            info = await rt.get_job(job_id, user="alice", include_content=True)
            if info.job.is_terminal:
                return info
            await trio.sleep(0.05)


async def test_send_assembles_the_answer(tmp_path: Path) -> None:
    async with ai_sdk_server() as server:
        reported = await run_node("assemble.test.mjs", server, tmp_path)
        job = await only_job(server.runtime, reported["chatId"])  # the repeated send joined it
        info = await ended(server.runtime, job.job_id)
        assert info.job.status == "completed"
        assert reported["text"] == info.content
        assert reported["messageId"] == job.job_id


async def test_resume_after_a_broken_stream_gives_the_whole_answer(tmp_path: Path) -> None:
    async with ai_sdk_server() as server:
        reported = await run_node("resume.test.mjs", server, tmp_path)
        job = await only_job(server.runtime, reported["chatId"])
        info = await ended(server.runtime, job.job_id)
        assert info.job.status == "completed"
        assert reported["text"] == info.content
        assert info.content.startswith(reported["partial"]) and reported["partial"] != info.content


async def test_abort_stops_the_job_and_leaving_does_not(tmp_path: Path) -> None:
    async with ai_sdk_server() as server:
        reported = await run_node("abort.test.mjs", server, tmp_path)
        aborted = await ended(server.runtime, (await only_job(server.runtime, reported["aborted"])).job_id)
        assert aborted.job.status == "aborted"
        left = await ended(server.runtime, (await only_job(server.runtime, reported["left"])).job_id)
        assert left.job.status == "completed"
        assert len(left.content.split()) == 200


async def test_tool_loop_streams_argument_fragments(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.script(
        tool_turn(("call_1", "calculate", '{"expression": "6*7"}')),
        streams(["The answer ", "is 42."]),
    )
    async with ai_sdk_server(Config(upstream_url=upstream.url, drain_timeout=0)) as server:
        reported = await run_node("tools.test.mjs", server, tmp_path)
        info = await ended(server.runtime, (await only_job(server.runtime, reported["chatId"])).job_id)
        assert info.job.status == "completed" and info.content == "The answer is 42."
        assert [(c.name, c.arguments, c.output) for c in info.tool_calls] == [
            ("calculate", '{"expression": "6*7"}', "42")
        ]
    first = upstream.requests[0]
    assert first["model"] == "test-model" and first["temperature"] == 0.5
    assert [t["function"]["name"] for t in first["tools"]] == ["calculate"]
    assert first["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "what is 6*7?"},
    ]
    assert upstream.requests[1]["messages"][-1] == {"role": "tool", "tool_call_id": "call_1", "content": "42"}


async def test_approval_round_trip(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.script(
        tool_turn(("call_9", "delete_files", '{"a": 2, "b": 3}')),
        streams(["Deleted ", "5 files."]),
        tool_turn(("call_7", "delete_files", '{"a": 1, "b": 1}')),
        streams(["Not ", "deleted."]),
    )
    tools = ToolRegistry.with_builtins()
    tools.register(sample_tools.delete_files)
    async with ai_sdk_server(Config(upstream_url=upstream.url, drain_timeout=0), tools=tools) as server:
        reported = await run_node("approval.test.mjs", server, tmp_path)
        info = await ended(server.runtime, (await only_job(server.runtime, reported["chatId"])).job_id)
        assert info.job.status == "completed" and info.content == "Deleted 5 files."
        (call,) = info.tool_calls
        assert (call.call_id, call.approved, call.output) == ("call_9", True, "5")
        denied = await ended(
            server.runtime, (await only_job(server.runtime, reported["deniedChatId"])).job_id
        )
        assert denied.job.status == "completed" and denied.content == "Not deleted."
        (call,) = denied.tool_calls
        assert (call.call_id, call.approved, call.is_error) == ("call_7", False, True)


async def test_approval_beside_tools_that_run_by_themselves(upstream: FakeUpstream, tmp_path: Path) -> None:
    """The official helper sends the decisions when the step also holds tools that need none
    (the demo's suggestion, then one step with an automatic call and two to approve)."""
    upstream.script(
        tool_turn(
            ("call_c", "calculate", '{"expression": "2+3"}'),
            ("call_d1", "delete_files", '{"a": 2, "b": 3}'),
            ("call_d2", "delete_files", '{"a": 4, "b": 5}'),
        ),
        streams(["All ", "done."]),
    )
    tools = ToolRegistry.with_builtins()
    tools.register(sample_tools.delete_files)
    tools.register(send_note)
    config = Config(upstream_url=upstream.url, drain_timeout=0, approval_timeout=60)
    async with ai_sdk_server(config, tools=tools) as server:
        reported = await run_node("mixed-approval.test.mjs", server, tmp_path)
        assert reported["demo"]["approved"] == [
            call.call_id
            for call in (await _ended_chat(server, reported["demoChatId"])).tool_calls
            if call.name == "send_note"
        ]
        info = await _ended_chat(server, reported["severalChatId"])
        assert info.job.status == "completed" and info.content == "All done."
        assert [(c.call_id, c.approved, c.output) for c in info.tool_calls] == [
            ("call_c", None, "5"),
            ("call_d1", True, "5"),
            ("call_d2", True, "9"),
        ]
        assert reported["several"]["approved"] == ["call_d1", "call_d2"]


async def _ended_chat(server: AiSdkServer, chat_id: str) -> Any:
    info = await ended(server.runtime, (await only_job(server.runtime, chat_id)).job_id)
    assert info.job.status == "completed", info.job
    return info


async def test_a_refused_token_is_told_apart_from_a_lost_network(tmp_path: Path) -> None:
    """The transport's error names the close code 4401 and its reason; nothing is started."""
    async with ai_sdk_server() as server:
        reported = await run_node("auth.test.mjs", server, tmp_path)
        reason = f"code 4401: {UNAUTHORIZED_REASON}"
        assert (
            reported["send"] == reported["resume"] == f"WebSocket chat network connection closed ({reason})."
        )
        stats = server.door.statistics()
        assert (stats.connections, stats.requests, stats.frames_sent) == (0, 0, 0)
        assert await server.runtime.list_jobs(user="alice") == []


async def test_another_users_chat_is_no_active(tmp_path: Path) -> None:
    async with ai_sdk_server() as server:
        reported = await run_node("isolation.test.mjs", server, tmp_path)
        assert reported["bobFound"] is False
        job = await only_job(server.runtime, reported["chatId"])
        assert (await ended(server.runtime, job.job_id)).job.status == "completed"
        assert await server.runtime.list_jobs(user="bob") == []


@pytest.fixture
def chromium() -> str:
    return node_tools.require_chromium()  # outside the trio run, so that a skip keeps its message


async def test_browser_page_reloaded_mid_answer_resumes(tmp_path: Path, chromium: str) -> None:
    with socket.socket() as probe:  # a free port for the page, whose Origin the server lists
        probe.bind(("127.0.0.1", 0))
        page_port = probe.getsockname()[1]
    page_origin = f"http://127.0.0.1:{page_port}"
    async with ai_sdk_server(auth_cookie="bs_token", allow_origins=(page_origin,)) as server:
        reported = await run_node(
            "browser.test.mjs",
            server,
            tmp_path,
            BACKSTREAM_CHROMIUM=chromium,
            BACKSTREAM_AUTH_COOKIE="bs_token",
            BACKSTREAM_PAGE_PORT=str(page_port),
        )
        info = await ended(server.runtime, (await only_job(server.runtime, reported["chatId"])).job_id)
        assert info.job.status == "completed"
        assert reported["text"] == info.content
        assert info.content.startswith(reported["partial"]) and reported["partial"] != info.content
        assert reported["failure"]["closed"] == {"code": 4401, "reason": UNAUTHORIZED_REASON}


def test_the_guides_close_code_reader_is_the_one_the_browser_runs() -> None:
    guide = (PACKAGE.parent.parent / "docs" / "http-apis.md").read_text()
    found = re.search(r"^function closeOf\(error\) \{\n.*?^\}\n", guide, flags=re.S | re.M)
    assert found is not None
    assert found.group() in (PACKAGE / "page" / "app.mjs").read_text()


async def test_the_javascript_type_checks() -> None:
    node = require_node()
    with trio.fail_after(120):
        done = await trio.run_process(
            [node, "node_modules/typescript/bin/tsc", "-p", "."],
            cwd=PACKAGE,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace")


async def test_coalesced_frames_assemble_the_answer(tmp_path: Path) -> None:
    async with ai_sdk_server() as server:
        reported = await run_node("coalesce.test.mjs", server, tmp_path)
        job = await only_job(server.runtime, reported["chatId"])
        info = await ended(server.runtime, job.job_id)
        assert info.job.status == "completed"
        assert reported["text"] == info.content == reported["replayText"]
        # 200 text entries over about a second, at most one text frame per 100 ms: about ten
        # (the bound leaves room for a loaded machine stretching the job to four seconds).
        assert reported["textDeltaFrames"] <= 40
        assert reported["chunkFrames"] < info.job.seq // 4
        assert reported["replayChunkFrames"] <= reported["chunkFrames"]


async def test_a_workflow_sends_its_steps_as_data_parts(tmp_path: Path) -> None:
    """The built-in demo workflow through useChat's Chat: a data part per step, updated in
    place; its approval as a tool part, decided as a tool's; the text as the job's content."""
    async with ai_sdk_server() as server:
        reported = await run_node("workflow.test.mjs", server, tmp_path)
        info = await ended(server.runtime, (await only_job(server.runtime, reported["chatId"])).job_id)
    assert info.job.status == "completed" and info.job.model == "workflow/demo"
    assert reported["text"] == info.content
    assert [s["name"] for s in reported["steps"]] == [
        "model:backstream/echo",
        "tool:calculate",
        "tool:clock_now",
        "approve",
        "model:backstream/echo",
    ]
    assert info.step is not None and info.step.step == 5 and info.step.status == "finished"
