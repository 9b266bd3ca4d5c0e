"""``serve --workers N``: N server processes on one port (SO_REUSEPORT) sharing a Redis store.

The kernel spreads new connections over the processes; any of them can serve
any job, since jobs, logs, aborts and capacity live in Redis. The parent only
starts the workers, forwards SIGINT/SIGTERM and waits. Every worker serves
``--http-port`` too (SO_REUSEPORT); only the first serves ``--metrics-port``.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from types import FrameType

from backstream.runtime.server.settings import ServeSettings
from backstream.runtime.stores.redis_urls import REDIS_SCHEMES

__all__ = ["run_workers"]


def _strip(argv: list[str], flag: str, takes_value: bool = True) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == flag:
            skip = takes_value
            continue
        if arg.startswith(flag + "="):
            continue
        out.append(arg)
    return out


def run_workers(settings: ServeSettings, argv: list[str]) -> int:
    """Start the workers and wait for them. Returns the exit status: 1 at once (with one
    line on stderr) for a store the workers cannot share."""
    if not str(settings.store).startswith(tuple(f"{scheme}://" for scheme in REDIS_SCHEMES)):
        print(
            f"backstream serve: --workers {settings.workers} needs a store all workers share "
            "(--store redis://...): a memory or SQLite store belongs to one process",
            file=sys.stderr,
        )
        return 1
    env = {**os.environ, "BACKSTREAM_REUSE_PORT": "1", "BACKSTREAM_WORKERS": "1"}
    no_auth = not (settings.token or settings.tokens_file or settings.jwt_secret)
    if no_auth:  # one dev token for every worker
        token = secrets.token_urlsafe(24)
        env["BACKSTREAM_TOKENS"] = f"{token}=dev"
        print(f"no auth configured: connect as user 'dev' with token {token}", file=sys.stderr, flush=True)
    base = _strip(_strip(argv, "--workers"), "--metrics-port")
    env.pop("BACKSTREAM_METRICS_PORT", None)
    children = []
    for index in range(settings.workers):
        args = list(base)
        if index == 0 and settings.metrics_port is not None:
            args += ["--metrics-port", str(settings.metrics_port)]
        children.append(subprocess.Popen([sys.executable, "-m", "backstream", *args], env=env))

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)
