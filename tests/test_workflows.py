"""Workflows in one process: the API, the steps in the log, replay from a log, limits and
bad input. (Crashes with real server processes: test_workflow_recovery.py.)"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import attrs
import pytest
import trio

import backstream
from backstream import Config, MemoryStore, open_runtime
from backstream.actors.clock import WallClock
from backstream.actors.job import JobActor
from backstream.actors.joblog import JobLog
from backstream.actors.workflow import WorkflowTarget
from backstream.protocol.conversation import INTERRUPTED_CALL_OUTPUT
from backstream.protocol.events import (
    ApprovalEvent,
    ApprovalRequiredEvent,
    LogEvent,
    StatusEvent,
    StepEvent,
    TextEvent,
)
from backstream.protocol.records import JobProgress, JobRecord, JobRequest
from backstream.protocol.ui_chunks import UIChunkTranslator
from backstream.protocol.workflow import current_step, workflow_history
from backstream.runtime.models.router import ModelRouter
from backstream.runtime.models.workflows import WorkflowRegistry
from backstream.runtime.tools.registry import ToolRegistry
from backstream.workflows import StepFailed, WorkflowContext, workflow
from tests import workflow_samples
from tests.job_harness import new_record, tool_registry


def tools() -> ToolRegistry:
    registry = tool_registry()  # the built-ins and send_note (needs approval)
    registry.register(workflow_samples.count)
    return registry


async def start(rt: backstream.Runtime, name: str, input: dict[str, Any], message_id: str = "m") -> str:
    started = await rt.start_job(
        user="alice",
        thread_id="t",
        message_id=message_id,
        model=f"workflow/{name}",
        messages=[],
        workflow_input=input,
    )
    return started.job_id


async def run_to_end(rt: backstream.Runtime, job_id: str, decisions: tuple[bool, ...] = ()) -> list[LogEvent]:
    """The job's entries from its start to its end, deciding each approval in turn."""
    events: list[LogEvent] = []
    left = list(decisions)
    with trio.fail_after(30):
        async with rt.watch(job_id, user="alice") as batches:
            async for batch in batches:
                events += batch.events
                for ev in batch.events:
                    if isinstance(ev, ApprovalRequiredEvent):
                        await rt.approve(job_id, ev.call_id, left.pop(0), user="alice")
    return events


def steps_of(events: list[LogEvent]) -> list[tuple[int, str, str]]:
    return [(e.step, e.name, e.phase) for e in events if isinstance(e, StepEvent)]


async def test_the_demo_workflow_plans_calls_two_tools_asks_and_summarizes() -> None:
    async with open_runtime(Config()) as rt:
        job_id = await start(rt, "demo", {"expression": "6*7"})
        events = await run_to_end(rt, job_id, (True,))
        info = await rt.get_job(job_id, user="alice", include_content=True)
    names = [name for _, name, phase in steps_of(events) if phase == "finished"]
    assert names == [
        "model:backstream/echo",
        "tool:calculate",
        "tool:clock_now",
        "approve",
        "model:backstream/echo",
    ]
    # Each step's result is in the log before the next step starts.
    assert [phase for *_, phase in steps_of(events)] == ["started", "finished"] * 5
    assert info.job.status == "completed" and info.job.usage is not None
    assert (info.content or "").startswith("Plan: compute 6*7, read the clock, ask, summarize.\n\n6*7 = 42\n\n")
    assert (info.content or "").endswith(".") and "Summary: 6*7 = 42 at " in (info.content or "")
    assert info.step is not None and (info.step.step, info.step.name, info.step.status) == (
        5,
        "model:backstream/echo",
        "finished",
    )
    statuses = [e.status for e in events if isinstance(e, StatusEvent)]
    assert statuses == ["running", "awaiting_approval", "running", "completed"]


async def test_a_declined_approval_and_a_tool_that_needs_one() -> None:
    @workflow(name="note")
    async def note(ctx: WorkflowContext, input: dict[str, Any]) -> str:
        sent = await ctx.tool("send_note", {"to": "ops", "text": "hi"})
        return f"{sent.is_error}:{sent.output}"

    async with open_runtime(Config(), tools=tools(), workflows=[note]) as rt:
        declined = await start(rt, "demo", {}, "m1")
        await run_to_end(rt, declined, (False,))
        noted = await start(rt, "note", {}, "m2")
        events = await run_to_end(rt, noted, (True,))
        first = await rt.get_job(declined, user="alice", include_content=True)
        second = await rt.get_job(noted, user="alice", include_content=True)
    assert (first.content or "").endswith("No summary: the person declined.")
    asked = [e for e in events if isinstance(e, ApprovalRequiredEvent)]
    assert [(a.call_id, a.name) for a in asked] == [("step_1", "tool:send_note")]
    assert second.content == "False:a note of 2 characters for ops (a demo tool: it sends nothing anywhere)"


