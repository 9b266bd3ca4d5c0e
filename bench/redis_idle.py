"""What an idle deployment costs Redis: K ``backstream serve`` instances on one redis-server
of the bench's own, no job and no connection; Redis commands per second and Redis CPU
during ``--seconds`` after a warm-up (every instance has announced itself and seen the
others), for each K. This is the housekeeping (the retention sweep, the orphan scan, the
outbox passes) and the instances' announcements: what a deployment pays before any work.
With ``--compare-src`` the same for another checkout, one after the other.

    python bench/redis_idle.py                                  # 1, 3 and 6 instances
    python bench/redis_idle.py --instances 1,2,4,8 --seconds 30
    python bench/redis_idle.py --compare-src /path/to/older/checkout
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time
import uuid
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench._common import print_table, write_json  # noqa: E402
from bench._procs import free_port, wait_for_port  # noqa: E402
from bench._redis_cluster import command_calls, cpu_seconds, redis_servers  # noqa: E402

IGNORED = {"info", "ping"}  # the bench's own polling


def start_serves(source: pathlib.Path, url: str, count: int) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "BACKSTREAM_REDIS_PREFIX": f"idle{uuid.uuid4().hex[:8]}"}
    procs, ports = [], []
    for _ in range(count):
        port = free_port()
        cmd = [sys.executable, "-m", "backstream", "serve", "--port", str(port), "--store", url]
        cmd += ["--log-level", "warning"]
        procs.append(subprocess.Popen(cmd, cwd=source, env=env))
        ports.append(port)
    for port in ports:
        wait_for_port(port)
    return procs


def measure(source: pathlib.Path, count: int, warmup: float, seconds: float) -> dict[str, Any]:
    with redis_servers(0) as (url, [port]):
        procs = start_serves(source, url, count)
        try:
            time.sleep(warmup)
            calls0, cpu0 = command_calls(port), cpu_seconds(port)
            time.sleep(seconds)
            calls1, cpu1 = command_calls(port), cpu_seconds(port)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=20)
    delta = {k: v - calls0.get(k, 0) for k, v in calls1.items() if k not in IGNORED}
    total = sum(delta.values())
    top = sorted(((k, v) for k, v in delta.items() if v), key=lambda kv: -kv[1])[:6]
    return {
        "instances": count,
        "commands_per_s": round(total / seconds, 1),
        "per_instance_per_s": round(total / seconds / count, 1),
        "redis_cpu_ms_per_s": round((cpu1 - cpu0) / seconds * 1000, 2),
        "by_name": " ".join(f"{k}={v}" for k, v in top),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", default="1,3,6", help="instance counts, one measure each")
    ap.add_argument("--warmup", type=float, default=7.0, help="seconds before counting (> 5 s renewals)")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds counted")
    ap.add_argument("--compare-src", help="also measure the backstream checkout in this directory")
    ap.add_argument("--json", help="where to write the results (default bench/results/redis_idle.json)")
    a = ap.parse_args()
    sources = [("this checkout", HERE.parent)]
    if a.compare_src:
        sources.append((a.compare_src, pathlib.Path(a.compare_src).resolve()))
    rows = []
    for name, source in sources:
        for count in (int(n) for n in a.instances.split(",")):
            rows.append({"code": name, **measure(source, count, a.warmup, a.seconds)})
            print(f"measured {name} x{count}", file=sys.stderr, flush=True)
    print(f"idle instances on one Redis, {a.seconds:g} s counted after {a.warmup:g} s")
    columns = ["code", "instances", "commands_per_s", "per_instance_per_s", "redis_cpu_ms_per_s", "by_name"]
    print_table(rows, columns)
    print(f"wrote {write_json('redis_idle', {'params': vars(a), 'rows': rows}, a.json)}")


if __name__ == "__main__":
    main()
