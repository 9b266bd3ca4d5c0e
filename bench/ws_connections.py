"""Many WebSocket connections on one process: memory per idle connection and per watcher,
the time for all of them to connect and to get their first batch, latency and CPU per token.

One ``backstream serve`` (memory store, the built-in ``backstream/lorem`` with timestamps)
and load generators in processes of their own (``--clients``; asyncio and ``websockets``),
each holding a share of the connections. The fd limits of every process are raised to
their hard limit (``resource.setrlimit``). Phases:

1. **idle**: every connection connects and says ``hello`` (at most ``--connect-concurrency``
   handshakes under way per generator); the server's RSS against its RSS before is the
   memory per idle connection;
2. **watch**: every connection sends ``job.start`` with ``watch: true`` for job
   ``k mod jobs`` (the first of each job starts it, the others repeat its message id and
   watch it); the time from a job's first token (its stamp) to each watcher's first batch,
   and the server's RSS once every watcher has had one against the idle RSS (per watcher:
   it includes the jobs' logs so far);
3. the jobs run to their end: p50/p99 from each token's production, the server's CPU per
   token delivered.

``--tracemalloc DIR`` runs the server under tracemalloc and writes what the idle connections
hold, by line, to ``DIR`` (a snapshot before the connections and one after). ``--compare-src
DIR`` measures another checkout the same way in the same invocation (before/after).

    python bench/ws_connections.py --connections 10000 --jobs 500 --rate 1 --tokens 30
    python bench/ws_connections.py --connections 2000 --jobs 100 --tracemalloc /tmp/conn-trace
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import time
from typing import IO, Any

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench._common import cpu_seconds, percentile, print_table, rss_bytes, write_json  # noqa: E402
from bench._procs import free_port, wait_for_port  # noqa: E402


def raise_fd_limit() -> int:
    """The soft limit of open files raised to the hard one; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# -- the load generator (--role client) ----------------------------------------------------


async def client_main(a: argparse.Namespace) -> None:
    import websockets

    raise_fd_limit()
    indexes = range(a.first, a.first + a.count)
    ready = asyncio.Event()
    go = asyncio.Event()
    firsts: list[float] = []  # per watcher: first batch arrival - its job's first token stamp
    first_done = asyncio.Event()
    latencies: list[float] = []
    state = {"ready": 0, "done": 0, "errors": 0, "frames": 0}
    limit = asyncio.Semaphore(a.connect_concurrency)
    params = {"max_tokens": a.tokens, "tokens_per_s": a.rate, "timestamps": True}
    compression = "deflate" if a.deflate else None

    async def one(k: int) -> None:
        async with limit:
            ws = await websockets.connect(
                a.url, compression=compression, max_size=None, open_timeout=300, ping_interval=None
            )
            await ws.send(json.dumps({"type": "hello", "id": "h", "protocol": 1, "token": "bench"}))
            welcome = json.loads(await ws.recv())
            assert welcome["type"] == "welcome", welcome
        state["ready"] += 1
        if state["ready"] == a.count:
            ready.set()
        await go.wait()
        job = k % a.jobs
        start = {
            "type": "job.start", "id": "s", "thread_id": "bench", "message_id": f"m{job}",
            "model": "backstream/lorem", "messages": [{"role": "user", "content": "bench"}],
            "params": params, "watch": True,
        }  # fmt: skip
        await ws.send(json.dumps(start))
        seen = 0
        async for raw in ws:
            now = time.time()
            message = json.loads(raw)
            if message["type"] == "error":
                state["errors"] += 1
                print(json.dumps({"error": message}), file=sys.stderr, flush=True)
                break
            if message["type"] != "job.events":
                continue
            state["frames"] += 1
            ended = False
            for event in message["events"]:
                if event["kind"] == "text":
                    for stamp in event["text"].split():
                        if seen == 0:
                            firsts.append(now - float(stamp))
                            if len(firsts) == a.count:
                                first_done.set()
                        latencies.append(now - float(stamp))
                        seen += 1
                elif event["kind"] == "status" and event["status"] != "running":
                    ended = True
            if ended:
                break
        state["done"] += 1
        await ws.close()

    began = time.time()
    tasks = [asyncio.ensure_future(one(k)) for k in indexes]
    await ready.wait()
    say({"ready": a.count, "connect_s": time.time() - began})
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # "go"
    go.set()
    await first_done.wait()
    say({"first_batches": len(firsts), "at": time.time(), "firsts": firsts})
    await asyncio.gather(*tasks)
    say({"done": state["done"], "errors": state["errors"], "frames": state["frames"], "latencies": latencies})


