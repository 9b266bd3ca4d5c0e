"""The Redis store's retention sweep: how fast it removes expired jobs, split between
instances, and whether the index sets stay bounded under a steady stream of starts.

1. ``--jobs`` finished jobs (made through the store: create with capacity, a terminal
   commit), then ``delete_expired`` until none is left, on 1 and on 2 instances sweeping
   at once: expired jobs removed per second.
2. ``--rate`` starts per second for ``--seconds`` (from ``--workers`` processes), each
   job ending at once with ``--retention`` seconds of retention, while two instances
   sweep every second (the keeper's ``sweep_interval``): the sizes of the expiry
   index, the running sets and the users' indexes, second by second. Bounded: they level
   off at about rate * (retention + sweep interval).

    python bench/redis_sweep.py --url redis://127.0.0.1:6379/0 --jobs 20000 --rate 500
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time
import uuid
from typing import Any

import coredis
import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from backstream.protocol.events import StatusEvent
from backstream.protocol.records import JobProgress, JobRecord, JobRequest, SharedCapacity
from backstream.runtime.stores.redis import RedisStore
from backstream.runtime.stores.redis_clock import RedisFrame
from backstream.runtime.stores.redis_keys import SHARDS
from bench._common import print_table, write_json

USERS = 50


def _record(job_id: str, now: float) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        user=f"u{hash(job_id) % USERS}",
        thread_id="t",
        message_id=job_id,
        request=JobRequest("backstream/echo", ({"role": "user", "content": "hi"},), {}),
        status="running",
        seq=0,
        epoch=1,
        content_length=0,
        created_at=now,
        updated_at=now,
        owner="i_bench",
        lease_until=now + 15,
    )


async def _start_and_end(store: RedisStore, job_id: str, retention: float) -> None:
    now = time.time()
    capacity = SharedCapacity(now=now, lease_until=now + 15, max_jobs=1_000_000, max_jobs_per_user=1_000_000)
    await store.create_job(_record(job_id, now), capacity)
    ended = JobProgress(
        status="completed",
        seq=1,
        content_length=0,
        updated_at=now,
        finished_at=now,
        expires_at=now + retention,
    )
    await store.commit(job_id, [StatusEvent(seq=1, status="completed")], ended)


async def _fill(store: RedisStore, count: int, retention: float) -> float:
    limit = trio.CapacityLimiter(64)
    started = time.perf_counter()

    async def one(i: int) -> None:
        async with limit:
            await _start_and_end(store, f"j_{uuid.uuid4().hex[:16]}", retention)

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)
    return count / (time.perf_counter() - started)


async def _sweep_all(stores: list[RedisStore], now: float) -> tuple[list[int], float]:
    counts = [0] * len(stores)
    started = time.perf_counter()

    async def sweep(index: int) -> None:
        while batch := await stores[index].delete_expired(now):
            counts[index] += len(batch)

    async with trio.open_nursery() as nursery:
        for index in range(len(stores)):
            nursery.start_soon(sweep, index)
    return counts, time.perf_counter() - started


async def _index_sizes(store: RedisStore) -> dict[str, int]:
    k, r = store.keys, store.redis
    async with r.pipeline(transaction=False) as pipe:
        expiry = [pipe.zcard(k.expiry(s)) for s in range(SHARDS)]
        taken = [pipe.zcard(k.expiry_taken(s)) for s in range(SHARDS)]
        running = [pipe.zcard(k.running(s)) for s in range(SHARDS)]
        users = [pipe.zcard(k.user_index(f"u{u}")) for u in range(USERS)]
    return {
        "expiry": sum([await x for x in expiry]),
        "taken": sum([await x for x in taken]),
        "running": sum([await x for x in running]),
        "user_indexes": sum([await x for x in users]),
    }


async def _start_steadily(url: str, prefix: str, rate: float, seconds: float, retention: float) -> str:
    """A worker process's share of the steady phase: ``rate`` starts per second for
    ``seconds``, each job ending at once, at most 128 under way (past it, the pace slips).
    Returns how many it made and in how long."""
    stores = await _open(url, prefix, 1)
    under_way = trio.Semaphore(128)
    made = 0

    async def one() -> None:
        nonlocal made
        try:
            await _start_and_end(stores[0], f"j_{uuid.uuid4().hex[:16]}", retention)
            made += 1
        finally:
            under_way.release()

    try:
        t0, launched = time.perf_counter(), 0
        async with trio.open_nursery() as nursery:
            while (elapsed := time.perf_counter() - t0) < seconds:
                while launched < int(elapsed * rate):
                    await under_way.acquire()
                    nursery.start_soon(one)
                    launched += 1
                await trio.sleep(0.01)
        took = time.perf_counter() - t0
    finally:
        await _close(stores)
    return f"{made} {took:.3f}"


async def _steady(args: argparse.Namespace, prefix: str) -> list[dict[str, Any]]:
    """Worker processes start jobs (one Python process cannot make 500 starts/s through
    six script calls each); this one sweeps with two instances and samples the sizes."""
    stores = await _open(args.url, prefix, 2)
    samples: list[dict[str, Any]] = []
    swept = 0

    async def sweeper(store: RedisStore) -> None:
        nonlocal swept
        while True:
            await trio.sleep(1.0)
            batch = await store.delete_expired(time.time())
            swept += len(batch)  # counted after the await: the other sweeper adds too

    worker = [
        sys.executable,
        __file__,
        "--worker",
        prefix,
        "--url",
        args.url,
        "--retention",
        str(args.retention),
    ]
    worker += ["--rate", str(args.rate / args.workers), "--seconds", str(args.seconds)]
    try:
        async with trio.open_nursery() as nursery:
            for store in stores:
                nursery.start_soon(sweeper, store)
            with tempfile.TemporaryDirectory() as directory:
                outputs = [pathlib.Path(directory, f"worker-{i}.out") for i in range(args.workers)]
                procs = []
                for output in outputs:
                    with output.open("w") as out:
                        procs.append(await trio.lowlevel.open_process(worker, stdout=out))
                t0 = time.perf_counter()
                while any(proc.poll() is None for proc in procs) or time.perf_counter() - t0 < args.seconds:
                    await trio.sleep(1.0)
                    sizes = await _index_sizes(stores[0])
                    samples.append({"t_s": round(time.perf_counter() - t0), "swept": swept, **sizes})
                reports = [output.read_text().split() or ["0", "0"] for output in outputs]
                made = sum(int(report[0]) for report in reports)
                took = max(float(report[1]) for report in reports)
            for _ in range(int(args.retention) + 3):  # the last jobs expire and go
                await trio.sleep(1.0)
                sizes = await _index_sizes(stores[0])
                samples.append({"t_s": round(time.perf_counter() - t0), "swept": swept, **sizes})
            nursery.cancel_scope.cancel()
    finally:
        await _close(stores)
    for sample in samples:
        sample["started_total"] = made
        sample["starting_s"] = took
    return samples


async def _delete_prefix(url: str, prefix: str) -> None:
    if not url.startswith(("redis://", "rediss://")):
        return  # a cluster or sentinel group of the caller's own, torn down after the run
    async with coredis.Redis.from_url(url, decode_responses=True) as r:
        for pattern in ("{" + prefix + "}:*", "{" + prefix + ":*"):
            batch: list[str] = []
            async for key in r.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    await r.delete(batch)
                    batch = []
            if batch:
                await r.delete(batch)


async def _open(url: str, prefix: str, count: int) -> list[RedisStore]:
    frame = RedisFrame()  # one machine's clock
    stores = [RedisStore(url, prefix=prefix, frame=frame) for _ in range(count)]
    for store in stores:
        await store.open()
    return stores


async def _close(stores: list[RedisStore]) -> None:
    for store in reversed(stores):
        await store.aclose()


async def measure_sweep(url: str, jobs: int, instances: int) -> dict[str, Any]:
    """Make ``jobs`` expired jobs on the store at ``url`` (any Redis URL the store takes),
    then sweep them with ``instances`` instances at once: how many each removed, how fast."""
    prefix = f"bench:{uuid.uuid4().hex[:10]}"
    stores = await _open(url, prefix, instances)
    try:
        fill_rate = await _fill(stores[0], jobs, retention=1.0)
        counts, seconds = await _sweep_all(stores, time.time() + 2)
    finally:
        await _close(stores)
        await _delete_prefix(url, prefix)
    return {
        "instances": instances,
        "expired_jobs": jobs,
        "removed": sum(counts),
        "per_instance": "/".join(map(str, counts)),
        "seconds": seconds,
        "removed_per_s": sum(counts) / seconds,
        "made_per_s": fill_rate,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sweeps = [await measure_sweep(args.url, args.jobs, instances) for instances in (1, 2)]
    prefix = f"bench:{uuid.uuid4().hex[:10]}"
    try:
        steady = await _steady(args, prefix)
    finally:
        await _delete_prefix(args.url, prefix)
    return {"sweep": sweeps, "steady": steady}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--jobs", type=int, default=20_000, help="expired jobs to sweep")
    ap.add_argument("--rate", type=float, default=500.0, help="starts per second in the steady phase")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the steady phase")
    ap.add_argument("--retention", type=float, default=2.0, help="retention of the steady phase's jobs (s)")
    ap.add_argument("--workers", type=int, default=4, help="processes that make the steady phase's starts")
    ap.add_argument("--json", help="where to write the results (default bench/results/redis_sweep.json)")
    ap.add_argument("--worker", metavar="PREFIX", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(trio.run(_start_steadily, args.url, args.worker, args.rate, args.seconds, args.retention))
        return
    result = trio.run(run, args)
    print("sweep: expired jobs removed")
    print_table(
        result["sweep"],
        ["instances", "expired_jobs", "removed", "per_instance", "seconds", "removed_per_s", "made_per_s"],
    )
    print(
        f"\nsteady: {args.rate:g} starts/s, retention {args.retention:g} s, two instances sweeping every 1 s"
    )
    first = result["steady"][0] if result["steady"] else {"started_total": 0, "starting_s": 1.0}
    started, took = first["started_total"], first["starting_s"]
    print(f"({started} jobs started in {took:.1f} s: {started / took:.0f}/s achieved)")
    print_table(result["steady"], ["t_s", "swept", "expiry", "taken", "running", "user_indexes"])
    config = {k: getattr(args, k) for k in ("jobs", "rate", "seconds", "retention")}
    path = write_json("redis_sweep", {"config": config, **result}, args.json)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
