"""Redis commands per token: what the Redis store asks of Redis per streamed token.

A redis-server of its own (on a free port, or ``--port``) so that ``INFO commandstats``
counts only this run; commands that Lua scripts run count too (``EVALSHA`` and each
command inside it). Three runtimes share it in one process: A runs J jobs of the
built-in ``lorem`` model (R tokens/s each, T tokens, the default flush settings), B
watches each job with W watchers (0: nobody watches), C only holds a connection of
another user (it should hear nothing). Each row reports the commands per token (a
token is a log entry), the tokens per flush (``XADD`` calls: the flush groups what the
event loop let accumulate, so a loaded process writes fewer, larger batches), the
commands per flush, the commands of the run by name, and the messages each instance's
subscriber received.

    python bench/redis_commands.py                       # 20 jobs, 30 tok/s, 300 tokens
    python bench/redis_commands.py --jobs 50 --watchers 0,1,3
    python bench/redis_commands.py --flush-ms 100,250   # the flush interval against commands per token
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import coredis  # noqa: E402
import trio  # noqa: E402

from backstream import Config, Runtime, open_runtime  # noqa: E402
from backstream.runtime.stores.redis import RedisStore  # noqa: E402
from bench._common import print_table, write_json  # noqa: E402
from bench._procs import free_port, wait_for_port  # noqa: E402

MSG = [{"role": "user", "content": "x"}]


async def commandstats(port: int) -> dict[str, int]:
    async with coredis.Redis(host="127.0.0.1", port=port, decode_responses=True) as admin:
        stats = await admin.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if isinstance(value, dict) and "calls" in value
    }


def _heard(rt: Runtime) -> str:
    """Messages the instance's subscriber received ('?' for a store that does not count them)."""
    subscriber = getattr(rt.store.statistics(), "subscriber", None)
    return "?" if subscriber is None else str(subscriber.messages_total)


async def watch_to_end(rt: Runtime, job_id: str) -> None:
    async with rt.watch(job_id, user="alice") as batches:
        async for _ in batches:
            pass


async def run_once(
    port: int, jobs: int, watchers: int, rate: float, tokens: int, flush_ms: float
) -> dict[str, Any]:
    prefix = f"bench:{uuid.uuid4().hex[:8]}"
    url = f"redis://127.0.0.1:{port}/0"
    # The flush interval given (100 ms by default); room for every job of the run.
    limits = {"max_jobs_per_user": max(jobs, 8), "max_jobs": max(jobs, 8) * 2}
    config = Config(drain_timeout=0, flush_ms=flush_ms, **limits)
    async with (
        open_runtime(config, store=RedisStore(url, prefix=prefix)) as a,
        open_runtime(config, store=RedisStore(url, prefix=prefix)) as b,
        open_runtime(config, store=RedisStore(url, prefix=prefix)) as c,
    ):
        with c.subscribe_notifications("bob"):
            await trio.sleep(0.5)  # subscribers settled
            before = await commandstats(port)
            cpu_before = time.process_time()
            job_ids = []
            for index in range(jobs):
                started = await a.start_job(
                    user="alice",
                    thread_id="t",
                    message_id=f"m{index}",
                    model="backstream/lorem",
                    messages=MSG,
                    params={"max_tokens": tokens, "tokens_per_s": rate},
                )
                job_ids.append(started.job_id)
            async with trio.open_nursery() as nursery:
                for job_id in job_ids:
                    for _ in range(watchers):
                        nursery.start_soon(watch_to_end, b, job_id)
            await a.wait_idle()
            after = await commandstats(port)
            records = [(await a.get_job(job_id, user="alice")).job for job_id in job_ids]
        heard = [_heard(rt) for rt in (a, b, c)]
        groups = getattr(a.store.statistics(), "commit_groups", None)  # None: code without groups
        cpu_s = time.process_time() - cpu_before
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    delta = {name: calls for name, calls in delta.items() if calls > 0 and name != "info"}
    total = sum(delta.values())
    top = sorted(delta.items(), key=lambda item: -item[1])[:8]
    completed = sum(record.status == "completed" for record in records)
    entries = sum(record.seq for record in records)  # one per token, and each job's end
    flushes = max(delta.get("xadd", 0), 1)
    return {
        "jobs": jobs,
        "flush_ms": flush_ms,
        "completed": completed,
        "watchers": watchers,
        "tokens": entries,
        "commands": total,
        "per_token": round(total / entries, 3),
        "tokens_per_flush": round(entries / flushes, 2),
        "per_flush": round(total / flushes, 2),
        "by_name": " ".join(f"{name}={calls}" for name, calls in top),
        "heard_a_b_c": "/".join(heard),
        "commits_per_group": round(groups.calls_sent / max(groups.groups_sent, 1), 1) if groups else "-",
        "cpu_us_per_token": round(cpu_s / entries * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--watchers", default="0,1,3", help="watchers per job on B, one run each")
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--port", type=int, default=0, help="a redis-server already running there")
    parser.add_argument("--flush-ms", default="100", help="the jobs' flush interval(s), one run each")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    server = None
    port = args.port
    directory = tempfile.mkdtemp(prefix="bench-redis-")
    if not port:
        if shutil.which("redis-server") is None:
            sys.exit("redis-server is needed (apt-get install redis-server), or give --port")
        port = free_port()
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", directory],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(port)
    try:
        rows = [
            trio.run(run_once, port, args.jobs, int(watchers), args.rate, args.tokens, float(flush_ms))
            for flush_ms in args.flush_ms.split(",")
            for watchers in args.watchers.split(",")
        ]
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        shutil.rmtree(directory, ignore_errors=True)
    print(f"{args.rate:g} tokens/s per stream, {args.tokens} tokens")
    columns = ["jobs", "flush_ms", "completed", "watchers", "tokens", "commands", "per_token"]
    columns += ["tokens_per_flush", "per_flush", "commits_per_group", "cpu_us_per_token"]
    print_table(rows, [*columns, "heard_a_b_c", "by_name"])
    path = write_json("redis_commands", {"args": vars(args), "rows": rows}, args.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
