"""Durable Streams: backstream beside the Node reference server (``@durable-streams/server``),
in the same run, each on memory and on disk (backstream: SQLite; the reference: its file store).

For each system: appends per second (``--writers`` concurrent writers, each appending
``--appends`` small messages one after another to a stream of its own, every one acknowledged);
catch-up read throughput (a stream of ``--catchup-mb`` MiB in 1 KiB messages read from ``-1``
to its tail, following ``Stream-Next-Offset``, five times); live fan-out latency
(``--readers`` SSE readers on one JSON stream, ``--events`` appends 20 ms apart, each stamped
with the time it was sent: the latency is its arrival at each reader). Also the server's CPU
seconds and its RSS at the end.

    python bench/durable_streams.py                     # memory and disk, both systems
    python bench/durable_streams.py --stores memory --readers 100

Needs ``npm ci`` in clients/durable-streams-tests for the reference server (else it is skipped,
saying so).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench._common import cpu_seconds, percentile, print_table, rss_bytes, write_json
from bench._procs import free_port, wait_for_port

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clients" / "durable-streams-tests"
TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class System:
    def __init__(
        self, name: str, process: subprocess.Popen[bytes], base: str, headers: dict[str, str]
    ) -> None:
        self.name = name
        self.process = process
        self.base = base
        self.headers = headers

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_backstream(store: str, workdir: str) -> System:
    port = free_port()
    env = {
        **os.environ,
        "BACKSTREAM_STREAMS_RATE_PER_S": "1000000",
        "BACKSTREAM_MAX_STREAMS_PER_USER": "10000",
        "BACKSTREAM_LOG_LEVEL": "warning",
    }
    url = "memory" if store == "memory" else f"sqlite:///{workdir}/bench.db"
    command = [sys.executable, "-m", "backstream", "serve", "--store", url, "--port", "0"]
    command += ["--http-port", str(port), "--token", f"{TOKEN}=bench"]
    process = subprocess.Popen(command, env=env, cwd=workdir, stdout=subprocess.DEVNULL)
    wait_for_port(port)
    label = "backstream-memory" if store == "memory" else "backstream-sqlite"
    return System(label, process, f"http://127.0.0.1:{port}/v1/streams", AUTH)


def start_reference(store: str, workdir: str) -> System | None:
    if not (PACKAGE / "node_modules" / "@durable-streams" / "server").exists():
        print("reference server skipped: run npm ci in clients/durable-streams-tests", file=sys.stderr)
        return None
    port = free_port()
    env = {**os.environ, "PORT": str(port)}
    if store != "memory":
        env["DATA_DIR"] = f"{workdir}/reference-data"
    process = subprocess.Popen(
        ["node", "reference-server.mjs"], cwd=PACKAGE, env=env, stdout=subprocess.DEVNULL
    )
    wait_for_port(port)
    label = "reference-memory" if store == "memory" else "reference-file"
    return System(label, process, f"http://127.0.0.1:{port}/v1/stream", {})


async def appends_per_second(system: System, http: httpx.AsyncClient, writers: int, appends: int) -> float:
    names = [f"append-{i}-{time.time_ns()}" for i in range(writers)]
    for name in names:
        await http.put(system.url(name), headers={**system.headers, "content-type": "text/plain"})
    body = b"x" * 100

    async def write(name: str) -> None:
        for _ in range(appends):
            reply = await http.post(
                system.url(name), content=body, headers={**system.headers, "content-type": "text/plain"}
            )
            assert reply.status_code in (200, 204), reply.status_code

    started = time.perf_counter()
    await asyncio.gather(*(write(name) for name in names))
    return writers * appends / (time.perf_counter() - started)


async def catch_up_mb_per_s(system: System, http: httpx.AsyncClient, megabytes: int) -> float:
    name = f"catchup-{time.time_ns()}"
    headers = {**system.headers, "content-type": "application/octet-stream"}
    await http.put(system.url(name), headers=headers)
    block = os.urandom(1024)
    total = megabytes * 1024

    async def fill(part: int) -> None:
        for _ in range(total // 8):
            await http.post(system.url(name), content=block, headers=headers)

    await asyncio.gather(*(fill(part) for part in range(8)))
    read = 0
    started = time.perf_counter()
    for _ in range(5):
        offset = "-1"
        while True:
            reply = await http.get(system.url(name), params={"offset": offset}, headers=system.headers)
            read += len(reply.content)
            offset = reply.headers["stream-next-offset"]
            if reply.headers.get("stream-up-to-date") == "true":
                break
    return read / (time.perf_counter() - started) / 2**20


async def fan_out_latency(system: System, readers: int, events: int) -> dict[str, float]:
    name = f"fanout-{time.time_ns()}"
    limits = httpx.Limits(max_connections=readers + 8)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        headers = {**system.headers, "content-type": "application/json"}
        await http.put(system.url(name), headers=headers)
        latencies: list[float] = []
        ready = asyncio.Semaphore(0)

        async def read() -> None:
            got = 0
            params = {"offset": "now", "live": "sse"}
            async with http.stream("GET", system.url(name), params=params, headers=system.headers) as sse:
                ready.release()
                kind = ""
                async for line in sse.aiter_lines():
                    if line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:") and kind == "data":
                        now = time.time_ns()
                        for item in json.loads(line[5:]):
                            latencies.append((now - item["t"]) / 1e6)
                            got += 1
                        if got >= events:
                            return

        tasks = [asyncio.create_task(read()) for _ in range(readers)]
        for _ in range(readers):
            await ready.acquire()
        await asyncio.sleep(0.5)
        for _ in range(events):
            await http.post(system.url(name), content=json.dumps({"t": time.time_ns()}), headers=headers)
            await asyncio.sleep(0.02)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    latencies.sort()
    return {
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": latencies[-1],
    }


async def measure(system: System, args: argparse.Namespace) -> dict[str, Any]:
    cpu_before = cpu_seconds(system.process.pid)
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as http:
        appends = await appends_per_second(system, http, args.writers, args.appends)
        catch_up = await catch_up_mb_per_s(system, http, args.catchup_mb)
    fan_out = await fan_out_latency(system, args.readers, args.events)
    return {
        "system": system.name,
        "appends_per_s": appends,
        "catchup_mb_per_s": catch_up,
        **{f"fanout_{k}": v for k, v in fan_out.items()},
        "server_cpu_s": cpu_seconds(system.process.pid) - cpu_before,
        "server_rss_mb": rss_bytes(system.process.pid) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stores", default="memory,disk")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--appends", type=int, default=250)
    parser.add_argument("--catchup-mb", type=int, default=8)
    parser.add_argument("--readers", type=int, default=50)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--json", default=None, help="where to write the results")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for store in args.stores.split(","):
            for start in (start_backstream, start_reference):
                system = start(store, workdir)
                if system is None:
                    continue
                try:
                    rows.append(asyncio.run(measure(system, args)))
                finally:
                    system.stop()
    columns = [
        "system",
        "appends_per_s",
        "catchup_mb_per_s",
        "fanout_p50_ms",
        "fanout_p99_ms",
        "fanout_max_ms",
    ]
    print_table(rows, [*columns, "server_cpu_s", "server_rss_mb"])
    print("wrote", write_json("durable_streams", {"args": vars(args), "rows": rows}, args.json))


if __name__ == "__main__":
    main()
