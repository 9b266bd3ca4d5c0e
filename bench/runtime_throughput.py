"""In-process throughput of the runtime against a plain trio memory channel.

K jobs on ``backstream/lorem`` at R tokens/s each, W watchers per job. Each
token carries the wall time it was produced, so every watcher measures the
token-to-watcher latency. In the same run, a raw baseline pushes the same
tokens at the same rate through plain trio memory channels (one per watcher)
with none of the runtime's features; the ratios compare the two.

    python bench/runtime_throughput.py --jobs 500 --watchers 1 --rate 30 --tokens 300
"""

from __future__ import annotations

import argparse
import gc
import pathlib
import sys
import time
import tracemalloc
from typing import Any

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from backstream import Config, open_runtime
from bench._common import cpu_seconds, percentile, print_table, write_json

MSG = [{"role": "user", "content": "bench"}]


async def run_ours(jobs: int, watchers: int, rate: float, tokens: int, batch_ms: float) -> dict[str, Any]:
    config = Config(max_jobs=jobs, max_jobs_per_user=jobs, batch_ms=batch_ms, drain_timeout=0)
    latencies: list[float] = []
    batches = 0
    delivered = 0
    async with open_runtime(config) as rt:

        async def watch(job_id: str) -> None:
            nonlocal batches, delivered
            async with rt.watch(job_id, user="bench") as stream:
                async for batch in stream:
                    now = time.time()
                    batches += 1
                    for stamp in batch.text.split():
                        latencies.append(now - float(stamp))
                        delivered += 1

        cpu0, t0 = cpu_seconds(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            for j in range(jobs):
                started = await rt.start_job(
                    user="bench",
                    thread_id="t",
                    message_id=f"m{j}",
                    model="backstream/lorem",
                    messages=MSG,
                    params={"max_tokens": tokens, "tokens_per_s": rate, "timestamps": True},
                )
                for _ in range(watchers):
                    nursery.start_soon(watch, started.job_id)
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return summarize("backstream", latencies, delivered, batches, elapsed, cpu, jobs * tokens)


async def run_raw(jobs: int, watchers: int, rate: float, tokens: int) -> dict[str, Any]:
    latencies: list[float] = []
    delivered = 0

    async def produce(sends: list[trio.MemorySendChannel[str]]) -> None:
        start = trio.current_time()
        for i in range(tokens):
            await trio.sleep_until(start + i / rate)
            token = f"{time.time():.6f} "
            for send in sends:
                send.send_nowait(token)
        for send in sends:
            await send.aclose()

    async def consume(receive: trio.MemoryReceiveChannel[str]) -> None:
        nonlocal delivered
        async for token in receive:
            latencies.append(time.time() - float(token))
            delivered += 1

    cpu0, t0 = cpu_seconds(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(jobs):
            pairs = [trio.open_memory_channel[str](tokens) for _ in range(watchers)]
            for _, receive in pairs:
                nursery.start_soon(consume, receive)
            nursery.start_soon(produce, [send for send, _ in pairs])
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return summarize("raw trio channel", latencies, delivered, delivered, elapsed, cpu, jobs * tokens)


def summarize(
    name: str, latencies: list[float], delivered: int, batches: int, elapsed: float, cpu: float, produced: int
) -> dict[str, Any]:
    latencies.sort()
    return {
        "name": name,
        "tokens_in_per_s": round(produced / elapsed),
        "tokens_out_per_s": round(delivered / elapsed),
        "batches_per_s": round(batches / elapsed),
        "tokens_per_batch": round(delivered / max(batches, 1), 2),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "cpu_s": round(cpu, 2),
        "cpu_us_per_token": round(cpu / max(delivered, 1) * 1e6, 2),
        "seconds": round(elapsed, 2),
        "delivered": delivered,
    }


async def measure_memory(jobs: int, watchers: int, tokens: int) -> dict[str, float]:
    """Bytes held per finished job of ``tokens`` words, and per watcher parked on one."""
    config = Config(max_jobs=jobs, max_jobs_per_user=jobs, drain_timeout=0)
    async with open_runtime(config) as rt:
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        ids = []
        for j in range(jobs):
            started = await rt.start_job(
                user="bench",
                thread_id="t",
                message_id=f"m{j}",
                model="backstream/lorem",
                messages=MSG,
                params={"max_tokens": tokens, "tokens_per_s": 1_000_000},
            )
            ids.append(started.job_id)
        await rt.wait_idle()
        gc.collect()
        with_jobs = tracemalloc.get_traced_memory()[0]
        parked = 0
        all_parked = trio.Event()
        async with trio.open_nursery() as nursery:
            for job_id in ids:
                for _ in range(watchers):

                    async def park(job_id: str = job_id) -> None:
                        nonlocal parked
                        async with rt.watch(job_id, user="bench") as stream:
                            await stream.__anext__()
                            parked += 1
                            if parked == jobs * watchers:
                                all_parked.set()
                            await trio.sleep_forever()

                    nursery.start_soon(park)
            # Measured once every watcher has had its first batch and waits: a watcher
            # reading its first batch holds that batch's events for a moment.
            await all_parked.wait()
            gc.collect()
            with_watchers = tracemalloc.get_traced_memory()[0]
            nursery.cancel_scope.cancel()
        tracemalloc.stop()
    return {
        "bytes_per_job": round((with_jobs - base) / jobs),
        "bytes_per_watcher": round((with_watchers - with_jobs) / (jobs * watchers)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--watchers", type=int, default=1)
    ap.add_argument("--rate", type=float, default=30.0, help="tokens per second per job")
    ap.add_argument("--tokens", type=int, default=300, help="tokens per job")
    ap.add_argument("--batch-ms", type=float, default=50.0)
    ap.add_argument(
        "--json", help="where to write the results (default bench/results/runtime_throughput.json)"
    )
    a = ap.parse_args()

    ours = trio.run(run_ours, a.jobs, a.watchers, a.rate, a.tokens, a.batch_ms)
    raw = trio.run(run_raw, a.jobs, a.watchers, a.rate, a.tokens)
    memory = trio.run(measure_memory, min(a.jobs, 100), max(a.watchers, 1), a.tokens)
    ratio = {
        "tokens_out_per_s": round(ours["tokens_out_per_s"] / max(raw["tokens_out_per_s"], 1), 3),
        "cpu_per_token": round(ours["cpu_us_per_token"] / max(raw["cpu_us_per_token"], 1e-9), 2),
        "p50_ms_added": round(ours["p50_ms"] - raw["p50_ms"], 2),
        "p99_ms_added": round(ours["p99_ms"] - raw["p99_ms"], 2),
    }
    print(
        f"K={a.jobs} jobs x W={a.watchers} watchers, {a.rate:g} tokens/s, "
        f"{a.tokens} tokens, batch {a.batch_ms:g} ms"
    )
    columns = [
        "name",
        "tokens_in_per_s",
        "tokens_out_per_s",
        "batches_per_s",
        "tokens_per_batch",
        "p50_ms",
        "p99_ms",
        "cpu_s",
        "cpu_us_per_token",
    ]
    print_table([ours, raw], columns)
    print(f"ratio backstream/raw: {ratio}")
    print(
        f"memory: {memory['bytes_per_job']} B per finished job of {a.tokens} tokens, "
        f"{memory['bytes_per_watcher']} B per watcher"
    )
    path = write_json(
        "runtime_throughput",
        {"params": vars(a), "ours": ours, "raw": raw, "ratio": ratio, "memory": memory},
        a.json,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
