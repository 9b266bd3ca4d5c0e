"""WebSocket load: backstream's server against the raw pipeline, at the same load, in one run.

Each part is its own process, as in production:

- an upstream speaking the OpenAI SSE format at R tokens/s per stream (the raw
  pipeline's own upstream, so both sides read identical streams), every token
  the wall time it was produced;
- ``backstream serve`` with that upstream (or, with ``--model lorem``, the
  built-in model and no upstream);
- this script as the load client (asyncio + websockets): C connections, J jobs,
  W watchers per job; each watcher sends the same ``job.start`` with
  ``watch: true`` (the first starts the job, the rest join it by its
  ``message_id``) and measures token-to-client latency from the timestamps.

Then ``../shared/bench/raw_pipeline.py`` runs at the same J, W, R, N and batch
interval, and the table shows both and the ratios. The server's CPU seconds and
peak RSS are read from /proc for both.

    python bench/ws_load.py --jobs 500 --watchers 1 --rate 30 --tokens 300
    python bench/ws_load.py --jobs 50 --watchers 20 --rate 200 --tokens 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench._common import percentile, print_table, write_json  # noqa: E402

RAW_PIPELINE = HERE.parent.parent / "shared" / "bench" / "raw_pipeline.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


class ProcessSampler:
    """Samples a process's CPU seconds and RSS from /proc until stopped (or it exits)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.cpu = 0.0
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ticks, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            try:
                with open(f"/proc/{self.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{self.pid}/statm") as f:
                    rss = int(f.read().split()[1]) * page
            except OSError:
                return
            self.cpu = (int(fields[11]) + int(fields[12])) / ticks
            self.peak_rss = max(self.peak_rss, rss)
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def child_pids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


