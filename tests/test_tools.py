"""Server-side tools: the registry, the loop (model, tool, model) and human approval."""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
import trio

import backstream
from backstream import Config, MemoryStore, open_runtime
from backstream.protocol.events import (
    ApprovalEvent,
    ApprovalRequiredEvent,
    StatusEvent,
    TextEvent,
    ToolCallDeltaEvent,
    ToolCallEvent,
    ToolResultEvent,
)
from backstream.runtime.stores.sqlite import SqliteStore
from backstream.runtime.tools.registry import ToolRegistry, calculate, run_tool, schema_for, tool
from tests import sample_tools
from tests.helpers import check_contiguous, collect, joined_text, terminal
from tests.upstream_server import FakeUpstream, events, finish_chunk, streams, tool_chunk

MSG = [{"role": "user", "content": "what is 1+2?"}]


def registry(*extra: Any) -> ToolRegistry:
    tools = ToolRegistry.with_builtins()
    for item in extra:
        tools.register(item)
    return tools


def tool_turn(*calls: tuple[str, str, str]) -> Any:
    """A turn whose tool calls' arguments arrive split in two fragments each, interleaved."""
    chunks: list[Any] = []
    for index, (call_id, name, arguments) in enumerate(calls):
        chunks.append(
            tool_chunk(index, call_id=call_id, name=name, arguments=arguments[: len(arguments) // 2])
        )
    for index, (_, _, arguments) in enumerate(calls):
        chunks.append(tool_chunk(index, arguments=arguments[len(arguments) // 2 :]))
    return events([*chunks, finish_chunk("tool_calls"), "[DONE]"])


async def start(rt: backstream.Runtime, tools: list[str], message_id: str = "m") -> str:
    started = await rt.start_job(
        user="alice", thread_id="t", message_id=message_id, model="gpt-test", messages=MSG, tools=tools
    )
    return started.job_id


def kinds(batches: list[backstream.Batch]) -> list[str]:
    """The kinds of a job's events, without the argument fragments (checked on their own)."""
    return [ev.kind for b in batches for ev in b.events if ev.kind != "tool_call_delta"]


# -- the registry ---------------------------------------------------------------------------


def test_schemas_from_type_hints_and_parameter_classes() -> None:
    schema, cls = schema_for(sample_tools.add)
    assert cls is None
    assert schema["properties"]["a"] == {"type": "integer"} and schema["required"] == ["a"]
    assert schema["properties"]["note"] == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    schema, cls = schema_for(sample_tools.greet)
    assert cls is sample_tools.Greeting
    assert schema["properties"]["style"] == {"enum": ["plain", "loud"]} and schema["required"] == ["name"]
    made = tool(sample_tools.add)
    assert made.name == "add" and made.description == "Add two integers." and made.timeout == 30


def test_registry_loads_and_refuses_duplicates() -> None:
    tools = ToolRegistry.with_builtins()
    assert tools.names() == ["calculate", "clock_now"]
    tools.load("tests.sample_tools:greet")
    tools.load("tests.sample_tools:hang_isolated")
    assert "greet" in tools.names() and tools.get("hang_isolated").isolation == "subprocess"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="registered already"):
        tools.load("tests.sample_tools:greet")
    with pytest.raises(ValueError, match="module:attribute"):
        tools.load("nonsense")


@pytest.mark.parametrize(
    ("expression", "expected"),
    [("1+2", "3"), ("2*(3+4)", "14"), ("-2**3", "-8"), ("7/2", "3.5"), ("7//2", "3"), ("1e3 % 7", "6.0")],
)
async def test_calculate(expression: str, expected: str) -> None:
    outcome = await run_tool(calculate, json.dumps({"expression": expression}))
    assert outcome == backstream.actors.ports.ToolOutcome(expected, False)


@pytest.mark.parametrize(
    "expression",
    ["__import__('os').system('true')", "x + 1", "2**100000", "1/0", "[1, 2]", "(1).real", "'a' * 3"],
)
async def test_calculate_refuses_everything_else(expression: str) -> None:
    outcome = await run_tool(calculate, json.dumps({"expression": expression}))
    assert outcome.is_error


async def test_run_tool_errors_are_outcomes() -> None:
    assert (await run_tool(tool(sample_tools.add), "{not json")).output.startswith(
        "invalid arguments: not JSON"
    )
    bad = await run_tool(tool(sample_tools.add), '{"a": "one"}')
    assert bad.is_error and "a" in bad.output
    assert (await run_tool(tool(sample_tools.add), '{"a": 1, "extra": 2}')).is_error
    assert await run_tool(
        tool(sample_tools.greet), '{"name": "ada", "style": "loud"}'
    ) == backstream.actors.ports.ToolOutcome("HELLO ADA", False)
    broken = await run_tool(tool(sample_tools.broken), '{"x": 3}')
    assert broken.is_error and broken.output == "ValueError: cannot handle 3"


async def test_subprocess_isolation_kills_a_hanging_tool() -> None:
    t0 = trio.current_time()
    outcome = await run_tool(sample_tools.hang_isolated, '{"seconds": 30}')
    assert outcome.is_error and "timed out after 3 s" in outcome.output
    assert trio.current_time() - t0 < 6


async def test_subprocess_isolation_returns_results() -> None:
    # Generous timeout: a loaded machine may take seconds to start the child interpreter.
    quick = attrs.evolve(sample_tools.hang_isolated, timeout=30)
    outcome = await run_tool(quick, '{"seconds": 0}')
    assert outcome == backstream.actors.ports.ToolOutcome("done", False)


# -- the loop ----------------------------------------------------------------------------------


async def test_full_loop_two_calls_then_text(upstream: FakeUpstream) -> None:
    upstream.script(
        tool_turn(("call_a", "calculate", '{"expression": "1+2"}'), ("call_b", "clock_now", "{}")),
        streams(["1+2 is ", "3."]),
    )
    async with open_runtime(Config(upstream_url=upstream.url, drain_timeout=0)) as rt:
        job_id = await start(rt, ["calculate", "clock_now"])
        batches = await collect(rt, job_id)
        check_contiguous(batches)
        assert kinds(batches) == [
            "status",
            "tool_call",
            "tool_call",
            "tool_result",
            "tool_result",
            "text",
            "status",
        ]
        calls = [ev for b in batches for ev in b.events if isinstance(ev, ToolCallEvent)]
        assert [(c.call_id, c.name, c.arguments) for c in calls] == [
            ("call_a", "calculate", '{"expression": "1+2"}'),
            ("call_b", "clock_now", "{}"),
        ]
        # The fragments came first, as they streamed (interleaved), and join into each call.
        deltas = [ev for b in batches for ev in b.events if isinstance(ev, ToolCallDeltaEvent)]
        assert [d.call_id for d in deltas] == ["call_a", "call_b", "call_a", "call_b"]
        for call in calls:
            assert "".join(d.arguments_delta for d in deltas if d.call_id == call.call_id) == call.arguments
        assert max(d.seq for d in deltas) < min(c.seq for c in calls)
        results = [ev for b in batches for ev in b.events if isinstance(ev, ToolResultEvent)]
        assert results[0].output == "3" and not results[0].is_error and results[1].output.endswith("Z")
        assert joined_text(batches) == "1+2 is 3." and terminal(batches).status == "completed"
        info = await rt.get_job(job_id, user="alice", include_content=True)
        assert [(c.call_id, c.output, c.is_error) for c in info.tool_calls] == [
            ("call_a", "3", False),
            ("call_b", results[1].output, False),
        ]
    first, second = upstream.requests
    assert [t["function"]["name"] for t in first["tools"]] == ["calculate", "clock_now"]
    assistant, tool_a, tool_b = second["messages"][-3:]
    assert assistant["role"] == "assistant" and [c["id"] for c in assistant["tool_calls"]] == [
        "call_a",
        "call_b",
    ]
    assert tool_a == {"role": "tool", "tool_call_id": "call_a", "content": "3"}
    assert tool_b["tool_call_id"] == "call_b"


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (("c1", "calculate", '{"expression": '), "invalid arguments: not JSON"),
        (("c1", "no_such_tool", "{}"), "does not exist"),
        (("c1", "clock_now", "{}"), "not enabled for this job"),
        (("c1", "broken", '{"x": 1}'), "ValueError: cannot handle 1"),
        (("c1", "calculate", '{"expression": 5}'), "invalid arguments"),
    ],
    ids=["invalid-json", "unknown", "not-enabled", "exception", "wrong-type"],
)
async def test_bad_calls_become_error_results(
    upstream: FakeUpstream, call: tuple[str, str, str], fragment: str
) -> None:
    upstream.script(tool_turn(call), streams(["sorry"]))
    async with open_runtime(
        Config(upstream_url=upstream.url, drain_timeout=0), tools=registry(sample_tools.broken)
    ) as rt:
        batches = await collect(rt, await start(rt, ["calculate", "broken"]))
        result = next(ev for b in batches for ev in b.events if isinstance(ev, ToolResultEvent))
        assert result.is_error and fragment in result.output
        assert terminal(batches).status == "completed" and joined_text(batches) == "sorry"
    assert upstream.requests[1]["messages"][-1]["role"] == "tool"


async def test_tool_timeout(upstream: FakeUpstream, autojump_clock: trio.testing.MockClock) -> None:
    slow = tool(sample_tools.slow, timeout=5)
    upstream.script(tool_turn(("c1", "slow", '{"seconds": 60}')), streams(["ok"]))
    async with open_runtime(Config(upstream_url=upstream.url, drain_timeout=0), tools=registry(slow)) as rt:
        t0 = trio.current_time()
        batches = await collect(rt, await start(rt, ["slow"]))
        result = next(ev for b in batches for ev in b.events if isinstance(ev, ToolResultEvent))
        assert result.is_error and "timed out after 5 s" in result.output
        assert 5 <= trio.current_time() - t0 < 6 and terminal(batches).status == "completed"


async def test_turn_limit(upstream: FakeUpstream) -> None:
    upstream.default = tool_turn(("c", "clock_now", "{}"))
    async with open_runtime(Config(upstream_url=upstream.url, drain_timeout=0, max_turns=3)) as rt:
        batches = await collect(rt, await start(rt, ["clock_now"]))
        end = terminal(batches)
        assert end.status == "failed" and end.error is not None and end.error.code == "tool_loop_limit"
    assert len(upstream.requests) == 3


async def test_unregistered_tool_is_a_bad_request() -> None:
    async with open_runtime(Config(drain_timeout=0)) as rt:
        with pytest.raises(backstream.BadRequestError, match="unknown tool"):
            await rt.start_job(
                user="a",
                thread_id="t",
                message_id="m",
                model="backstream/echo",
                messages=MSG,
                tools=["rm_rf"],
            )


async def test_abort_during_a_tool(upstream: FakeUpstream, autojump_clock: trio.testing.MockClock) -> None:
    slow = tool(sample_tools.slow, timeout=500)
    upstream.script(tool_turn(("c1", "slow", '{"seconds": 300}')))
    async with open_runtime(Config(upstream_url=upstream.url, drain_timeout=0), tools=registry(slow)) as rt:
        job_id = await start(rt, ["slow"])
        await trio.sleep(10)
        t0 = trio.current_time()
        result = await rt.abort(job_id, user="alice")
        assert result.aborted and trio.current_time() - t0 < 1


# -- approval ------------------------------------------------------------------------------------


async def waiting(rt: backstream.Runtime, job_id: str) -> None:
    while (await rt.get_job(job_id, user="alice")).job.status != "awaiting_approval":
        await trio.sleep(0.01)


@pytest.mark.parametrize("approved", [True, False])
async def test_approve_or_deny(
    upstream: FakeUpstream, autojump_clock: trio.testing.MockClock, approved: bool
) -> None:
    upstream.script(tool_turn(("c1", "delete_files", '{"a": 2, "b": 3}')), streams(["done"]))
    async with open_runtime(
        Config(upstream_url=upstream.url, drain_timeout=0, job_timeout=60),
        tools=registry(sample_tools.delete_files),
    ) as rt:
        job_id = await start(rt, ["delete_files"])
        await waiting(rt, job_id)
        await trio.sleep(120)  # waiting for a person does not count toward job_timeout
        with pytest.raises(backstream.ConflictError):
            await rt.approve(job_id, "other_call", True, user="alice")
        with pytest.raises(backstream.NotFoundError):
            await rt.approve(job_id, "c1", True, user="bob")
        summary = await rt.approve(job_id, "c1", approved, user="alice")
        assert summary.status == "running"
        batches = await collect(rt, job_id)
        assert kinds(batches) == [
            "status",
            "tool_call",
            "approval_required",
            "status",
            "approval",
            "status",
            "tool_result",
            "text",
            "status",
        ]
        statuses = [ev.status for b in batches for ev in b.events if isinstance(ev, StatusEvent)]
        assert statuses == ["running", "awaiting_approval", "running", "completed"]
        decision = next(ev for b in batches for ev in b.events if isinstance(ev, ApprovalEvent))
        result = next(ev for b in batches for ev in b.events if isinstance(ev, ToolResultEvent))
        assert decision.approved is approved
        assert (result.output, result.is_error) == (
            ("5", False) if approved else ("the user declined to run this tool", True)
        )
        with pytest.raises(backstream.ConflictError):
            await rt.approve(job_id, "c1", True, user="alice")  # decided already


async def test_approval_timeout_counts_as_denial(
    upstream: FakeUpstream, autojump_clock: trio.testing.MockClock
) -> None:
    upstream.script(tool_turn(("c1", "delete_files", '{"a": 1}')), streams(["ok"]))
    async with open_runtime(
        Config(upstream_url=upstream.url, drain_timeout=0, approval_timeout=30),
        tools=registry(sample_tools.delete_files),
    ) as rt:
        t0 = trio.current_time()
        batches = await collect(rt, await start(rt, ["delete_files"]))
        decision = next(ev for b in batches for ev in b.events if isinstance(ev, ApprovalEvent))
        assert decision.approved is False and 30 <= trio.current_time() - t0 < 31
        assert terminal(batches).status == "completed"


async def test_abort_while_waiting_for_approval(
    upstream: FakeUpstream, autojump_clock: trio.testing.MockClock
) -> None:
    upstream.script(tool_turn(("c1", "delete_files", '{"a": 1}')))
    async with open_runtime(
        Config(upstream_url=upstream.url, drain_timeout=0), tools=registry(sample_tools.delete_files)
    ) as rt:
        job_id = await start(rt, ["delete_files"])
        await waiting(rt, job_id)
        connections = upstream.connections
        result = await rt.abort(job_id, user="alice")
        assert result.aborted and result.job.status == "aborted"
        assert upstream.connections == connections  # no upstream request was open while waiting
        batches = await collect(rt, job_id)
        assert kinds(batches) == ["status", "tool_call", "approval_required", "status", "status"]
        assert isinstance(batches[-1].events[-2], ApprovalRequiredEvent) or any(
            isinstance(ev, ApprovalRequiredEvent) for b in batches for ev in b.events
        )
        assert terminal(batches).status == "aborted"


async def test_watch_replay_shows_tool_entries_in_order_and_sqlite_keeps_them(
    upstream: FakeUpstream, tmp_path: Any
) -> None:
    upstream.script(tool_turn(("c1", "calculate", '{"expression": "6*7"}')), streams(["42"]))
    config = Config(upstream_url=upstream.url, drain_timeout=0)
    async with open_runtime(config, store=SqliteStore(tmp_path / "jobs.db")) as rt:
        job_id = await start(rt, ["calculate"])
        live = await collect(rt, job_id)
    async with open_runtime(config, store=SqliteStore(tmp_path / "jobs.db")) as rt:  # a restart
        replay = await collect(rt, job_id)
        assert [ev for b in replay for ev in b.events if not isinstance(ev, TextEvent)] == [
            ev for b in live for ev in b.events if not isinstance(ev, TextEvent)
        ]
        info = await rt.get_job(job_id, user="alice", include_content=True)
        assert [(c.name, c.arguments, c.output) for c in info.tool_calls] == [
            ("calculate", '{"expression": "6*7"}', "42")
        ]
        assert info.content == "42"
    assert MemoryStore  # the memory store is covered by the tests above


async def test_approval_through_the_front_door(
    upstream: FakeUpstream, autojump_clock: trio.testing.MockClock
) -> None:
    from tests.ws_helpers import raw_client, served

    upstream.script(tool_turn(("c1", "delete_files", '{"a": 4, "b": 4}')), streams(["ok"]))
    async with served(Config(upstream_url=upstream.url, drain_timeout=0)) as srv:
        srv.runtime.tools.register(sample_tools.delete_files)
        async with raw_client(srv.url) as c:
            welcome = await c.hello()
            assert welcome["features"]["approvals"] is True and "calculate" in welcome["features"]["tools"]
            started = await c.request(
                "job.start",
                thread_id="t",
                message_id="m",
                model="gpt-test",
                messages=MSG,
                tools=["delete_files"],
                watch=True,
            )
            job_id = started["job"]["job_id"]
            while True:
                event = await c.recv()
                if event.get("type") == "job.events" and any(
                    e["kind"] == "approval_required" for e in event["events"]
                ):
                    break
            early = await c.request("job.approve", job_id=job_id, call_id="nope", approved=True)
            assert early["code"] == "conflict"
            reply = await c.request("job.approve", job_id=job_id, call_id="c1", approved=True)
            assert reply["type"] == "job.approve.result" and reply["job"]["status"] == "running"
            batches = await c.events_until_terminal(job_id)
            results = [e for b in batches for e in b["events"] if e["kind"] == "tool_result"]
            assert results == [
                {
                    "seq": results[0]["seq"],
                    "call_id": "c1",
                    "name": "delete_files",
                    "output": "8",
                    "is_error": False,
                    "kind": "tool_result",
                }
            ]


async def test_approval_through_another_instance(upstream: FakeUpstream) -> None:
    import uuid

    from backstream.runtime.stores.redis import RedisStore
    from tests.conftest import delete_prefix, redis_url, require_redis

    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    upstream.script(tool_turn(("c1", "delete_files", '{"a": 1, "b": 1}')), streams(["ok"]))
    config = Config(upstream_url=upstream.url, drain_timeout=0, flush_ms=20)
    try:
        async with (
            open_runtime(
                config,
                store=RedisStore(redis_url(), prefix=prefix),
                tools=registry(sample_tools.delete_files),
            ) as a,
            open_runtime(
                config,
                store=RedisStore(redis_url(), prefix=prefix),
                tools=registry(sample_tools.delete_files),
            ) as b,
        ):
            job_id = await start(a, ["delete_files"])
            with trio.fail_after(5):
                while (await b.get_job(job_id, user="alice")).job.status != "awaiting_approval":
                    await trio.sleep(0.05)
            with pytest.raises(backstream.ConflictError):
                await b.approve(job_id, "c2", True, user="alice")
            summary = await b.approve(job_id, "c1", True, user="alice")
            assert summary.status in ("running", "completed")
            batches = await collect(b, job_id)
            result = next(ev for bt in batches for ev in bt.events if isinstance(ev, ToolResultEvent))
            assert (result.output, result.is_error) == ("2", False) and terminal(
                batches
            ).status == "completed"
    finally:
        await delete_prefix(prefix)


def test_tools_from_the_entry_point_group(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real installed distribution's metadata: the group as a package would declare it.
    dist = tmp_path / "sample_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sample-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[backstream.tools]\ngreet = tests.sample_tools:greet\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    tools = ToolRegistry.with_builtins()
    loaded = tools.load_entry_points()
    assert [t.name for t in loaded] == ["greet"] and "greet" in tools.names()