async def test_a_model_step_with_tools_runs_its_calls_as_steps() -> None:
    @workflow(name="asker")
    async def asker(ctx: WorkflowContext, input: dict[str, Any]) -> str:
        reply = await ctx.model(
            "backstream/tools-demo", [{"role": "user", "content": "what is 6*7?"}], ["calculate"]
        )
        return reply.text

    async with open_runtime(Config(), workflows=[asker]) as rt:
        job_id = await start(rt, "asker", {})
        events = await run_to_end(rt, job_id)
        info = await rt.get_job(job_id, user="alice", include_content=True)
    finished = [name for _, name, phase in steps_of(events) if phase == "finished"]
    assert finished == ["model:backstream/tools-demo", "tool:calculate", "model:backstream/tools-demo"]
    assert info.job.status == "completed" and "42" in (info.content or "")


async def test_an_exception_fails_the_job_with_its_type_and_message_only() -> None:
    async with open_runtime(Config(), workflows=workflow_samples.WORKFLOWS, tools=tools()) as rt:
        job_id = await start(rt, "broken", {})
        events = await run_to_end(rt, job_id)
    end = events[-1]
    assert isinstance(end, StatusEvent) and end.status == "failed" and end.error is not None
    assert (end.error.code, end.error.message) == ("workflow_error", "KeyError: 'no such thing'")


async def test_an_unknown_workflow_is_a_bad_request_naming_the_known_ones() -> None:
    async with open_runtime(Config(), workflows=workflow_samples.WORKFLOWS, tools=tools()) as rt:
        with pytest.raises(
            backstream.BadRequestError,
            match=r"unknown workflow 'nope' \(known: broken, demo, gated, many, shout, steps\)",
        ):
            await start(rt, "nope", {})
        with pytest.raises(backstream.BadRequestError, match="input must be an object"):
            await rt.start_job(
                user="alice",
                thread_id="t",
                message_id="x",
                model="workflow/demo",
                messages=[],
                workflow_input=[1],  # type: ignore[arg-type]
            )


async def test_max_steps_and_max_recorded_bytes_end_the_job_workflow_limit() -> None:
    config = Config(max_workflow_steps=5)
    async with open_runtime(config, workflows=workflow_samples.WORKFLOWS, tools=tools()) as rt:
        events = await run_to_end(rt, await start(rt, "many", {"n": 10}))
    end = events[-1]
    assert isinstance(end, StatusEvent) and end.error is not None and end.error.code == "workflow_limit"
    assert len([e for e in events if isinstance(e, StepEvent) and e.phase == "finished"]) == 5
    config = Config(max_workflow_recorded_bytes=300)
    async with open_runtime(config, workflows=workflow_samples.WORKFLOWS, tools=tools()) as rt:
        events = await run_to_end(rt, await start(rt, "many", {"n": 1000}))
    end = events[-1]
    assert isinstance(end, StatusEvent) and end.error is not None
    assert end.error.code == "workflow_limit" and "max_workflow_recorded_bytes (300)" in end.error.message


# -- replay from a log (the job actor given a rebuilt log, as after a takeover) ----------------


def record_for(name: str, input: dict[str, Any]) -> JobRecord:
    request = JobRequest(model=f"workflow/{name}", messages=(), annotations={"workflow_input": input})
    return new_record(request)


async def run_actor(
    flow: backstream.workflows.Workflow,
    record: JobRecord,
    config: Config,
    entries: tuple[LogEvent, ...] | list[LogEvent] = (),
) -> JobActor:
    store = MemoryStore()
    await store.open()
    await store.create_job(record)
    if entries:  # the store holds the log the actor continues, as after a crash
        length = sum(len(e.text) for e in entries if isinstance(e, TextEvent))
        await store.commit(record.job_id, entries, JobProgress("running", len(entries), length, 1.0))
    log = (
        JobLog.from_entries(record.job_id, 1, entries, max_output_chars=config.max_output_chars)
        if entries
        else None
    )
    # The model router resolves the workflow and the models its steps name, as in a server.
    router = ModelRouter(config, {}, None, WorkflowRegistry([flow]))
    target = router.resolve(record.request)
    assert isinstance(target, WorkflowTarget)
    actor = JobActor(
        record,
        config=config,
        store=store,
        model=target,
        clock=WallClock(),
        tools=tools(),
        log=log,
        continuation=router.continuation(record.model),
    )
    await actor.run()
    return actor


