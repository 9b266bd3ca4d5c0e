"""WebSocket load: backstream's server beside the raw pipeline (and the resumable-stream peer),
at the same load, in one run.

Each part is its own process, as in production, and each system gets a fresh
upstream of its own (the raw pipeline's: OpenAI SSE format, R tokens/s per
stream, every token stamped with the wall time it was produced):

- ``backstream serve`` with that upstream (or, with ``--model lorem``, the
  built-in model and no upstream);
- the raw pipeline's forwarder (``../shared/bench/raw_pipeline.py --role
  forwarder``: httpx SSE in, 50 ms batches, trio-websocket out);
- with ``--peer``, Vercel's resumable-stream on Node 20 with Redis
  (``../shared/bench/peer_resumable/server.mjs``, npm-installed into a cache
  directory outside the repository);
- this script as the load client for all three (asyncio: websockets, or h11
  over asyncio streams for the peer's HTTP): J jobs, W watchers per job.

Latency is measured twice per token: from the time the upstream produced it
(the stamp inside it) and from the time it was due, ``start + i/R`` with
``start`` when the upstream began that stream: a server that cannot keep up
shows it there even when its upstream, sharing the machine, falls behind with it. Every row reports
the CPU of the server, its upstream and the load client, and the wall time (from
the load's start to the last token's arrival) against the nominal ``tokens / R``.

    python bench/ws_load.py --jobs 500 --watchers 1 --rate 30 --tokens 300 --peer
    python bench/ws_load.py --jobs 50 --watchers 20 --rate 200 --tokens 1000 --peer
    python bench/ws_load.py --sweep --rate 30 --tokens 300 --peer      # sustainable load, plots

``--sweep`` runs increasing job counts for each system until one fails the
sustainable bar (p99 from the due time under 500 ms, wall time at most 1.1x
nominal) and writes JSON and PNG plots (tokens/s and p99 against jobs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench._common import percentile, print_table, write_json  # noqa: E402
from bench._procs import ProcessSampler, child_pids, free_port, wait_for_port  # noqa: E402

# The yardsticks beside the checkout (``../shared/bench``), or where BACKSTREAM_BENCH_SHARED says.
SHARED = pathlib.Path(os.environ.get("BACKSTREAM_BENCH_SHARED", HERE.parent.parent / "shared" / "bench"))
RAW_PIPELINE = SHARED / "raw_pipeline.py"
PEER_DIR = SHARED / "peer_resumable"
PEER_PACKAGES = ["resumable-stream@2.2.13", "redis@4"]
PEER_CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / (
    "backstream-bench/peer-resumable"
)
SUSTAINABLE_P99_MS = 500.0
SUSTAINABLE_WALL = 1.1


class Stats:
    """What a load client saw: tokens, frames, both latencies, per job start times."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.produced: list[float] = []  # now - stamp
        self.due: list[float] = []  # now - (start + i / rate)
        self.frames = 0
        self.started: dict[int, float] = {}  # job -> when its upstream stream began
        self.t0 = time.time()  # reset when the load starts
        self.first_token: list[float] = []  # per watcher: seconds from the load's start
        self.last_token_at = 0.0  # when the last token reached its client
        self.wire_bytes = 0  # what the load clients read from their sockets

    def tokens(self, job: int, index: int, text: str, now: float) -> int:
        """Record the stamped tokens in ``text``; ``index`` is how many this watcher had.

        Token i is due at ``start + i/R``, where ``start`` is when the upstream began the
        stream (the stamp of token 0, produced on time): a token read late by a server
        that falls behind, or produced late by an upstream slowed down with it, shows
        here; connecting before the stream, the same for every system, does not."""
        for stamp in text.split():
            produced = float(stamp)
            if index == 0:
                self.started[job] = produced
                self.first_token.append(now - self.t0)
            self.produced.append(now - produced)
            self.last_token_at = max(self.last_token_at, now)
            self.due.append(now - (self.started[job] + index / self.rate))
            index += 1
        return index