async def load(
    urls: list[str], jobs: int, watchers: int, connections: int, tokens: int, model: str, rate: float
) -> dict[str, Any]:
    import websockets

    latencies: list[float] = []
    frames = delivered = 0
    slots: list[list[int]] = [[] for _ in range(connections)]
    for k in range(jobs * watchers):
        slots[k % connections].append(k // watchers)
    params: dict[str, Any] = {}
    if model == "backstream/lorem":
        params = {"max_tokens": tokens, "tokens_per_s": rate, "timestamps": True}

    async def one(url: str, job_ids: list[int]) -> None:
        nonlocal frames, delivered
        async with websockets.connect(url, compression=None, max_size=None, open_timeout=60) as ws:
            await ws.send(json.dumps({"type": "hello", "id": "h", "protocol": 1, "token": "bench"}))
            welcome = json.loads(await ws.recv())
            assert welcome["type"] == "welcome", welcome
            for j in job_ids:
                await ws.send(
                    json.dumps(
                        {
                            "type": "job.start",
                            "id": f"s{j}",
                            "thread_id": "bench",
                            "message_id": f"m{j}",
                            "model": model,
                            "messages": [{"role": "user", "content": "bench"}],
                            "params": params,
                            "watch": True,
                        }
                    )
                )
            open_watches = len(job_ids)
            async for raw in ws:
                now = time.time()
                message = json.loads(raw)
                kind = message["type"]
                if kind == "error":
                    raise RuntimeError(f"server error: {message}")
                if kind != "job.events":
                    continue
                frames += 1
                for event in message["events"]:
                    if event["kind"] == "text":
                        for stamp in event["text"].split():
                            latencies.append(now - float(stamp))
                            delivered += 1
                    elif event["kind"] == "status" and event["status"] != "running":
                        open_watches -= 1
                if open_watches == 0:
                    return

    t0 = time.time()
    # Connection k goes to instance k mod n: watchers of one job meet on different instances.
    await asyncio.gather(*(one(urls[k % len(urls)], ids) for k, ids in enumerate(slots) if ids))
    elapsed = time.time() - t0
    latencies.sort()
    return {
        "tokens_delivered": delivered,
        "expected": jobs * watchers * tokens,
        "frames": frames,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(delivered / elapsed),
        "frames_per_s": round(frames / elapsed),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "p999_ms": round(percentile(latencies, 0.999) * 1000, 1),
    }


def run_ours(a: argparse.Namespace, store: str, instances: int = 1) -> dict[str, Any]:
    """Serve with ``store`` on ``instances`` processes, run the load, return the measures."""
    procs: list[subprocess.Popen[bytes]] = []
    prefix = f"bench{os.getpid()}x{time.monotonic_ns() % 100_000}"
    workdir = tempfile.mkdtemp(prefix="backstream-bench-")
    store_url = {"sqlite": f"sqlite:///{workdir}/bench.db", "redis": a.redis_url}.get(store, store)
    try:
        model, upstream_args = "backstream/lorem", []
        if a.model == "upstream":
            up_port = free_port()
            upstream = [sys.executable, str(RAW_PIPELINE), "--role", "upstream", "--port", str(up_port)]
            procs.append(subprocess.Popen([*upstream, "--rate", str(a.rate), "--tokens", str(a.tokens)]))
            upstream_args = ["--upstream-url", f"http://127.0.0.1:{up_port}/v1"]
            model = "bench-upstream"
            wait_for_port(up_port)
        ports = [free_port() for _ in range(instances)]
        servers = []
        for port in ports:
            serve = [
                sys.executable,
                "-m",
                "backstream",
                "serve",
                "--port",
                str(port),
                "--token",
                "bench=bench",
            ]
            serve += [
                "--max-jobs",
                str(a.jobs),
                "--max-jobs-per-user",
                str(a.jobs),
                "--batch-ms",
                str(a.batch_ms),
            ]
            serve += ["--store", store_url, "--retention", "120", "--log-level", "warning", *upstream_args]
            env = {**os.environ, "BACKSTREAM_REDIS_PREFIX": prefix}
            servers.append(subprocess.Popen(serve, cwd=HERE.parent, env=env))
        procs += servers
        for port in ports:
            wait_for_port(port)
        samplers = [ProcessSampler(server.pid) for server in servers]
        time.sleep(0.3)
        cpu0 = [sampler.cpu for sampler in samplers]
        urls = [f"ws://127.0.0.1:{port}/v1" for port in ports]
        connections = a.connections or a.jobs * a.watchers
        result = asyncio.run(load(urls, a.jobs, a.watchers, connections, a.tokens, model, a.rate))
        for sampler in samplers:
            sampler.stop()
        result["server_cpu_s"] = round(sum(s.cpu - c for s, c in zip(samplers, cpu0, strict=True)), 2)
        result["server_rss_mb"] = round(sum(s.peak_rss for s in samplers) / 2**20, 1)
        return result
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=20)
        shutil.rmtree(workdir, ignore_errors=True)
        if store == "redis":
            _delete_redis_prefix(a.redis_url, prefix)


def _delete_redis_prefix(url: str, prefix: str) -> None:
    scan = ["redis-cli", "-u", url, "--scan", "--pattern", f"{prefix}:*"]
    keys = subprocess.run(scan, capture_output=True, text=True, check=False).stdout.split()
    for i in range(0, len(keys), 500):
        subprocess.run(["redis-cli", "-u", url, "DEL", *keys[i : i + 500]], capture_output=True, check=False)


