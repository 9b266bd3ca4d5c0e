"""Takeover: running jobs whose instance is killed (SIGKILL) or stopped (SIGTERM), continued
by another instance on the same Redis, against the ``interrupt`` policy (the behaviour of
a server that does not continue jobs: they end ``interrupted``).

``--jobs`` jobs of ``--tokens`` words at ``--rate`` words/s on the built-in
``backstream/lorem`` start on the first of ``--instances`` ``serve`` processes; each is
watched from the second one. ``--after`` seconds in, the first instance gets the signal.
Per case it reports:

- the time from the signal to each job's first continued token, as its watcher saw it
  (the arrival of its first text entry after the last one the old epoch wrote durably,
  which the job's record keeps), p50 and p99;
- the share of jobs that completed, and how many ended ``interrupted``;
- the characters regenerated: text a watcher received and then saw withdrawn (a
  ``rewind``), summed over the jobs;
- the watchers that saw ``gone`` (0 is the promise).

Leases: ``--lease-ttl`` 3 s, renewed every 0.3 s, so a kill is noticed within about 3.3 s
(a stop hands its jobs over at once). Needs ``redis-server`` on 127.0.0.1:6379.

    ./dev bench takeover --jobs 30 --tokens 600 --rate 30
"""

from __future__ import annotations

import argparse
import pathlib
import signal
import sys
import time
import uuid
from typing import Any

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from backstream import GoneError
from backstream.client import Client, open_client
from backstream.protocol.events import RewindEvent, TextEvent
from backstream.runtime.stores.redis import RedisStore
from bench._common import percentile, print_table, write_json
from bench._procs import ServeProcess
from tests.conftest import delete_prefix

HERE = pathlib.Path(__file__).resolve().parent
MSG = [{"role": "user", "content": "bench"}]
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM}


class Watch:
    """What one job's watcher saw: when each text entry came, what was withdrawn."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[int, float]] = []  # (seq, monotonic time) of text entries
        self.regenerated = 0
        self.status: str | None = None
        self.gone = False


async def follow(client: Client, job_id: str, watch: Watch) -> None:
    text = ""
    try:
        async with client.watch(job_id) as batches:
            async for batch in batches:
                for event in batch.events:
                    if isinstance(event, TextEvent):
                        text += event.text
                        watch.arrivals.append((event.seq, time.monotonic()))
                    elif isinstance(event, RewindEvent):
                        watch.regenerated += max(0, len(text) - event.content_length)
                        text = text[: event.content_length]
                if batch.terminal is not None:
                    watch.status = batch.terminal.status
    except GoneError:
        watch.gone = True


async def _hold(url: str, *, task_status: trio.TaskStatus[Client]) -> None:
    async with open_client(url, "tok", reconnect_max=0.5, max_reconnect_attempts=400) as client:
        task_status.started(client)
        await trio.sleep_forever()


async def first_continued(store: RedisStore, job_id: str, watch: Watch) -> float | None:
    """When the watcher got the job's first text entry of a later epoch than the first."""
    record = await store.get_job(job_id)
    if record is None or not record.epoch_ends:
        return None
    kept = record.epoch_ends[0]
    return next((at for seq, at in watch.arrivals if seq > kept), None)


