"""Scale-out on Redis Cluster: ``backstream serve`` instances on a 3-primary Redis
Cluster, beside one Redis and the memory store, at the same load, in one invocation.

The bench starts its own Redis servers (``bench/_redis_cluster.py``: ports 47000-47999,
or ``BACKSTREAM_BENCH_REDIS_PORTS``), a plain one and a cluster of ``--primaries``
primaries, and tears them down afterwards. Each configuration gets fresh ``serve``
processes (``--model lorem``: the built-in model, no upstream). The load client
(asyncio, websockets) starts job j on instance j mod N and watches it from instance
(j+1) mod N (the memory store: one instance, both there), W connections per job, each
watching from seq 0; job j belongs to user u(j mod U) (``--users``, default one per job:
a user's keys sit on one slot). Rows:

- ``memory x1``; ``redis x3`` (one Redis); ``cluster x3`` with 1 and with 2 watchers per
  job (the second on the same instance: it should add no Redis reads, XRANGE/HMGET);
- Redis commands per token (``INFO commandstats`` summed over the primaries, before and
  after, commands inside scripts included; a token is a log entry), Redis CPU
  (``INFO cpu``) per command, ops per primary and their spread from the mean;
- server CPU per token of the N instances, and the CPU of one more instance that
  serves nobody (its baseline per second measured before the load);
- then delivered tokens/s against 1, 2, 3 instances on the cluster at a heavier load
  (``--scale-*``), plotted, and the expiry sweep's jobs/s on the cluster
  (``bench/redis_sweep.py``'s measure).

    python bench/redis_cluster.py                     # 60 jobs x 300 tokens at 30 tok/s
    python bench/redis_cluster.py --jobs 60 --scale-jobs 200 --scale-rate 100
    python bench/redis_cluster.py --scale-jobs 0 --sweep-jobs 0 --monitor 25  # where commands go

``--monitor N`` watches each Redis row with ``MONITOR`` (``bench/_redis_monitor.py``) and
prints the N largest uses of Redis per job: each script with the commands it ran, and
the commands outside scripts by the kind of key they name. MONITOR slows Redis: take the
counts from such a run, the speeds from one without it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import trio  # noqa: E402

from bench import redis_sweep  # noqa: E402
from bench._common import percentile, print_table, write_json  # noqa: E402
from bench._procs import ProcessSampler, free_port, wait_for_port  # noqa: E402
from bench._redis_cluster import command_calls, cpu_seconds, redis_servers  # noqa: E402
from bench._redis_monitor import monitored  # noqa: E402
from bench.ws_load import Stats, summarize  # noqa: E402

MODEL = "backstream/lorem"
IGNORED = {"info", "ping"}  # the bench's own polling


class ClusterStats(Stats):
    """What the load client saw, and the codes of the watches the server ended."""

    def __init__(self, rate: float) -> None:
        super().__init__(rate)
        self.watch_errors: list[str] = []


def users(a: argparse.Namespace) -> int:
    return int(a.users or a.jobs)


def user_of(job: int, a: argparse.Namespace) -> str:
    return f"u{job % users(a)}"


def start_serves(
    a: argparse.Namespace, store: str, count: int, prefix: str, tokens_file: str
) -> list[subprocess.Popen[bytes]]:
    """``count`` serve processes on ``store`` with room for every job of the run; user uK's
    token is uK."""
    env = {**os.environ, "BACKSTREAM_REDIS_PREFIX": prefix}
    pathlib.Path(tokens_file).write_text("".join(f"u{k}=u{k}\n" for k in range(users(a))))
    procs = []
    for _ in range(count):
        port = free_port()
        cmd = [sys.executable, "-m", "backstream", "serve", "--port", str(port), "--tokens-file", tokens_file]
        cmd += ["--max-jobs", str(a.jobs), "--max-jobs-per-user", str(a.jobs), "--store", store]
        cmd += ["--max-connections-per-user", "100000", "--retention", "120", "--log-level", "warning"]
        proc = subprocess.Popen(cmd, cwd=HERE.parent, env=env)
        proc.port = port  # type: ignore[attr-defined]
        procs.append(proc)
    for proc in procs:
        wait_for_port(proc.port)  # type: ignore[attr-defined]
    return procs


def url_of(proc: subprocess.Popen[bytes]) -> str:
    return f"ws://127.0.0.1:{proc.port}/v1"  # type: ignore[attr-defined]


async def _hello(ws: Any, user: str) -> None:
    await ws.send(json.dumps({"type": "hello", "id": "h", "protocol": 1, "token": user}))
    welcome = json.loads(await ws.recv())
    assert welcome["type"] == "welcome", welcome


async def start_jobs(url: str, user: str, jobs: list[int], a: argparse.Namespace) -> dict[int, str]:
    """Start ``jobs`` of ``user`` on the instance at ``url`` (nobody watching there); their ids."""
    import websockets

    params = {"max_tokens": a.tokens, "tokens_per_s": a.rate, "timestamps": True}
    ids: dict[int, str] = {}
    async with websockets.connect(url, compression=None, max_size=None, open_timeout=60) as ws:
        await _hello(ws, user)
        for j in jobs:
            start: dict[str, Any] = {
                "type": "job.start",
                "id": f"s{j}",
                "thread_id": "bench",
                "message_id": f"m{j}",
            }
            start |= {"model": MODEL, "messages": [{"role": "user", "content": "bench"}], "params": params}
            await ws.send(json.dumps(start))
        while len(ids) < len(jobs):
            message = json.loads(await ws.recv())
            if message["type"] == "error":
                raise RuntimeError(f"server error: {message}")
            if message["type"] == "job.started":
                ids[int(message["id"][1:])] = message["job"]["job_id"]
    return ids


async def watch_job(
    url: str, user: str, job: int, job_id: str, stats: ClusterStats, live: list[float]
) -> None:
    """Watch ``job_id`` from its start until its terminal status, recording its tokens; in
    ``live``, the latency of those produced after the watch began (no catch-up)."""
    import websockets

    async with websockets.connect(url, compression=None, max_size=None, open_timeout=60) as ws:
        await _hello(ws, user)
        await ws.send(json.dumps({"type": "job.watch", "id": "w", "job_id": job_id, "after_seq": 0}))
        index, since = 0, float("inf")
        async for raw in ws:
            now = time.time()
            message = json.loads(raw)
            if message["type"] == "error":  # the server ended the watch (overloaded: unavailable, gone)
                stats.watch_errors.append(message["code"])
                return
            since = now if message["type"] == "job.watching" else since
            if message["type"] != "job.events":
                continue
            stats.frames += 1
            for event in message["events"]:
                if event["kind"] == "text":
                    index = stats.tokens(job, index, event["text"], now)
                    live += [now - float(stamp) for stamp in event["text"].split() if float(stamp) > since]
                elif event["kind"] == "status" and event["status"] != "running":
                    return


async def load(urls: list[str], a: argparse.Namespace, stats: ClusterStats, live: list[float]) -> None:
    """Job j of user j mod U starts on instance j mod N; W watchers of it on instance (j+1) mod N."""
    n = len(urls)
    groups: dict[tuple[int, str], list[int]] = {}
    for j in range(a.jobs):
        groups.setdefault((j % n, user_of(j, a)), []).append(j)
    # At most 16 starts per connection: a connection's requests are rate-limited (burst).
    chunks = [
        (urls[i], user, js[k : k + 16]) for (i, user), js in groups.items() for k in range(0, len(js), 16)
    ]
    started = await asyncio.gather(*(start_jobs(url, user, js, a) for url, user, js in chunks))
    ids = {j: job_id for part in started for j, job_id in part.items()}
    watches = [
        watch_job(urls[(j + 1) % n], user_of(j, a), j, ids[j], stats, live)
        for j in range(a.jobs)
        for _ in range(a.watchers)
    ]
    await asyncio.gather(*watches)


def redis_snapshot(ports: list[int]) -> list[tuple[dict[str, int], float]]:
    return [(command_calls(port), cpu_seconds(port)) for port in ports]


def redis_row(before: list[tuple[dict[str, int], float]], ports: list[int], tokens: int) -> dict[str, Any]:
    """Commands (summed over the primaries), per token, per primary and their spread; CPU."""
    after = redis_snapshot(ports)
    per_primary, by_name, cpu, by_primary = [], dict[str, int](), 0.0, []
    for (calls0, cpu0), (calls1, cpu1) in zip(before, after, strict=True):
        delta = {k: v - calls0.get(k, 0) for k, v in calls1.items() if k not in IGNORED}
        per_primary.append(sum(delta.values()))
        by_primary.append(" ".join(f"{k}={v}" for k, v in sorted(delta.items(), key=lambda kv: -kv[1])[:8]))
        for name, calls in delta.items():
            by_name[name] = by_name.get(name, 0) + calls
        cpu += cpu1 - cpu0
    total = sum(per_primary)
    mean = total / len(per_primary)
    top = sorted(((k, v) for k, v in by_name.items() if v), key=lambda kv: -kv[1])[:10]
    return {
        "commands": total,
        "cmd_per_token": round(total / tokens, 3),
        "ops_per_primary": "/".join(map(str, per_primary)),
        "spread_pct": round(max(abs(p - mean) for p in per_primary) / mean * 100, 1),
        "xrange": by_name.get("xrange", 0),
        "hmget": by_name.get("hmget", 0),
        "redis_cpu_s": round(cpu, 3),
        "redis_us_per_cmd": round(cpu / max(total, 1) * 1e6, 2),
        "redis_us_per_token": round(cpu / tokens * 1e6, 2),
        "by_name": " ".join(f"{k}={v}" for k, v in top),
        "all_by_name": dict(sorted(by_name.items(), key=lambda kv: -kv[1])),
        "by_primary": by_primary,
    }


def measure(a: argparse.Namespace, store: str, instances: int, ports: list[int]) -> dict[str, Any]:
    """One configuration: fresh serve processes (and one idle, on Redis), the load, counts."""
    idle = 1 if ports else 0
    tokens_file = os.path.join(tempfile.mkdtemp(prefix="bench-tokens-"), "tokens")
    procs = start_serves(a, store, instances + idle, f"bench{uuid.uuid4().hex[:8]}", tokens_file)
    live: list[float] = []
    try:
        samplers = [ProcessSampler(proc.pid) for proc in procs]
        time.sleep(0.5)
        idle_base = samplers[-1].cpu if idle else 0.0
        time.sleep(a.baseline_s)  # the idle instance's own upkeep, before any job
        baseline = (samplers[-1].cpu - idle_base) / a.baseline_s if idle else 0.0
        cpu0 = [s.cpu for s in samplers]
        before = redis_snapshot(ports) if ports else []
        stats = ClusterStats(a.rate)
        t0 = stats.t0 = time.time()
        client0 = time.process_time()
        with monitored(ports if a.monitor else []) as monitor:
            asyncio.run(load([url_of(p) for p in procs[:instances]], a, stats, live))
            elapsed = (stats.last_token_at or time.time()) - t0
            client_cpu = time.process_time() - client0
            redis = redis_row(before, ports, a.jobs * a.tokens) if ports else {}
            if a.monitor and ports:
                redis["breakdown"] = monitor(a.jobs)
        for sampler in samplers:
            sampler.stop()
        used = [s.cpu - c for s, c in zip(samplers, cpu0, strict=True)]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=20)
        shutil.rmtree(os.path.dirname(tokens_file), ignore_errors=True)
    row = summarize(stats, a, elapsed, sum(used[:instances]), 0, client_cpu, None)
    row["cpu_us_per_token"] = round(sum(used[:instances]) / (a.jobs * a.tokens) * 1e6, 1)
    live.sort()
    row["watch_errors"] = " ".join(stats.watch_errors) or 0
    row["live_p50_ms"] = round(percentile(live, 0.5) * 1000, 1)
    row["live_p99_ms"] = round(percentile(live, 0.99) * 1000, 1)
    if idle:
        row["idle_cpu_s"] = round(used[-1], 3)
        row["idle_base_cpu_s"] = round(baseline * elapsed, 3)
    return {**row, **redis}


def compare(
    a: argparse.Namespace, single: tuple[str, list[int]], cluster: tuple[str, list[int]]
) -> list[dict[str, Any]]:
    """The same load on the memory store, one Redis and the cluster (1 and 2 watchers)."""
    watchers = a.watchers
    configs = [
        ("memory x1", "memory", 1, [], watchers),
        (f"redis x{a.instances}", single[0], a.instances, single[1], watchers),
        (f"cluster x{a.instances}, {watchers} watcher", cluster[0], a.instances, cluster[1], watchers),
        (
            f"cluster x{a.instances}, {watchers + 1} watchers",
            cluster[0],
            a.instances,
            cluster[1],
            watchers + 1,
        ),
    ]
    rows = []
    for name, store, instances, ports, w in configs:
        a.watchers = w
        rows.append({"name": name, "watchers": w, **measure(a, store, instances, ports)})
        print(f"measured {name}", file=sys.stderr, flush=True)
    a.watchers = watchers
    return rows


def scale(a: argparse.Namespace, cluster: tuple[str, list[int]]) -> list[dict[str, Any]]:
    """Delivered tokens/s against instances on the cluster, at the heavier ``--scale-*`` load."""
    saved = (a.jobs, a.rate, a.tokens)
    a.jobs, a.rate, a.tokens = a.scale_jobs, a.scale_rate, a.scale_tokens
    rows = []
    try:
        for instances in range(1, a.instances + 1):
            name = f"cluster x{instances}"
            try:
                rows.append({"name": name, **measure(a, cluster[0], instances, cluster[1])})
            except (OSError, RuntimeError) as exc:  # overloaded: say so, keep the rest
                print(f"{name} failed: {exc!r}", file=sys.stderr)
                rows.append({"name": f"{name} FAILED: {exc}"[:120], "tokens_per_s": 0})
            print(f"measured scale x{instances}", file=sys.stderr, flush=True)
    finally:
        a.jobs, a.rate, a.tokens = saved
    return rows


def sweep_rates(a: argparse.Namespace, cluster_url: str) -> list[dict[str, Any]]:
    return [
        trio.run(redis_sweep.measure_sweep, cluster_url, a.sweep_jobs, instances)
        for instances in range(1, a.instances + 1)
    ]


def plot(rows: list[dict[str, Any]], a: argparse.Namespace, out: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return
    instances = list(range(1, len(rows) + 1))
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=80)
    ax.plot(instances, [r["tokens_per_s"] for r in rows], marker="o", label="delivered (0: failed)")
    offered = a.scale_jobs * a.scale_rate
    ax.axhline(offered, linestyle=":", color="grey", label="offered")
    ax.set(xlabel="serve instances", ylabel="tokens/s", xticks=instances, ylim=(0, offered * 1.15))
    ax.set_title(
        f"{a.scale_jobs} jobs x {a.scale_rate:g} tok/s, {a.primaries}-primary cluster, 2 cores", fontsize=9
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cluster_instances.png"
    fig.savefig(path)
    print(f"wrote {path}")


COLUMNS = [
    "name", "tokens_delivered", "tokens_per_s", "live_p50_ms", "live_p99_ms", "wall_x", "server_cpu_s",
    "cpu_us_per_token", "idle_cpu_s", "idle_base_cpu_s", "cmd_per_token", "ops_per_primary", "spread_pct",
    "xrange", "hmget", "redis_us_per_cmd", "redis_us_per_token", "client_cpu_s", "watch_errors",
]  # fmt: skip


def report(result: dict[str, Any], a: argparse.Namespace) -> None:
    print(
        f"J={a.jobs} jobs x {a.tokens} tokens at {a.rate:g} tok/s, {a.instances} instances (+1 idle on Redis)"
    )
    print_table(result["compare"], COLUMNS)
    for row in result["compare"]:
        if "by_name" in row:
            print(f"  {row['name']}: {row['by_name']}")
    for row in result["compare"]:
        if row.get("breakdown"):
            print(f"\nper job, {row['name']} (MONITOR; a script's calls and the commands it ran):")
            columns = ["what", "calls_per_job", "commands_per_job", "share_pct"]
            print_table(row["breakdown"][: a.monitor], columns)
    memory = result["compare"][0]
    for row in result["compare"][1:]:
        ratio = row["cpu_us_per_token"] / memory["cpu_us_per_token"]
        print(f"server CPU per token, {row['name']} / memory x1: {ratio:.2f}")
    if result["scale"]:
        print(
            f"\nscale: {a.scale_jobs} jobs x {a.scale_tokens} tokens at {a.scale_rate:g} tok/s on the cluster"
        )
        print_table(result["scale"], COLUMNS)
    if result["sweep"]:
        print(f"\nexpiry sweep on the {a.primaries}-primary cluster")
        print_table(
            result["sweep"], ["instances", "expired_jobs", "removed", "per_instance", "removed_per_s"]
        )
    print(f"\nload average before / after: {result['loadavg_before']} / {result['loadavg_after']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=300, help="tokens per job")
    ap.add_argument("--rate", type=float, default=30.0, help="tokens per second per job")
    ap.add_argument("--watchers", type=int, default=1, help="watchers per job (the next row: one more)")
    ap.add_argument("--users", type=int, default=0, help="users the jobs belong to (default: one per job)")
    ap.add_argument("--instances", type=int, default=3, help="serve instances sharing the load")
    ap.add_argument("--primaries", type=int, default=3, help="primaries of the Redis Cluster")
    ap.add_argument(
        "--baseline-s", type=float, default=2.0, help="the idle instance's baseline, before the load"
    )
    ap.add_argument("--scale-jobs", type=int, default=120, help="jobs of the instances sweep (0: none)")
    ap.add_argument("--scale-rate", type=float, default=100.0)
    ap.add_argument("--scale-tokens", type=int, default=300)
    ap.add_argument("--sweep-jobs", type=int, default=5000, help="expired jobs to sweep (0: none)")
    ap.add_argument(
        "--monitor",
        type=int,
        default=0,
        metavar="N",
        help="watch the Redis rows with MONITOR and print the N largest uses per job (0: none)",
    )
    ap.add_argument("--plots", default=str(HERE.parent / "docs" / "perf"), help="where the PNG goes")
    ap.add_argument("--json", help="where to write the results (default bench/results/redis_cluster.json)")
    a = ap.parse_args()
    result: dict[str, Any] = {"loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    with ExitStack() as stack:
        single = stack.enter_context(redis_servers(0))
        cluster = stack.enter_context(redis_servers(a.primaries))
        result["compare"] = compare(a, single, cluster)
        result["scale"] = scale(a, cluster) if a.scale_jobs else []
        result["sweep"] = sweep_rates(a, cluster[0]) if a.sweep_jobs else []
    result["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report(result, a)
    if result["scale"]:
        plot(result["scale"], a, pathlib.Path(a.plots))
    print(f"wrote {write_json('redis_cluster', {'params': vars(a), **result}, a.json)}")


if __name__ == "__main__":
    main()
