"""Workflows across crashes, with real server processes and real stores: killed with
SIGKILL mid-workflow, a server restarted on the same SQLite file (or another instance on
Redis) finishes it; the counting tool shows that every step that finished ran once."""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from backstream.client import Client, open_client
from backstream.protocol.events import ApprovalRequiredEvent, LogEvent, StepEvent
from bench._procs import ServeProcess
from tests.conftest import delete_prefix, redis_url, require_redis

ROOT = Path(__file__).resolve().parent.parent
SERVE = ("--token", "tok=alice", "--log-level", "warning")
SAMPLES = ("--workflows", "tests.workflow_samples:WORKFLOWS", "--tools", "tests.workflow_samples:count")


@contextmanager
def server(store: str, env: dict[str, str], *extra: str) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    serving = ServeProcess(
        [*SERVE, "--store", store, *SAMPLES, *extra], {"PYTHONPATH": str(ROOT), **env}, cwd=str(ROOT)
    )
    try:
        serving.start()
        assert serving.proc is not None
        yield serving.port, serving.proc
    finally:
        serving.kill()


def counted(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


async def watch_until(client: Client, job_id: str, stop: Callable[[list[LogEvent]], bool]) -> list[LogEvent]:
    """The job's entries from its start until ``stop`` says so (or the job ends)."""
    seen: list[LogEvent] = []
    with trio.fail_after(30):
        async with client.watch(job_id) as batches:
            async for batch in batches:
                seen += batch.events
                if stop(seen) or batch.terminal is not None:
                    break
    return seen


async def entries_to_end(client: Client, job_id: str) -> list[LogEvent]:
    return await watch_until(client, job_id, lambda _: False)


def finished_tools(events: list[LogEvent]) -> list[StepEvent]:
    return [
        e for e in events if isinstance(e, StepEvent) and e.phase == "finished" and e.name.startswith("tool:")
    ]


def check_each_finished_step_ran_once(events: list[LogEvent], labels: list[str]) -> None:
    """Every counting step the log holds finished ran exactly once, and no other ran."""
    ran = [json.loads(e.data or "{}")["output"].removeprefix("counted ") for e in finished_tools(events)]
    assert sorted(labels) == sorted(ran) and len(set(labels)) == len(labels), (labels, ran)


def in_a_sleep_after(tools: int) -> Callable[[list[LogEvent]], bool]:
    """True once ``tools`` tool steps finished and the sleep after the last one started."""

    def stop(seen: list[LogEvent]) -> bool:
        last = seen[-1] if seen else None
        done = len(finished_tools(seen))
        return (
            done >= tools and isinstance(last, StepEvent) and last.name == "sleep" and last.phase == "started"
        )

    return stop


PAUSE = {signal.SIGKILL: 0.5, signal.SIGTERM: 3.0}  # a stop takes its time: it comes mid-sleep


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
async def test_stopped_mid_workflow_on_sqlite_a_restart_finishes_it(tmp_path: Path, sig: int) -> None:
    """Killed (or stopped: the job is left running for the next start) in a sleep."""
    store, count = f"sqlite:///{tmp_path}/jobs.db", tmp_path / "count"
    env = {"BACKSTREAM_TEST_COUNT_FILE": str(count)}
    with server(store, env, "--drain-timeout", "0") as (port, proc):
        async with open_client(f"ws://127.0.0.1:{port}/v1", "tok") as client:
            started = await client.start_job(
                thread_id="t", message_id="m", workflow="steps", workflow_input={"n": 6, "pause": PAUSE[sig]}
            )
            job_id = started.job.job_id
            await watch_until(client, job_id, in_a_sleep_after(3))
            proc.send_signal(sig)
            proc.wait()
    assert counted(count) == ["s0", "s1", "s2"]  # stopped in the sleep after the third step
    with server(store, env) as (port, _):  # the next start continues the workflow
        async with open_client(f"ws://127.0.0.1:{port}/v1", "tok") as client:
            events = await entries_to_end(client, job_id)
            info = await client.get(job_id, include_content=True)
    assert info.job.status == "completed" and info.job.epoch == 2
    assert info.content == "".join(f"counted s{i};" for i in range(6)) + "done"
    assert counted(count) == [f"s{i}" for i in range(6)]  # each step's tool ran once
    check_each_finished_step_ran_once(events, counted(count))
    assert info.step is not None and info.step.step == 12 and info.step.status == "finished"


async def test_kill_9_on_redis_another_instance_takes_the_workflow_over(tmp_path: Path) -> None:
    require_redis()
    prefix, count = f"bstest:{uuid.uuid4().hex[:12]}", tmp_path / "count"
    env = {"BACKSTREAM_REDIS_PREFIX": prefix, "BACKSTREAM_TEST_COUNT_FILE": str(count)}
    leases = ("--lease-ttl", "1.5", "--lease-renew-interval", "0.3")
    try:
        with (
            server(redis_url(), env, *leases) as (port_a, proc_a),
            server(redis_url(), env, *leases) as (port_b, _),
        ):
            async with (
                open_client(f"ws://127.0.0.1:{port_a}/v1", "tok") as a,
                open_client(f"ws://127.0.0.1:{port_b}/v1", "tok") as b,
            ):
                started = await a.start_job(
                    thread_id="t", message_id="m", workflow="steps", workflow_input={"n": 6, "pause": 0.4}
                )
                job_id = started.job.job_id
                # Watched through the other instance, which takes the job over and finishes it.
                events = await watch_until(b, job_id, in_a_sleep_after(2))
                proc_a.send_signal(signal.SIGKILL)
                proc_a.wait()
                events = await entries_to_end(b, job_id)
                info = await b.get(job_id, include_content=True)
        assert info.job.status == "completed" and info.job.epoch == 2
        assert info.content == "".join(f"counted s{i};" for i in range(6)) + "done"
        assert counted(count) == [f"s{i}" for i in range(6)]
        check_each_finished_step_ran_once(events, counted(count))
    finally:
        await delete_prefix(prefix)


async def test_an_approval_pending_across_a_restart_is_decided_on_the_next_server(tmp_path: Path) -> None:
    store, count = f"sqlite:///{tmp_path}/jobs.db", tmp_path / "count"
    env = {"BACKSTREAM_TEST_COUNT_FILE": str(count)}
    with server(store, env) as (port, proc):
        async with open_client(f"ws://127.0.0.1:{port}/v1", "tok") as client:
            started = await client.start_job(
                thread_id="t", message_id="m", workflow="gated", workflow_input={"prompt": "ship it?"}
            )
            job_id = started.job.job_id
            seen = await watch_until(
                client, job_id, lambda s: any(isinstance(e, ApprovalRequiredEvent) for e in s)
            )
            await trio.sleep(0.3)  # the wait is written before anyone is told; let the status follow
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    ask = next(e for e in seen if isinstance(e, ApprovalRequiredEvent))
    assert ask.name == "approve" and json.loads(ask.arguments) == {"prompt": "ship it?"}
    with server(store, env) as (port, _):
        async with open_client(f"ws://127.0.0.1:{port}/v1", "tok") as client:
            with trio.fail_after(10):
                while (await client.get(job_id)).job.status != "awaiting_approval":
                    await trio.sleep(0.05)  # the new server took the job over, still waiting
            info = await client.get(job_id, include_content=True)
            assert info.step is not None and (info.step.name, info.step.status) == ("approve", "running")
            await client.approve(job_id, ask.call_id, True)
            await entries_to_end(client, job_id)
            info = await client.get(job_id, include_content=True)
    assert info.job.status == "completed" and info.content == "approved"
    assert counted(count) == ["before", "after"]


async def test_a_workflow_edited_between_crash_and_restart_fails_diverged(tmp_path: Path) -> None:
    store, count = f"sqlite:///{tmp_path}/jobs.db", tmp_path / "count"
    env = {"BACKSTREAM_TEST_COUNT_FILE": str(count)}
    with server(store, env) as (port, proc):
        async with open_client(f"ws://127.0.0.1:{port}/v1", "tok") as client:
            started = await client.start_job(
                thread_id="t", message_id="m", workflow="steps", workflow_input={"n": 5, "pause": 0.5}
            )
            job_id = started.job.job_id
            await watch_until(client, job_id, in_a_sleep_after(3))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    # The third counting step is step 5; the edited workflow asks for another tool there.
    with server(store, {**env, "BACKSTREAM_TEST_VARIANT": "edited"}) as (port, _):
        async with open_client(f"ws://127.0.0.1:{port}/v1", "tok") as client:
            await entries_to_end(client, job_id)
            info = await client.get(job_id, include_content=True)
    assert info.job.status == "failed" and info.job.error is not None
    assert info.job.error.code == "workflow_diverged"
    assert info.job.error.message.startswith("step 5: ")
    assert "'tool:count'" in info.job.error.message and "'tool:clock_now'" in info.job.error.message
    assert counted(count) == ["s0", "s1", "s2"]  # nothing ran again, nothing new ran
