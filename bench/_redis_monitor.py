"""What a load asks of Redis, by purpose: ``MONITOR`` on each redis-server during the load.

Every command is counted under the script that ran it (MONITOR prints a script's own
commands right after its ``EVALSHA``, Redis running one thing at a time) or, outside
scripts, under its name and the kind of key it names (``job``, ``log``, ``seats``,
``outbox``...: the word after the key's hash tag). Scripts are named from their SHA1
(``script_bodies`` and the seats' scripts); one not known shows as its SHA1's start.
MONITOR costs Redis time of its own: read the counts, not the speed of a monitored run.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from backstream.runtime.stores.redis_client import script_bodies
from backstream.runtime.stores.redis_seats import SEAT_RENEW, SEAT_TAKE

__all__ = ["breakdown", "monitored"]

_LINE = re.compile(r'^\d+\.\d+ \[\d+ (\S+)\] (.*)$')
_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')
_IGNORED = {"INFO", "MONITOR", "PING", "HELLO", "CLIENT", "COMMAND", "SCRIPT", "CLUSTER", "READONLY"}


def _names() -> dict[str, str]:
    bodies = {**script_bodies(), "seat_take": SEAT_TAKE, "seat_renew": SEAT_RENEW}
    return {hashlib.sha1(body.encode()).hexdigest(): name for name, body in bodies.items()}


@contextmanager
def monitored(ports: list[int]) -> Iterator[Callable[[int], list[dict[str, Any]]]]:
    """``redis-cli monitor`` on each port while the block runs. Yields a function that
    stops the monitors and returns ``breakdown`` of what they saw, per job of ``jobs``."""
    with tempfile.TemporaryDirectory(prefix="bench-monitor-") as directory:
        files = [os.path.join(directory, f"{port}.monitor") for port in ports]
        procs = []
        for port, path in zip(ports, files, strict=True):
            with open(path, "w") as out:  # the child holds its own descriptor
                cmd = ["redis-cli", "-p", str(port), "monitor"]
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL))

        def stop() -> None:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=10)

        def result(jobs: int) -> list[dict[str, Any]]:
            stop()
            return breakdown(files, jobs)

        try:
            yield result
        finally:
            stop()


def _kind(key: str) -> str:
    """The kind of a store key: the word after its hash tag (``{p:job:J}:log:J`` -> log)."""
    rest = key.rpartition("}")[2].lstrip(":")
    return rest.split(":", 1)[0] or "-"


def breakdown(files: list[str], jobs: int) -> list[dict[str, Any]]:
    """Calls and commands (a script's own included) per job, by script or by command and
    key kind, most first."""
    names = _names()
    calls: Counter[str] = Counter()
    commands: Counter[str] = Counter()
    for path in files:
        current = ""
        with open(path, errors="replace") as lines:
            for line in lines:
                match = _LINE.match(line.strip())
                if not match:
                    continue
                args = _ARG.findall(match.group(2))
                if not args or args[0].upper() in _IGNORED:
                    continue
                command = args[0].upper()
                if match.group(1) == "lua":
                    commands[current or f"{command} (script)"] += 1
                    continue
                if command in ("EVALSHA", "EVAL"):
                    sha = args[1] if command == "EVALSHA" else hashlib.sha1(args[1].encode()).hexdigest()
                    current = f"script {names.get(sha, sha[:8])}"
                else:
                    key = args[1] if len(args) > 1 else ""
                    current = f"{command} {_kind(key)}"
                calls[current] += 1
                commands[current] += 1
    total = sum(commands.values()) or 1
    return [
        {
            "what": what,
            "calls_per_job": round(calls[what] / jobs, 2),
            "commands_per_job": round(count / jobs, 2),
            "share_pct": round(count / total * 100, 1),
        }
        for what, count in commands.most_common()
    ]