async def run_case(a: argparse.Namespace, fleet: list[ServeProcess], sig: int, prefix: str) -> dict[str, Any]:
    params = {"max_tokens": a.tokens, "tokens_per_s": a.rate}
    watches: dict[str, Watch] = {}
    async with trio.open_nursery() as nursery:
        starter = await nursery.start(_hold, fleet[0].url)
        watcher = await nursery.start(_hold, fleet[1].url)
        for n in range(a.jobs):
            started = await starter.start_job(
                thread_id="t", message_id=f"m{n}", model="backstream/lorem", messages=MSG, params=params
            )
            watches[started.job.job_id] = Watch()
        async with trio.open_nursery() as followers:
            for job_id, watch in watches.items():
                followers.start_soon(follow, watcher, job_id, watch)
            await trio.sleep(a.after)
            signalled = time.monotonic()
            fleet[0].signal(sig)
        nursery.cancel_scope.cancel()
    store = RedisStore(a.redis, prefix=prefix)
    await store.open()
    try:
        firsts = [await first_continued(store, job_id, w) for job_id, w in watches.items()]
    finally:
        await store.aclose()
    delays = sorted(at - signalled for at in firsts if at is not None)
    statuses = [w.status for w in watches.values()]
    return {
        "jobs": a.jobs,
        "completed_share": statuses.count("completed") / a.jobs,
        "interrupted": statuses.count("interrupted"),
        "continued": len(delays),
        "first_token_p50_s": percentile(delays, 0.5) if delays else None,
        "first_token_p99_s": percentile(delays, 0.99) if delays else None,
        "regenerated_chars": sum(w.regenerated for w in watches.values()),
        "gone": sum(w.gone for w in watches.values()),
    }


def measure(a: argparse.Namespace, signal_name: str, policy: str) -> dict[str, Any]:
    prefix = f"bench-takeover:{uuid.uuid4().hex[:10]}"
    args = [
        "--token", "tok=bench", "--store", a.redis, "--log-level", "warning", "--lease-ttl", "3",
        "--lease-renew-interval", "0.3", "--drain-timeout", "10", "--max-jobs", "10000",
        "--max-jobs-per-user", "10000",
    ]  # fmt: skip
    if policy == "interrupt":
        args += ["--continuation", "backstream/*=interrupt"]
    fleet = [ServeProcess(args, {"BACKSTREAM_REDIS_PREFIX": prefix}) for _ in range(a.instances)]
    try:
        for instance in fleet:
            instance.start()
        row = trio.run(run_case, a, fleet, SIGNALS[signal_name], prefix)
    finally:
        for instance in fleet:
            instance.kill()
        trio.run(delete_prefix, prefix)
    return {"signal": signal_name, "policy": policy, **row}


def plot(rows: list[dict[str, Any]], out: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=80)
    labels = [f"{r['signal']}\n{r['policy']}" for r in rows]
    ax.bar(labels, [r["completed_share"] for r in rows], color="tab:green")
    ax.set(ylabel="jobs completed (share)", ylim=(0, 1.05))
    ax.set_title("jobs whose instance was killed or stopped mid-answer", fontsize=9)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "takeover.png"
    fig.savefig(path)
    print(f"wrote {path}")


COLUMNS = [
    "signal", "policy", "jobs", "completed_share", "interrupted", "continued", "first_token_p50_s",
    "first_token_p99_s", "regenerated_chars", "gone",
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=600, help="words per job")
    ap.add_argument("--rate", type=float, default=30.0, help="words per second per job")
    ap.add_argument("--instances", type=int, default=3, help="serve instances (2 or more)")
    ap.add_argument("--after", type=float, default=4.0, help="seconds before the signal")
    ap.add_argument("--signals", default="kill,term", help="kill, term or both")
    ap.add_argument("--policies", default="continue,interrupt", help="continue (the built-ins'), interrupt")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--plots", default=str(HERE.parent / "docs" / "perf"), help="where the PNG goes")
    ap.add_argument("--json", help="where to write the results (default bench/results/takeover.json)")
    a = ap.parse_args()
    if a.instances < 2:
        ap.error("--instances must be 2 or more: one is stopped, another continues")
    rows = [
        measure(a, signal_name, policy)
        for signal_name in a.signals.split(",")
        for policy in a.policies.split(",")
    ]
    print_table(rows, COLUMNS)
    path = write_json("takeover", {"args": vars(a), "rows": rows}, a.json)
    print(f"wrote {path}")
    plot(rows, pathlib.Path(a.plots))


if __name__ == "__main__":
    main()
