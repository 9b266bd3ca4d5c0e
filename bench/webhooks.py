"""Webhooks of one instance: the delay from a job's end to its receiver, and the events
one instance sends per second.

A real receiver on loopback (trio + h11, tests/webhook_receiver.py) answers 200.
``latency``: jobs on ``backstream/echo`` end one after another; each event's delay is
its arrival at the receiver minus the job's ``finished_at``. ``sustained``: ``--jobs``
jobs, 50 at a time; events/s is the number of events over the time from the first
start to the last arrival. ``backlog``: ``--jobs`` events recorded at once (as after an
endpoint's outage); events/s is how fast one instance sends them.

    python bench/webhooks.py --store sqlite --jobs 2000 --concurrency 16
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time
from typing import Any

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from backstream import Config, Store, open_runtime
from backstream.actors.webhooks import WebhookSettings
from backstream.protocol.webhooks import delivery_for, event_body, event_id, parse_endpoint
from backstream.runtime.server.serve import make_store
from backstream.runtime.webhook_sender import HttpWebhookSender
from bench._common import cpu_seconds, percentile, print_table, write_json
from tests.webhook_receiver import Received, open_receiver

SECRET = "whsec_YmVuY2gtYmVuY2gtYmVuY2gtYmVuY2gtYmVuY2g="
MSG = [{"role": "user", "content": "bench"}]


async def run(store_url: str, jobs: int, latency_jobs: int, concurrency: int) -> list[dict[str, Any]]:
    arrivals = Arrivals()

    async with trio.open_nursery() as nursery:
        receiver = await open_receiver(nursery, on_request=arrivals.stamp)
        settings = WebhookSettings((parse_endpoint(receiver.url),), concurrency=concurrency, poll=0.05)
        sender = HttpWebhookSender(SECRET, max_connections=concurrency)
        config = Config(drain_timeout=0, max_jobs=1000, max_jobs_per_user=1000, echo_words_per_s=1e6)
        store: Store = make_store(store_url)
        rows = []
        async with open_runtime(config, store=store, webhooks=settings, webhook_sender=sender) as rt:
            delays = []
            for i in range(latency_jobs):
                started = await rt.start_job(
                    user="bench", thread_id="t", message_id=f"l{i}", model="backstream/echo", messages=MSG
                )
                await arrivals.wait_for(i + 1)
                record = await rt.store.get_job(started.job_id)
                assert record is not None and record.finished_at is not None
                delays.append(arrivals.last - record.finished_at)
            delays.sort()
            rows.append(
                {
                    "phase": "latency",
                    "events": len(delays),
                    "p50_ms": percentile(delays, 0.5) * 1000,
                    "p99_ms": percentile(delays, 0.99) * 1000,
                    "max_ms": delays[-1] * 1000,
                }
            )
            rows.append(await _sustained(rt, arrivals, jobs))
            rows.append(await _backlog(rt, arrivals, receiver.url, jobs))
        await sender.aclose()
        nursery.cancel_scope.cancel()
    return rows


class Arrivals:
    """When each event reached the receiver (wall time)."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.last = 0.0
        self._changed = trio.Event()

    def stamp(self, got: Received) -> None:
        self.last = self.at[got.headers["webhook-id"]] = time.time()
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = 300.0) -> None:
        with trio.fail_after(timeout):
            while len(self.at) < count:
                self._changed = trio.Event()
                await self._changed.wait()


async def _backlog(rt: Any, arrivals: Arrivals, url: str, count: int) -> dict[str, Any]:
    """``count`` events recorded at once (as after an endpoint's outage): how fast one
    instance sends them."""
    before = len(arrivals.at)
    now = time.time()
    endpoint = parse_endpoint(url)
    batch = []
    for i in range(count):
        evt = event_id(f"backlog_{i}", "response")
        body = event_body(evt, "response.completed", now, {"id": f"backlog_{i}"})
        batch.append(delivery_for(endpoint, evt, "response.completed", body, now))
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    await rt.store.record_webhooks(batch)
    rt.webhook_deliverer.wake()
    await arrivals.wait_for(before + count)
    elapsed = time.perf_counter() - t0
    return {
        "phase": "backlog",
        "events": count,
        "events_per_s": count / elapsed,
        "seconds": elapsed,
        "cpu_s": cpu_seconds() - cpu0,
    }


async def _sustained(rt: Any, arrivals: Arrivals, jobs: int) -> dict[str, Any]:
    """Jobs end all the time; each end's event goes out."""
    before = len(arrivals.at)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    limiter = trio.CapacityLimiter(50)

    async def one(i: int) -> None:
        async with limiter:
            started = await rt.start_job(
                user="bench", thread_id="t", message_id=f"s{i}", model="backstream/echo", messages=MSG
            )
            while True:
                record = await rt.store.get_job(started.job_id)
                if record is not None and record.finished_at is not None:
                    return
                await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        for i in range(jobs):
            nursery.start_soon(one, i)
    await arrivals.wait_for(before + jobs)
    elapsed = time.perf_counter() - t0
    return {
        "phase": "sustained",
        "events": jobs,
        "events_per_s": jobs / elapsed,
        "seconds": elapsed,
        "cpu_s": cpu_seconds() - cpu0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", default="sqlite", help="memory, sqlite (a temporary file) or a store URL")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs of the sustained phase")
    parser.add_argument("--latency-jobs", type=int, default=100, help="jobs of the latency phase")
    parser.add_argument("--concurrency", type=int, default=16, help="--webhook-concurrency")
    parser.add_argument("--json", help="where to write the results (default bench/results/webhooks.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db" if args.store == "sqlite" else args.store
        rows = trio.run(run, url, args.jobs, args.latency_jobs, args.concurrency)
    columns = ["phase", "events", "p50_ms", "p99_ms", "max_ms", "events_per_s", "seconds", "cpu_s"]
    print_table(rows, columns)
    out = write_json(
        "webhooks",
        {"store": args.store, "concurrency": args.concurrency, "rows": rows},
        args.json,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