def started(step: int, name: str, data: Any = None) -> StepEvent:
    return StepEvent(0, step, name, "started", "", None if data is None else json.dumps(data))


def finished(step: int, name: str, result: Any) -> StepEvent:
    return StepEvent(0, step, name, "finished", "", json.dumps(result))


def numbered(*entries: LogEvent) -> list[LogEvent]:
    return [attrs.evolve(e, seq=i) for i, e in enumerate(entries, 1)]


async def test_a_replay_returns_recorded_results_and_resumes_a_sleep_with_what_is_left(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[str] = []

    @workflow(name="slow")
    async def slow(ctx: WorkflowContext, input: dict[str, Any]) -> str:
        first = await ctx.step("pick", lambda: calls.append("pick") or 7)
        await ctx.emit(f"picked {first};")
        await ctx.sleep(100)
        return "woke"

    until = WallClock().now() + 30  # 70 of the 100 seconds passed before the crash
    log = numbered(
        StatusEvent(0, "running"),
        started(1, "pick"),
        finished(1, "pick", 7),
        TextEvent(0, "picked 7;"),
        started(2, "sleep", {"seconds": 100, "until": until}),
    )
    begin = trio.current_time()
    actor = await run_actor(slow, record_for("slow", {}), Config(job_timeout=1000), log)
    assert calls == []  # the recorded step did not run again
    assert 29.9 < trio.current_time() - begin < 30.5
    assert actor.log.terminal is not None and actor.log.terminal.status == "completed"
    assert actor.log.content() == "picked 7;woke"  # the text in the log was not emitted again


async def test_a_step_timeout_is_recorded_and_raised_again_on_replay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    @workflow(name="hangs")
    async def hangs(ctx: WorkflowContext, input: dict[str, Any]) -> str:
        async def wait() -> None:
            await trio.sleep(10)

        try:
            await ctx.step("wait", wait)
        except StepFailed as failed:
            return f"{failed.type}: {failed.message}"
        return "no"

    actor = await run_actor(hangs, record_for("hangs", {}), Config(workflow_step_timeout=2))
    assert actor.log.content() == "StepTimeout: the step outlived workflow_step_timeout (2 s)"
    entries = list(actor.log.entries())[:-2]  # as if it crashed before the text and the end
    again = await run_actor(hangs, record_for("hangs", {}), Config(workflow_step_timeout=2), entries)
    assert again.log.content() == actor.log.content()
    assert len([e for e in again.log.entries() if isinstance(e, StepEvent)]) == 2  # not run again


async def test_a_diverged_replay_fails_even_if_the_workflow_catches_it() -> None:
    @workflow(name="careless")
    async def careless(ctx: WorkflowContext, input: dict[str, Any]) -> str:
        with contextlib.suppress(Exception):  # a careless workflow: the divergence is not lost
            await ctx.tool("calculate", {"expression": "1+1"})
        await ctx.emit("went on")
        return "done"

    log = numbered(StatusEvent(0, "running"), started(1, "tool:count"), finished(1, "tool:count", {}))
    actor = await run_actor(careless, record_for("careless", {}), Config(), log)
    end = actor.log.terminal
    assert end is not None and end.error is not None and end.error.code == "workflow_diverged"
    assert end.error.message == (
        "step 1: the replay diverged from the log: the log holds 'tool:count', the workflow asked for 'tool:calculate'"
    )
    assert actor.log.content() == ""


async def test_a_sleep_counts_toward_the_job_timeout(autojump_clock: trio.testing.MockClock) -> None:
    @workflow(name="sleepy")
    async def sleepy(ctx: WorkflowContext, input: dict[str, Any]) -> str:
        await ctx.sleep(60)
        return "late"

    actor = await run_actor(sleepy, record_for("sleepy", {}), Config(job_timeout=10))
    end = actor.log.terminal
    assert end is not None and end.error is not None and end.error.code == "timeout"


def test_the_history_and_the_current_step_of_a_log() -> None:
    log = numbered(
        StatusEvent(0, "running"),
        TextEvent(0, "a"),
        started(1, "approve", {"prompt": "p"}),
        ApprovalRequiredEvent(0, "step_1", "approve", "{}"),
        StatusEvent(0, "awaiting_approval"),
    )
    history = workflow_history(log)
    assert [(s.step, s.name, s.finished, s.text_before, s.approval_asked) for s in history.steps] == [
        (1, "approve", None, "a", True)
    ]
    now = current_step(log)
    assert now is not None and (now.step, now.name, now.status) == (1, "approve", "running")


def test_the_ai_sdk_stream_has_a_data_part_per_step_and_a_tool_part_for_an_approval() -> None:
    log = numbered(
        StatusEvent(0, "running"),
        started(1, "approve", {"prompt": "p"}),
        ApprovalRequiredEvent(0, "step_1", "approve", '{"prompt": "p"}'),
        StatusEvent(0, "awaiting_approval"),
    )
    translator = UIChunkTranslator(message_id="m", job_id="j")
    chunks = [c for e in log for c in translator.feed(e)]
    steps = [c for c in chunks if c["type"] == "data-backstream-step"]
    assert steps == [
        {
            "type": "data-backstream-step",
            "id": "step-1",
            "data": {"step": 1, "name": "approve", "status": "running", "summary": ""},
        }
    ]
    kinds = [c["type"] for c in chunks]
    assert kinds[-3:] == ["tool-input-available", "tool-approval-request", "finish"]
    assert translator.paused


async def test_a_thousand_steps_hold_bounded_memory_and_replay_without_running_a_step() -> None:
    """The bench's measure (bench/workflow_replay.py) on SQLite: the run and the replay's
    Python memory stay within a few MB (the log's step entries), and the replay of 1,000
    recorded steps runs none of them again (``measure`` checks) and takes well under a
    second."""
    from bench.workflow_replay import measure

    row = await measure(1000)
    assert row["step_entries"] == 2000 and row["log_entries"] == 2003
    assert row["run_peak_mb"] < 16 and row["replay_peak_mb"] < 16
    assert row["replay_s"] < 2.0


def test_workflows_load_from_serve_settings_and_the_entry_point_group(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backstream.runtime.server.serve import load_workflows
    from backstream.runtime.server.settings import ServeSettings

    info = tmp_path / "sample_flows-1.0.dist-info"  # an installed package, as importlib.metadata finds one
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sample-flows\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[backstream.workflows]\nsamples = tests.workflow_samples:WORKFLOWS\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_workflows(ServeSettings.defaults())
    assert loaded.names() == ["broken", "demo", "gated", "many", "shout", "steps"]
    with pytest.raises(ValueError, match=r"--workflows tests\.workflow_samples:nothing: AttributeError"):
        load_workflows(ServeSettings.defaults(workflows=("tests.workflow_samples:nothing",)))
    with pytest.raises(ValueError, match="a workflow named 'steps' is registered already"):
        load_workflows(ServeSettings.defaults(workflows=("tests.workflow_samples:steps",)))
    with pytest.raises(ValueError, match="not a workflow or a list of workflows"):
        load_workflows(ServeSettings.defaults(workflows=("tests.workflow_samples:count",)))


async def test_job_start_names_a_model_or_a_workflow_over_the_websocket(upstream: Any) -> None:
    from backstream.client import open_client
    from tests.test_responses_api import served

    async with served(upstream) as server, open_client(server.ws_url, "tok-alice") as client:
        started = await client.start_job(thread_id="t", message_id="m1", workflow="demo", workflow_input={"expression": "2+3"})
        assert started.job.model == "workflow/demo" and started.job.status == "running"
        with pytest.raises(backstream.BadRequestError, match="a model or a workflow, not both"):
            await client.start_job(thread_id="t", message_id="m2", model="backstream/echo", workflow="demo")
        with pytest.raises(backstream.BadRequestError, match="needs a model"):
            await client.start_job(thread_id="t", message_id="m3")
        with pytest.raises(backstream.BadRequestError, match=r"unknown workflow 'nope' \(known: demo\)"):
            await client.start_job(thread_id="t", message_id="m4", workflow="nope")
        with trio.fail_after(10):
            while (await client.get(started.job.job_id)).job.status != "awaiting_approval":
                await trio.sleep(0.05)
        info = await client.get(started.job.job_id, include_content=True)
        assert info.step is not None and (info.step.step, info.step.name) == (4, "approve")
        assert "2+3 = 5" in (info.content or "")


def test_the_workflows_guides_example_runs_and_prints_what_it_says() -> None:
    import re
    import subprocess
    import sys
    from pathlib import Path

    guide = (Path(__file__).resolve().parent.parent / "docs" / "workflows.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", guide, flags=re.S) if "trio.run(main)" in b)
    printed = guide.split(example, 1)[1].split("It prints:\n\n```\n", 1)[1].split("```", 1)[0]
    result = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == printed


async def test_an_approved_tool_step_cut_short_is_not_run_again() -> None:
    """The log holds the person's yes, not the tool's result: the tool may have run when its
    server died, and ``send_note`` is not idempotent, so the replay does not run it."""

    @workflow(name="noter")
    async def noter(ctx: WorkflowContext, input: dict[str, Any]) -> str:
        sent = await ctx.tool("send_note", {"to": "ops", "text": "hi"})
        return f"{sent.is_error}: {sent.output}"

    arguments = json.dumps({"to": "ops", "text": "hi"})
    log = numbered(
        StatusEvent(0, "running"),
        started(1, "tool:send_note", {"arguments": arguments}),
        ApprovalRequiredEvent(0, "step_1", "tool:send_note", arguments),
        StatusEvent(0, "awaiting_approval"),
        ApprovalEvent(0, "step_1", True),
    )
    actor = await run_actor(noter, record_for("noter", {}), Config(), log)
    assert actor.log.content() == f"True: {INTERRUPTED_CALL_OUTPUT}"
    statuses = [e.status for e in actor.log.entries() if isinstance(e, StatusEvent)]
    assert statuses == ["running", "awaiting_approval", "running", "completed"]


@pytest.mark.parametrize(
    ("entries", "emit", "message"),
    [
        (
            [finished(1, "pick", 1), started(2, "other"), finished(2, "other", 2)],
            False,
            "step 2: the replay diverged from the log: the workflow ended; the log holds step 'other' next",
        ),
        (
            [finished(1, "pick", 1), started(2, "other"), finished(2, "other", 2)],
            True,
            "step 2: the replay diverged from the log: it emitted 'bye' where the log holds step 'other'",
        ),
        (
            [finished(1, "pick", 1), TextEvent(0, "hello")],
            True,
            "step 2: the replay diverged from the log: it emitted 'bye' where the log holds 'hello'",
        ),
    ],
)
async def test_a_replay_that_ends_or_emits_otherwise_than_the_log_diverges(
    entries: list[LogEvent], emit: bool, message: str
) -> None:
    @workflow(name="short")
    async def short(ctx: WorkflowContext, input: dict[str, Any]) -> str:
        await ctx.step("pick", lambda: 1)
        if input["emit"]:
            await ctx.emit("bye")
        return ""

    log = numbered(StatusEvent(0, "running"), started(1, "pick"), *entries)
    actor = await run_actor(short, record_for("short", {"emit": emit}), Config(), log)
    end = actor.log.terminal
    assert end is not None and end.error is not None
    assert (end.error.code, end.error.message) == ("workflow_diverged", message)


async def test_bad_calls_raise_in_the_workflow_and_record_nothing() -> None:
    @workflow(name="clumsy")
    async def clumsy(ctx: WorkflowContext, input: dict[str, Any]) -> str:
        said = []
        for call in (
            lambda: ctx.model("backstream/echo", [{"role": "user", "content": "x"}], ["no_such_tool"]),
            lambda: ctx.step("approve", lambda: 1),
            lambda: ctx.sleep(-1),
        ):
            try:
                await call()
            except ValueError as exc:
                said.append(str(exc))
        failed = await ctx.tool("no_such_tool", {})
        said.append(failed.output)
        try:
            await ctx.model("nobody/here", [{"role": "user", "content": "x"}])
        except StepFailed as exc:
            said.append(f"{exc.type}")
        return " | ".join(said)

    actor = await run_actor(clumsy, record_for("clumsy", {}), Config())
    assert actor.log.content() == (
        "unknown tool: 'no_such_tool' | ctx.step: 'approve' is not a step name of its own"
        " | ctx.sleep: seconds must be a number, at least 0 | tool 'no_such_tool' does not exist"
        " | BadRequestError"
    )
    assert [(e.step, e.name, e.phase) for e in actor.log.entries() if isinstance(e, StepEvent)] == [
        (1, "tool:no_such_tool", "started"),
        (1, "tool:no_such_tool", "finished"),
        (2, "model:nobody/here", "started"),
        (2, "model:nobody/here", "finished"),
    ]