def counting_connection(stats: Stats) -> Any:
    """A ``websockets`` client connection class that adds what it reads to ``stats.wire_bytes``."""
    from websockets.asyncio.client import ClientConnection

    class Counting(ClientConnection):
        def data_received(self, data: bytes) -> None:
            stats.wire_bytes += len(data)
            super().data_received(data)

    return Counting


async def load_backstream(urls: list[str], a: argparse.Namespace, stats: Stats, model: str) -> None:
    import websockets

    # "deflate": offer permessage-deflate, as browsers do (websockets' default offer).
    compression = "deflate" if a.deflate else None
    connection_class = counting_connection(stats)

    slots: list[list[int]] = [[] for _ in range(a.connections or a.jobs * a.watchers)]
    for k in range(a.jobs * a.watchers):
        slots[k % len(slots)].append(k // a.watchers)
    params: dict[str, Any] = {}
    if model == "backstream/lorem":
        params = {"max_tokens": a.tokens, "tokens_per_s": a.rate, "timestamps": True}

    async def one(url: str, job_ids: list[int]) -> None:
        async with websockets.connect(
            url, compression=compression, max_size=None, open_timeout=60, create_connection=connection_class
        ) as ws:
            # Requests may follow hello at once: the server handles them in order after it.
            await ws.send(json.dumps({"type": "hello", "id": "h", "protocol": 1, "token": "bench"}))
            by_message = {f"m{j}": j for j in job_ids}
            jobs_of: dict[str, int] = {}
            counts: dict[str, int] = {}
            for j in job_ids:
                start = {
                    "type": "job.start",
                    "id": f"s{j}",
                    "thread_id": "bench",
                    "message_id": f"m{j}",
                    "model": model,
                    "messages": [{"role": "user", "content": "bench"}],
                    "params": params,
                    "watch": True,
                }
                await ws.send(json.dumps(start))
            welcome = json.loads(await ws.recv())
            assert welcome["type"] == "welcome", welcome
            open_watches = len(job_ids)
            async for raw in ws:
                now = time.time()
                message = json.loads(raw)
                kind = message["type"]
                if kind == "error":
                    raise RuntimeError(f"server error: {message}")
                if kind == "job.started":
                    jobs_of[message["job"]["job_id"]] = by_message[message["job"]["message_id"]]
                    continue
                if kind != "job.events":
                    continue
                stats.frames += 1
                job_id = message["job_id"]
                for event in message["events"]:
                    if event["kind"] == "text":
                        counts[job_id] = stats.tokens(
                            jobs_of[job_id], counts.get(job_id, 0), event["text"], now
                        )
                    elif event["kind"] == "status" and event["status"] != "running":
                        open_watches -= 1
                if open_watches == 0:
                    return

    # Connection k goes to instance k mod n: watchers of one job meet on different instances.
    await asyncio.gather(*(one(urls[k % len(urls)], ids) for k, ids in enumerate(slots) if ids))


async def load_raw(url: str, a: argparse.Namespace, stats: Stats) -> None:
    import websockets

    connection_class = counting_connection(stats)

    async def one(j: int) -> None:
        async with websockets.connect(
            url, compression=None, max_size=None, open_timeout=60, create_connection=connection_class
        ) as ws:
            await ws.send(json.dumps({"job": j}))
            index = 0
            async for raw in ws:
                now = time.time()
                message = json.loads(raw)
                if message["type"] == "done":
                    return
                stats.frames += 1
                index = stats.tokens(j, index, message["events"][0]["text"], now)

    await asyncio.gather(*(one(j) for j in range(a.jobs) for _ in range(a.watchers)))


async def load_peer(port: int, a: argparse.Namespace, stats: Stats) -> None:
    import h11

    async def one(j: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)
        writer.write(conn.send(h11.Request(method="GET", target=f"/?id=job-{j}", headers=[("host", "peer")])))
        writer.write(conn.send(h11.EndOfMessage()))
        index, rest = 0, ""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    stats.wire_bytes += len(data)
                    conn.receive_data(data)
                elif isinstance(event, h11.Data):
                    now = time.time()
                    stats.frames += 1
                    parts = (rest + event.data.decode()).split(" ")
                    rest = parts.pop()
                    index = stats.tokens(j, index, " ".join(parts), now)
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return
        finally:
            writer.close()

    producers = [asyncio.ensure_future(one(j)) for j in range(a.jobs)]
    await asyncio.sleep(0.3)  # producers first, then resumers (as the peer's own load.mjs does)
    resumers = [one(j) for j in range(a.jobs) for _ in range(a.watchers - 1)]
    await asyncio.gather(*producers, *resumers)


def start_upstream(a: argparse.Namespace, procs: list[subprocess.Popen[bytes]]) -> tuple[int, ProcessSampler]:
    port = free_port()
    cmd = [sys.executable, str(RAW_PIPELINE), "--role", "upstream", "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--rate", str(a.rate), "--tokens", str(a.tokens)])
    procs.append(proc)
    wait_for_port(port)
    return port, ProcessSampler(proc.pid)