def say(payload: dict[str, Any]) -> None:
    print(json.dumps(payload), flush=True)


# -- the server under tracemalloc (--role traced-server) -----------------------------------


def traced_server(a: argparse.Namespace, serve_args: list[str]) -> None:
    """``backstream serve`` in this process; each SIGUSR1 writes a tracemalloc snapshot."""
    import tracemalloc

    tracemalloc.start(a.trace_frames)
    count = iter(range(1000))

    def dump(*_: Any) -> None:
        if a.collect:
            gc.collect()  # what is live, not garbage waiting for the collector
        path = pathlib.Path(a.tracemalloc) / f"snapshot-{next(count)}.bin"
        tracemalloc.take_snapshot().dump(str(path))
        path.with_suffix(".done").touch()

    signal.signal(signal.SIGUSR1, dump)
    from backstream.cli import main

    main(["serve", *serve_args])


# -- the orchestrator ----------------------------------------------------------------------


class Generator:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def read(self, key: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"a load generator ended before saying {key}")
            message: dict[str, Any] = json.loads(line)
            if key in message:
                return message

    def tell(self, word: str) -> None:
        stdin: IO[str] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(word + "\n")
        stdin.flush()


def start_server(
    a: argparse.Namespace, source: str | None, trace_dir: pathlib.Path | None
) -> tuple[Any, int]:
    port = free_port()
    args = ["--port", str(port), "--store", "memory", "--token", "bench=bench", "--log-level", "warning"]
    args += ["--max-jobs", str(a.jobs), "--max-jobs-per-user", str(a.jobs), "--batch-ms", str(a.batch_ms)]
    args += ["--ws-deflate", "on" if a.deflate else "off"] if a.deflate is not None and not source else []
    env = {**os.environ, "BACKSTREAM_MAX_CONNECTIONS_PER_USER": str(a.connections + 100)}
    cwd = HERE.parent
    if source:
        cwd = pathlib.Path(source).resolve()
        env["PYTHONPATH"] = str(cwd)
    if trace_dir is not None:
        cmd = [sys.executable, str(HERE / "ws_connections.py"), "--role", "traced-server"]
        cmd += ["--tracemalloc", str(trace_dir), "--trace-frames", str(a.trace_frames)]
        cmd += [*(["--collect"] if a.collect else []), "--", *args]
        env["PYTHONPATH"] = f"{cwd}:{HERE.parent}"
    else:
        cmd = [sys.executable, "-m", "backstream", "serve", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, preexec_fn=raise_fd_limit)
    wait_for_port(port)
    return proc, port