def run_raw(a: argparse.Namespace) -> dict[str, Any]:
    raw = subprocess.Popen(
        [
            sys.executable,
            str(RAW_PIPELINE),
            "--jobs",
            str(a.jobs),
            "--watchers",
            str(a.watchers),
            "--rate",
            str(a.rate),
            "--tokens",
            str(a.tokens),
            "--batch-ms",
            str(a.batch_ms),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    forwarder = None
    deadline = time.monotonic() + 10
    while forwarder is None and time.monotonic() < deadline:
        forwarder = next((p for p in child_pids(raw.pid) if "--role forwarder" in cmdline(p)), None)
        time.sleep(0.05)
    sampler = ProcessSampler(forwarder) if forwarder else None
    out, _ = raw.communicate(timeout=3600)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if sampler is not None:
        sampler.stop()
        result["server_cpu_s"] = round(sampler.cpu, 2)
        result["server_rss_mb"] = round(sampler.peak_rss / 2**20, 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--watchers", type=int, default=1, help="watchers per job")
    ap.add_argument("--connections", type=int, default=0, help="connections (default jobs x watchers)")
    ap.add_argument("--rate", type=float, default=30.0, help="tokens per second per job")
    ap.add_argument("--tokens", type=int, default=300, help="tokens per job")
    ap.add_argument("--batch-ms", type=float, default=50.0)
    ap.add_argument(
        "--model",
        choices=["upstream", "lorem"],
        default="upstream",
        help="stream from the SSE upstream (as the raw pipeline does) or the built-in lorem",
    )
    ap.add_argument(
        "--stores", default="memory", help="comma-separated stores to measure: memory,sqlite,redis"
    )
    ap.add_argument("--instances", type=int, default=1, help="servers sharing the load (redis only)")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--skip-raw", action="store_true", help="measure backstream only")
    ap.add_argument("--json", help="where to write the results (default bench/results/ws_load.json)")
    a = ap.parse_args()
    if a.connections and a.connections < a.watchers:
        ap.error("--connections must be at least --watchers (one watch per job per connection)")
    if not RAW_PIPELINE.exists():
        sys.exit(f"the raw pipeline is not at {RAW_PIPELINE}")

    rows = []
    for store in a.stores.split(","):
        instances = a.instances if store == "redis" else 1
        suffix = f" x{instances}" if instances > 1 else ""
        rows.append({"name": f"backstream ({a.model}, {store}{suffix})", **run_ours(a, store, instances)})
    ours = base = rows[0]
    store_cost = {
        row["name"]: {
            "tokens_per_s": round(row["tokens_per_s"] / max(base["tokens_per_s"], 1), 3),
            "p50_ms": round(row["p50_ms"] / max(base["p50_ms"], 0.1), 2),
            "p99_ms": round(row["p99_ms"] / max(base["p99_ms"], 0.1), 2),
            "server_cpu_s": round(row["server_cpu_s"] / max(base["server_cpu_s"], 0.01), 2),
        }
        for row in rows[1:]
    }
    ratio: dict[str, float] = {}
    if not a.skip_raw:
        raw = {"name": "raw pipeline", **run_raw(a)}
        rows.append(raw)
        ratio = {
            "tokens_per_s": round(ours["tokens_per_s"] / max(raw["tokens_per_s"], 1), 3),
            "frames_per_s": round(ours["frames_per_s"] / max(raw["frames_per_s"], 1), 3),
            "p50_ms": round(ours["p50_ms"] / max(raw["p50_ms"], 0.1), 2),
            "p99_ms": round(ours["p99_ms"] / max(raw["p99_ms"], 0.1), 2),
            "server_cpu_s": round(ours["server_cpu_s"] / max(raw.get("server_cpu_s", 0.01), 0.01), 2),
        }
    print(
        f"J={a.jobs} jobs x W={a.watchers} watchers, {a.rate:g} tokens/s, "
        f"{a.tokens} tokens, batch {a.batch_ms:g} ms"
    )
    print_table(
        rows,
        [
            "name",
            "tokens_delivered",
            "expected",
            "tokens_per_s",
            "frames_per_s",
            "p50_ms",
            "p99_ms",
            "p999_ms",
            "server_cpu_s",
            "server_rss_mb",
            "seconds",
        ],
    )
    if ratio:
        print(f"ratio {ours['name']} / raw pipeline: {ratio}")
    for name, cost in store_cost.items():
        print(f"ratio {name} / {base['name']}: {cost}")
    payload = {"params": vars(a), "rows": rows, "ratio": ratio, "store_cost": store_cost}
    path = write_json("ws_load", payload, a.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