def start_backstream(
    a: argparse.Namespace, store_url: str, instances: int, upstream_port: int | None, prefix: str
) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    servers, urls = [], []
    for _ in range(instances):
        port = free_port()
        serve = [sys.executable, "-m", "backstream", "serve", "--port", str(port), "--token", "bench=bench"]
        serve += [
            "--max-jobs",
            str(a.jobs),
            "--max-jobs-per-user",
            str(a.jobs),
            "--batch-ms",
            str(a.batch_ms),
        ]
        serve += ["--store", store_url, "--retention", "120", "--log-level", "warning"]
        if a.workers > 1:
            serve += ["--workers", str(a.workers)]
        if upstream_port is not None:
            serve += ["--upstream-url", f"http://127.0.0.1:{upstream_port}/v1"]
        env = {**os.environ, "BACKSTREAM_REDIS_PREFIX": prefix}
        # One user ("bench") holds every connection and job: lift the per-user caps (through
        # the environment, which a checkout without these settings ignores).
        env.setdefault("BACKSTREAM_MAX_CONNECTIONS_PER_USER", str(a.jobs * a.watchers + 100))
        env.setdefault("BACKSTREAM_MAX_STORED_BYTES_PER_USER", str(1 << 40))
        cwd = HERE.parent
        if a.source:  # another checkout of backstream, for a before/after in one run
            cwd = pathlib.Path(a.source).resolve()
            env["PYTHONPATH"] = str(cwd)
        servers.append(subprocess.Popen(serve, cwd=cwd, env=env))
        urls.append(f"ws://127.0.0.1:{port}/v1")
    for url in urls:
        wait_for_port(int(url.rsplit(":", 1)[1].split("/")[0]))
    return servers, urls


def peer_install() -> pathlib.Path:
    """npm-install the peer's packages into a cache directory (once) and copy its code beside them."""
    work = PEER_CACHE
    work.mkdir(parents=True, exist_ok=True)
    for source in PEER_DIR.glob("*.mjs"):
        shutil.copy(source, work / source.name)
    if not (work / "node_modules" / "resumable-stream").is_dir():
        print(f"installing {' '.join(PEER_PACKAGES)} into {work}", file=sys.stderr)
        subprocess.run(["npm", "init", "-y"], cwd=work, check=True, capture_output=True)
        subprocess.run(["npm", "install", *PEER_PACKAGES], cwd=work, check=True, capture_output=True)
    return work