def start_profiler(a: argparse.Namespace, pid: int) -> subprocess.Popen[bytes] | None:
    """With ``--profile FILE``: py-spy records the server from the starts until every watcher
    has had its first batch (raw format: one stack per line)."""
    if not a.profile:
        return None
    spy = shutil.which("py-spy", path=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
    cmd = [spy or "py-spy", "record", "--pid", str(pid), "--rate", "100", "--format", "raw"]
    return subprocess.Popen([*cmd, "-o", a.profile], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def snapshot(proc: Any, trace_dir: pathlib.Path, index: int) -> pathlib.Path:
    done = trace_dir / f"snapshot-{index}.done"
    proc.send_signal(signal.SIGUSR1)
    while not done.exists():
        time.sleep(0.2)
    return trace_dir / f"snapshot-{index}.bin"


def report_trace(before: pathlib.Path, after: pathlib.Path, connections: int, out: pathlib.Path) -> None:
    """What the connections hold, by line and by file, per connection."""
    import tracemalloc

    old, new = tracemalloc.Snapshot.load(str(before)), tracemalloc.Snapshot.load(str(after))
    lines = [f"per connection, {connections} connections (bytes, allocations)"]
    total = sum(s.size_diff for s in new.compare_to(old, "filename"))
    lines.append(f"total traced: {total / connections:.0f} bytes per connection")
    for kind in ("filename", "lineno"):
        lines.append(f"\n-- by {kind}")
        for stat in new.compare_to(old, kind)[:40]:
            if stat.size_diff <= 0:
                continue
            frame = stat.traceback[0]
            lines.append(
                f"{stat.size_diff / connections:8.0f} B {stat.count_diff / connections:6.2f}  "
                f"{frame.filename}:{frame.lineno if kind == 'lineno' else ''}"
            )
    lines.append("\n-- by traceback (largest 15)")
    for stat in new.compare_to(old, "traceback")[:15]:
        lines.append(f"{stat.size_diff / connections:8.0f} B {stat.count_diff / connections:6.2f}")
        lines += [f"      {frame.filename}:{frame.lineno}" for frame in stat.traceback[-8:]]
    text = "\n".join(lines)
    (out / "report.txt").write_text(text)
    print(text)


def measure(a: argparse.Namespace, source: str | None) -> dict[str, Any]:
    trace_dir = pathlib.Path(a.tracemalloc).resolve() if a.tracemalloc and not source else None
    if trace_dir:
        trace_dir.mkdir(parents=True, exist_ok=True)
        for old in trace_dir.glob("snapshot-*"):
            old.unlink()
    server, port = start_server(a, source, trace_dir)
    generators: list[Generator] = []
    try:
        time.sleep(1.0)
        base_rss = rss_bytes(server.pid)
        before = snapshot(server, trace_dir, 0) if trace_dir else None
        share = -(-a.connections // a.clients)
        began = time.time()
        for first in range(0, a.connections, share):
            cmd = [sys.executable, str(HERE / "ws_connections.py"), "--role", "client", "--url"]
            cmd += [f"ws://127.0.0.1:{port}/v1", "--first", str(first), "--count"]
            cmd += [str(min(share, a.connections - first)), "--jobs", str(a.jobs), "--rate", str(a.rate)]
            cmd += ["--tokens", str(a.tokens), "--connect-concurrency", str(a.connect_concurrency)]
            cmd += ["--compression", "on" if a.deflate else "off"]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            generators.append(Generator(proc))
        for generator in generators:
            generator.read("ready")
        connect_s = time.time() - began
        time.sleep(a.settle)
        idle_rss = rss_bytes(server.pid)
        later_rss = None
        if a.idle_wait:  # e.g. past a keep-alive interval: idle connections drop their compressors
            time.sleep(a.idle_wait)
            later_rss = rss_bytes(server.pid)
        if trace_dir and before:
            report_trace(before, snapshot(server, trace_dir, 1), a.connections, trace_dir)
        cpu0 = cpu_seconds(server.pid)
        profiler = start_profiler(a, server.pid) if not source else None
        go = time.time()
        for generator in generators:
            generator.tell("go")
        firsts_msgs = [generator.read("first_batches") for generator in generators]
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)  # py-spy writes what it recorded
            profiler.wait(timeout=60)
        watching_rss = rss_bytes(server.pid)
        all_first_s = max(m["at"] for m in firsts_msgs) - go
        firsts = sorted(x for m in firsts_msgs for x in m["firsts"])
        ends = [generator.read("done") for generator in generators]
        cpu = cpu_seconds(server.pid) - cpu0
        peak_rss = rss_bytes(server.pid)
    finally:
        for generator in generators:
            generator.proc.kill()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    latencies = sorted(x for m in ends for x in m["latencies"])
    delivered = len(latencies)
    return {
        "connections": a.connections,
        "jobs": a.jobs,
        "base_rss_mb": round(base_rss / 2**20, 1),
        "idle_rss_mb": round(idle_rss / 2**20, 1),
        "kb_per_idle_connection": round((idle_rss - base_rss) / a.connections / 1024, 2),
        "kb_per_idle_connection_later": None
        if later_rss is None
        else round((later_rss - base_rss) / a.connections / 1024, 2),
        "kb_per_watcher": round((watching_rss - idle_rss) / a.connections / 1024, 2),
        "connect_all_s": round(connect_s, 2),
        "first_batch_all_s": round(all_first_s, 2),
        "first_batch_p50_s": round(percentile(firsts, 0.5), 3),
        "first_batch_max_s": round(firsts[-1], 3) if firsts else None,
        "tokens_delivered": delivered,
        "expected": a.connections * a.tokens,
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "server_cpu_s": round(cpu, 2),
        "cpu_us_per_token": round(cpu / max(delivered, 1) * 1e6, 1),
        "peak_rss_mb": round(peak_rss / 2**20, 1),
        "errors": sum(m["errors"] for m in ends),
    }


COLUMNS = [
    "name",
    "kb_per_idle_connection",
    "kb_per_idle_connection_later",
    "kb_per_watcher",
    "connect_all_s",
    "first_batch_all_s",
    "first_batch_max_s",
    "p50_ms",
    "p99_ms",
    "cpu_us_per_token",
    "tokens_delivered",
    "expected",
    "peak_rss_mb",
    "errors",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=["main", "client", "traced-server"], default="main")
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--jobs", type=int, default=500, help="jobs; connection k watches job k mod jobs")
    ap.add_argument("--rate", type=float, default=1.0, help="tokens per second per job")
    ap.add_argument("--tokens", type=int, default=30, help="tokens per job")
    ap.add_argument("--batch-ms", type=float, default=50.0)
    ap.add_argument("--clients", type=int, default=2, help="load generator processes")
    ap.add_argument("--connect-concurrency", type=int, default=200, help="handshakes under way per generator")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds between connecting and measuring")
    ap.add_argument(
        "--idle-wait", type=float, default=0.0, help="measure the idle connections again this much later"
    )
    ap.add_argument(
        "--compression", choices=["on", "off"], default="off", help="clients offer permessage-deflate"
    )
    ap.add_argument("--tracemalloc", help="trace the server's allocations; write the report here")
    ap.add_argument("--trace-frames", type=int, default=12)
    ap.add_argument("--collect", action="store_true", help="a full gc.collect() before each snapshot")
    ap.add_argument("--compare-src", help="also measure the backstream checkout in this directory")
    ap.add_argument("--profile", help="py-spy the server from the starts to the last first batch, into FILE")
    ap.add_argument("--json", help="where to write the results (default bench/results/)")
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    a, rest = ap.parse_known_args()
    a.deflate = a.compression == "on"
    if a.role == "client":
        asyncio.run(client_main(a))
        return
    if a.role == "traced-server":
        traced_server(a, [arg for arg in rest if arg != "--"])
        return
    raise_fd_limit()
    rows = [{"name": "backstream", **measure(a, None)}]
    if a.compare_src:
        rows.append({"name": f"backstream from {a.compare_src}", **measure(a, a.compare_src)})
    print(
        f"{a.connections} connections, {a.jobs} jobs ({a.connections // a.jobs} watchers each), "
        f"{a.rate:g} tokens/s, {a.tokens} tokens; load average {os.getloadavg()[0]:.2f}"
    )
    print_table(rows, COLUMNS)
    print(f"wrote {write_json('ws_connections', {'params': vars(a), 'rows': rows}, a.json)}")


if __name__ == "__main__":
    main()
