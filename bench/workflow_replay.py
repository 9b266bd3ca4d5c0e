"""How long a workflow of many steps takes to run and to replay, and the memory it holds.

Runs a workflow of ``--steps`` recorded steps (``ctx.step``, each a small computation) to its
end on a SQLite store, then replays it as a server that took it over would: the job's
actor is given the stored log (all steps finished, the end cut off) and runs the workflow
again from the top, every step answered from the log. Prints the run's and the replay's
times and the peak of Python memory (tracemalloc) of each, and writes them as JSON.

    ./dev bench workflow_replay --steps 1000
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time
import tracemalloc
from typing import Any

import attrs
import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from backstream import Config, open_runtime
from backstream.actors.clock import WallClock
from backstream.actors.job import JobActor
from backstream.actors.joblog import JobLog
from backstream.actors.workflow import WorkflowTarget
from backstream.protocol.events import LogEvent, StatusEvent, StepEvent
from backstream.protocol.records import JobProgress, JobRecord
from backstream.runtime.models.builtin import builtin_model
from backstream.runtime.stores.memory import MemoryStore
from backstream.runtime.stores.sqlite import SqliteStore
from backstream.runtime.tools.registry import ToolRegistry
from backstream.workflows import WorkflowContext, workflow
from bench._common import print_table, write_json

RAN: list[int] = []  # the steps whose function ran (a replay adds none)


@workflow(name="bench-many")
async def many_steps(ctx: WorkflowContext, input: dict[str, Any]) -> int:
    """``n`` recorded steps; returns their sum."""
    total = 0
    for i in range(int(input["n"])):
        total += await ctx.step(f"add {i}", lambda i=i: RAN.append(i) or i)
    return int(total)


async def run_workflow(db: pathlib.Path, steps: int) -> tuple[JobRecord, list[LogEvent], float]:
    """Run the workflow to its end on SQLite; its record, its stored log and the seconds."""
    store = SqliteStore(db)
    config = Config(max_workflow_steps=max(steps, 1))
    async with open_runtime(config, store=store, workflows=[many_steps]) as rt:
        begin = time.perf_counter()
        started = await rt.start_job(
            user="bench",
            thread_id="t",
            message_id=f"m{time.time_ns()}",
            model="workflow/bench-many",
            messages=[],
            workflow_input={"n": steps},
        )
        async with rt.watch(started.job_id, user="bench") as batches:
            async for _ in batches:
                pass
        seconds = time.perf_counter() - begin
        record, entries = await rt.job_log(started.job_id, user="bench")
    return record, list(entries), seconds


async def replay(record: JobRecord, entries: list[LogEvent]) -> tuple[float, JobActor]:
    """The workflow run again against its log without its end (text and status); seconds."""
    cut = entries[:-2]
    store = MemoryStore()
    await store.open()
    running = attrs.evolve(record, status="running", seq=0, finished_at=None, usage=None, error=None)
    await store.create_job(running)
    await store.commit(record.job_id, cut, JobProgress("running", len(cut), 0, record.updated_at))
    config = Config(max_workflow_steps=len(cut))
    log = JobLog.from_entries(record.job_id, record.epoch, cut, max_output_chars=config.max_output_chars)
    target = WorkflowTarget(many_steps, lambda m: builtin_model(m, echo_rate=1e6, max_argument_chars=1000))
    actor = JobActor(
        running, config=config, store=store, model=target, clock=WallClock(), tools=ToolRegistry(), log=log
    )
    begin = time.perf_counter()
    await actor.run()
    return time.perf_counter() - begin, actor


async def measure(steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        RAN.clear()
        record, entries, run_s = await run_workflow(pathlib.Path(tmp) / "run.db", steps)
        end = entries[-1]
        assert len(RAN) == steps and isinstance(end, StatusEvent) and end.status == "completed", end
        tracemalloc.start()
        await run_workflow(pathlib.Path(tmp) / "traced.db", steps)
        run_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    RAN.clear()
    replay_s, actor = await replay(record, entries)
    assert RAN == [], "a replay ran a recorded step again"
    assert actor.log.terminal is not None and actor.log.terminal.status == "completed"
    tracemalloc.start()
    await replay(record, entries)
    replay_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    recorded = sum(1 for e in entries if isinstance(e, StepEvent))
    return {
        "steps": steps,
        "log_entries": len(entries),
        "step_entries": recorded,
        "run_s": run_s,
        "replay_s": replay_s,
        "replay_us_per_step": replay_s / steps * 1e6,
        "run_peak_mb": run_peak / 1e6,
        "replay_peak_mb": replay_peak / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--json", help="where to write the results (default bench/results/)")
    args = parser.parse_args()
    rows = [trio.run(measure, n) for n in args.steps]
    columns = [
        "steps",
        "log_entries",
        "run_s",
        "replay_s",
        "replay_us_per_step",
        "run_peak_mb",
        "replay_peak_mb",
    ]
    print_table(rows, columns)
    print(write_json("workflow_replay", {"rows": rows}, args.json))


if __name__ == "__main__":
    main()