def measure(system: str, a: argparse.Namespace, store: str = "memory", instances: int = 1) -> dict[str, Any]:
    """Start ``system`` (backstream, raw or peer) with an upstream of its own, load it, measure."""
    procs: list[subprocess.Popen[bytes]] = []
    workdir = tempfile.mkdtemp(prefix="backstream-bench-")
    prefix = f"bench{os.getpid()}x{time.monotonic_ns() % 100_000}"
    stats = Stats(a.rate)
    upstream: ProcessSampler | None = None
    try:
        run: Callable[[], Any]
        if system == "backstream":
            store_url = {"sqlite": f"sqlite:///{workdir}/bench.db", "redis": a.redis_url}.get(store, store)
            model = "backstream/lorem"
            up_port = None
            if a.model == "upstream":
                up_port, upstream = start_upstream(a, procs)
                model = "bench-upstream"
            servers, urls = start_backstream(a, store_url, instances, up_port, prefix)
            procs += servers
            server_pids = [s.pid for s in servers]

            def run() -> Any:
                return load_backstream(urls, a, stats, model)

        elif system == "raw":
            up_port, upstream = start_upstream(a, procs)
            port = free_port()
            cmd = [sys.executable, str(RAW_PIPELINE), "--role", "forwarder", "--port", str(port)]
            cmd += ["--up-port", str(up_port), "--batch-ms", str(a.batch_ms)]
            procs.append(subprocess.Popen(cmd))
            wait_for_port(port)
            server_pids = [procs[-1].pid]

            def run() -> Any:
                return load_raw(f"ws://127.0.0.1:{port}/", a, stats)

        else:
            work = peer_install()
            up_port, upstream = start_upstream(a, procs)
            port = free_port()
            cmd = ["node", "server.mjs", str(port), str(up_port), a.redis_url]
            procs.append(subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL))
            wait_for_port(port)
            server_pids = [procs[-1].pid]

            def run() -> Any:
                return load_peer(port, a, stats)

        if a.workers > 1:  # serve --workers: the processes that serve are the children
            time.sleep(1.0)
            server_pids = [child for pid in server_pids for child in child_pids(pid)] + server_pids
        samplers = [ProcessSampler(pid) for pid in server_pids]
        profilers = start_profilers(a, system, server_pids, procs)
        time.sleep(0.3)
        cpu0 = [s.cpu for s in samplers]
        up0 = upstream.cpu if upstream else 0.0
        client0 = time.process_time()
        t0 = stats.t0 = time.time()
        asyncio.run(run())
        # Until the last token arrived: closing connections afterwards (a WebSocket close
        # handshake for backstream and the raw pipeline, none for the HTTP peer) is not delivery.
        elapsed = (stats.last_token_at or time.time()) - t0
        client_cpu = time.process_time() - client0
        for sampler in samplers:
            sampler.stop()
        stop_profilers(profilers)
        if upstream:
            upstream.stop()
        server_cpu = sum(s.cpu - c for s, c in zip(samplers, cpu0, strict=True))
        return summarize(
            stats,
            a,
            elapsed,
            server_cpu,
            sum(s.peak_rss for s in samplers),
            client_cpu,
            (upstream.cpu - up0) if upstream else None,
        )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)
        if system == "backstream" and store == "redis":
            _delete_redis_prefix(a.redis_url, prefix)


def start_profilers(
    a: argparse.Namespace, system: str, pids: list[int], procs: list[subprocess.Popen[bytes]]
) -> list[subprocess.Popen[bytes]]:
    """With ``--profile DIR``: py-spy records each server process of ``system`` (self time, raw)."""
    if not a.profile or system == "peer":  # py-spy reads Python processes only
        return []
    out = pathlib.Path(a.profile)
    out.mkdir(parents=True, exist_ok=True)
    profilers = []
    for pid in pids:
        path = out / f"{system}-{pid}.txt"
        spy = shutil.which("py-spy", path=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
        cmd = [spy or "py-spy", "record", "--pid", str(pid), "--rate", "250", "--format", "raw"]
        cmd += ["-o", str(path)]
        profilers.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        print(f"profiling {system} (pid {pid}) into {path}", file=sys.stderr)
    procs.extend(profilers)
    return profilers


def stop_profilers(profilers: list[subprocess.Popen[bytes]]) -> None:
    """SIGINT makes py-spy write what it recorded."""
    for proc in profilers:
        proc.send_signal(signal.SIGINT)
    for proc in profilers:
        proc.wait(timeout=60)


def summarize(
    stats: Stats,
    a: argparse.Namespace,
    elapsed: float,
    server_cpu: float,
    server_rss: int,
    client_cpu: float,
    upstream_cpu: float | None,
) -> dict[str, Any]:
    produced, due = sorted(stats.produced), sorted(stats.due)
    delivered = len(produced)
    nominal = a.tokens / a.rate
    row = {
        "tokens_delivered": delivered,
        "expected": a.jobs * a.watchers * a.tokens,
        "tokens_per_s": round(delivered / elapsed),
        "frames_per_s": round(stats.frames / elapsed),
        "p50_ms": round(percentile(produced, 0.5) * 1000, 1),
        "p99_ms": round(percentile(produced, 0.99) * 1000, 1),
        "p999_ms": round(percentile(produced, 0.999) * 1000, 1),
        "due_p50_ms": round(percentile(due, 0.5) * 1000, 1),
        "due_p99_ms": round(percentile(due, 0.99) * 1000, 1),
        "server_cpu_s": round(server_cpu, 2),
        "cpu_us_per_token": round(server_cpu / max(delivered, 1) * 1e6, 1),
        "server_rss_mb": round(server_rss / 2**20, 1),
        "upstream_cpu_s": None if upstream_cpu is None else round(upstream_cpu, 2),
        "client_cpu_s": round(client_cpu, 2),
        "seconds": round(elapsed, 2),
        "nominal_s": round(nominal, 2),
        "wall_x": round(elapsed / nominal, 2),
        # When watchers got their first token, from the load's start: connecting, the
        # handshake and the start requests of all of them.
        "first_token_p50_s": round(percentile(sorted(stats.first_token), 0.5), 2),
        "first_token_max_s": round(max(stats.first_token, default=0.0), 2),
        # Bytes the load clients read (frames, their headers, handshakes) per token delivered.
        "wire_bytes_per_token": round(stats.wire_bytes / max(delivered, 1), 1),
    }
    row["sustainable"] = (
        delivered == row["expected"]
        and row["due_p99_ms"] < SUSTAINABLE_P99_MS
        and row["wall_x"] <= SUSTAINABLE_WALL
    )
    return row


def _delete_redis_prefix(url: str, prefix: str) -> None:
    scan = ["redis-cli", "-u", url, "--scan", "--pattern", f"{prefix}:*"]
    keys = subprocess.run(scan, capture_output=True, text=True, check=False).stdout.split()
    for i in range(0, len(keys), 500):
        subprocess.run(["redis-cli", "-u", url, "DEL", *keys[i : i + 500]], capture_output=True, check=False)


COLUMNS = [
    "name",
    "tokens_delivered",
    "tokens_per_s",
    "p50_ms",
    "p99_ms",
    "due_p50_ms",
    "due_p99_ms",
    "server_cpu_s",
    "cpu_us_per_token",
    "server_rss_mb",
    "upstream_cpu_s",
    "client_cpu_s",
    "seconds",
    "wall_x",
    "first_token_max_s",
    "wire_bytes_per_token",
]


def ratio(ours: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    keys = ["tokens_per_s", "p50_ms", "p99_ms", "due_p99_ms", "cpu_us_per_token", "server_cpu_s"]
    keys += ["wire_bytes_per_token"]
    return {k: round(ours[k] / max(other[k], 0.01), 3) for k in keys}


def yardsticks(a: argparse.Namespace) -> tuple[bool, bool]:
    """Which yardsticks this checkout has; says plainly what is missing."""
    raw = RAW_PIPELINE.exists()
    if not raw:
        print(
            f"note: the raw pipeline ({RAW_PIPELINE}) is absent: no raw yardstick in this run",
            file=sys.stderr,
        )
    peer = (
        a.peer and PEER_DIR.is_dir() and shutil.which("node") is not None and shutil.which("npm") is not None
    )
    if a.peer and not peer:
        print(
            f"note: the resumable-stream peer needs {PEER_DIR}, node and npm: not measured", file=sys.stderr
        )
    return raw, bool(peer)


def one_load(a: argparse.Namespace, has_raw: bool, has_peer: bool) -> None:
    rows = []
    modes = a.compression.split(",")
    for store in a.stores.split(","):
        instances = a.instances if store == "redis" else 1
        suffix = f" x{instances}" if instances > 1 else ""
        for mode in modes:
            a.deflate = mode == "on"
            name = f"backstream ({a.model}, {store}{suffix}{', deflate ' + mode if len(modes) > 1 else ''})"
            rows.append({"name": name, **measure("backstream", a, store, instances)})
    a.deflate = modes[0] == "on"
    ours = rows[0]
    store_cost = {f"{row['name']} / {ours['name']}": ratio(row, ours) for row in rows[1:]}
    if a.compare_src:  # the other checkout on the same stores, each against ours on its store
        here, a.source = a.source, a.compare_src
        for store, mine in zip(a.stores.split(","), list(rows)[:: len(modes)], strict=True):
            rows.append(
                {"name": f"backstream from {a.compare_src} ({store})", **measure("backstream", a, store)}
            )
            store_cost[f"{rows[-1]['name']} / {mine['name']}"] = ratio(rows[-1], mine)
        a.source = here
    ratios: dict[str, dict[str, float]] = {}
    if has_raw and not a.skip_raw:
        raw = {"name": "raw pipeline", **measure("raw", a)}
        rows.append(raw)
        ratios["raw pipeline"] = ratio(ours, raw)
    if has_peer:
        try:
            peer = {"name": "resumable-stream (Node, Redis)", **measure("peer", a)}
        except (OSError, RuntimeError) as exc:  # the peer broke under this load: say so, keep the rest
            print(f"resumable-stream failed under this load: {exc!r}", file=sys.stderr)
            rows.append({"name": f"resumable-stream FAILED: {type(exc).__name__}"})
        else:
            rows.append(peer)
            ratios["resumable-stream"] = ratio(ours, peer)
    print(
        f"J={a.jobs} jobs x W={a.watchers} watchers, {a.rate:g} tokens/s, {a.tokens} tokens, "
        f"batch {a.batch_ms:g} ms"
    )
    print_table(rows, COLUMNS)
    for name, values in ratios.items():
        print(f"ratio {ours['name']} / {name}: {values}")
    for names, cost in store_cost.items():
        print(f"ratio {names}: {cost}")
    payload = {"params": vars(a), "rows": rows, "ratios": ratios, "store_cost": store_cost}
    print(f"wrote {write_json('ws_load', payload, a.json)}")


def sweep(a: argparse.Namespace, has_raw: bool, has_peer: bool) -> None:
    counts = [int(n) for n in a.sweep_jobs.split(",")]
    systems = (
        ["backstream"] + (["raw"] if has_raw and not a.skip_raw else []) + (["peer"] if has_peer else [])
    )
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    for system in systems:
        for jobs in counts:
            a.jobs = jobs
            try:
                row = {"jobs": jobs, **measure(system, a, a.stores.split(",")[0])}
            except (OSError, RuntimeError) as exc:
                print(f"{system} failed at {jobs} jobs: {exc!r}", file=sys.stderr)
                row = {"jobs": jobs, "failed": repr(exc), "sustainable": False}
                results[system].append(row)
                break
            results[system].append(row)
            print(
                f"{system:10} jobs={jobs:4} tokens/s={row['tokens_per_s']:6} "
                f"due p99={row['due_p99_ms']:7.1f} ms "
                f"wall x{row['wall_x']:.2f} cpu/token={row['cpu_us_per_token']} us "
                f"{'sustainable' if row['sustainable'] else 'NOT sustainable'}",
                flush=True,
            )
            if not row["sustainable"]:
                break  # more jobs only fall further behind
    best = {s: max((r["jobs"] for r in rows if r["sustainable"]), default=0) for s, rows in results.items()}
    print(f"sustainable jobs at {a.rate:g} tokens/s x {a.watchers} watcher(s): {best}")
    payload = {"params": vars(a), "sustainable_jobs": best, "results": results}
    path = write_json(f"ws_sweep_{a.watchers}x{a.rate:g}_w{a.workers}", payload, a.json)
    print(f"wrote {path}")
    plot(results, a, pathlib.Path(a.plots))


LABELS = {"backstream": "backstream", "raw": "raw pipeline", "peer": "resumable-stream (Node + Redis)"}


def plot(results: dict[str, list[dict[str, Any]]], a: argparse.Namespace, out: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plots: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return
    out.mkdir(parents=True, exist_ok=True)
    name = f"sweep_{a.watchers}x{a.rate:g}" + (
        f"_{a.stores.split(',')[0]}_w{a.workers}" if a.skip_raw else ""
    )
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    for system, all_rows in results.items():
        rows = [r for r in all_rows if "failed" not in r]
        jobs = [r["jobs"] for r in rows]
        left.plot(jobs, [r["tokens_per_s"] for r in rows], marker="o", label=LABELS[system])
        right.plot(jobs, [r["due_p99_ms"] for r in rows], marker="o", label=LABELS[system])
    counts = sorted({r["jobs"] for rows in results.values() for r in rows})
    nominal = [n * a.watchers * a.rate for n in counts]
    left.plot(
        counts,
        nominal,
        ":",
        color="grey",
        label="offered load",
    )
    right.axhline(SUSTAINABLE_P99_MS, linestyle=":", color="grey", label="500 ms")
    left.set(
        xlabel="jobs", ylabel="tokens/s delivered", title=f"{a.watchers} watcher(s), {a.rate:g} tok/s per job"
    )
    right.set(xlabel="jobs", ylabel="p99 ms (from due time)", yscale="log", title="tail latency")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--watchers", type=int, default=1, help="watchers per job")
    ap.add_argument(
        "--connections", type=int, default=0, help="backstream connections (default jobs x watchers)"
    )
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
    ap.add_argument("--workers", type=int, default=1, help="serve --workers N (redis only)")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--skip-raw", action="store_true", help="measure no raw pipeline")
    ap.add_argument("--peer", action="store_true", help="measure resumable-stream (Node 20 + Redis) too")
    ap.add_argument("--sweep", action="store_true", help="find the sustainable load of each system")
    ap.add_argument("--sweep-jobs", default="50,100,200,300,400,500,600,800,1000")
    ap.add_argument("--plots", default=str(HERE.parent / "docs" / "perf"), help="where --sweep puts PNGs")
    ap.add_argument("--json", help="where to write the results (default bench/results/)")
    ap.add_argument("--profile", help="record each Python server with py-spy into this directory")
    ap.add_argument("--compare-src", help="also measure the backstream checkout in this directory")
    ap.add_argument(
        "--compression",
        default="off",
        help="on, off or on,off: backstream's load clients offer permessage-deflate (on) or not "
        "(off); with both, each store is measured both ways and the ratio reported",
    )
    a = ap.parse_args()
    a.source = None
    if any(mode not in ("on", "off") for mode in a.compression.split(",")):
        ap.error("--compression takes on, off or on,off")
    a.deflate = a.compression.split(",")[0] == "on"
    if a.connections and a.connections < a.watchers:
        ap.error("--connections must be at least --watchers (one watch per job per connection)")
    has_raw, has_peer = yardsticks(a)
    if a.model == "upstream" and not has_raw:
        sys.exit(
            "--model upstream streams from the raw pipeline's upstream, which is absent: use --model lorem"
        )
    if a.sweep:
        sweep(a, has_raw, has_peer)
    else:
        one_load(a, has_raw, has_peer)


if __name__ == "__main__":
    main()
