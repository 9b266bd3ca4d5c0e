"""The limits of a subprocess tool, and running one call in a child process under them.

A tool with ``isolation="subprocess"`` runs each call in a fresh Python process
(``subprocess_runner``) that first applies the tool's ``ToolLimits`` with
``resource.setrlimit`` (CPU seconds, address space, open files, processes), leaves
the network if asked (a new Linux network namespace), switches user if asked, and
only then imports the tool. The parent kills it at the tool's timeout. A limit the
child cannot apply fails the call; it never runs without it. The exceptions are limits
a whole platform lacks (``platform_gaps``: off Linux): calls run without those, and
registering the tool logs a warning saying so.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
from typing import Any

import attrs
import trio

__all__ = [
    "DEFAULT_LIMITS",
    "KILL_GRACE",
    "ToolLimits",
    "applicable",
    "call_in_subprocess",
    "limit_warnings",
    "platform_gaps",
]

KILL_GRACE = 0.5
"""Seconds a subprocess tool gets between SIGTERM and SIGKILL."""

_RUNNER = "backstream.runtime.tools.subprocess_runner"


def _positive_or_none(_instance: Any, attribute: Any, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"ToolLimits.{attribute.name} must be a positive integer or None, not {value!r}")


@attrs.frozen
class ToolLimits:
    """What one call of a subprocess tool may use; ``None`` leaves a resource unlimited.

    Limits are set in the child for good (soft and hard alike) and never above what the
    server itself may use.
    """

    cpu_seconds: int | None = attrs.field(default=60, validator=_positive_or_none)
    """CPU time (RLIMIT_CPU): past it the call is ended (SIGXCPU, then SIGKILL a second later)."""
    address_space_mib: int | None = attrs.field(default=2048, validator=_positive_or_none)
    """Virtual memory (RLIMIT_AS), in MiB: an allocation past it fails (``MemoryError``)."""
    open_files: int | None = attrs.field(default=256, validator=_positive_or_none)
    """File descriptors (RLIMIT_NOFILE): opening one more fails (``EMFILE``)."""
    processes: int | None = attrs.field(default=64, validator=_positive_or_none)
    """Processes and threads the call may start (RLIMIT_NPROC): one more fails (``EAGAIN``).
    The kernel counts every task of the user, so the bound is the user's tasks at the
    start plus this; it does not hold for root (see ``user``)."""
    network: bool = True
    """False: the call runs in a new network namespace with no interface up (Linux only;
    where the platform does not allow one, calls fail rather than run with a network)."""
    user: str | None = None
    """Run the call as this user (the server must run as root to switch): root can lift
    its own limits and is exempt from the process limit, so give tools a user of their own."""

    def as_json(self) -> str:
        return json.dumps(attrs.asdict(self))


DEFAULT_LIMITS = ToolLimits()


@functools.cache
def network_isolation_failure() -> str | None:
    """Why a child process cannot leave the network here, or ``None`` if it can (asked once,
    of a real child, since the answer depends on the kernel, the container and the user)."""
    done = subprocess.run(
        [sys.executable, "-m", _RUNNER, "--probe-network"], capture_output=True, text=True, check=False
    )
    if done.returncode == 0:
        return None
    return done.stdout.strip() or f"the probe failed (exit {done.returncode}): {done.stderr.strip()[-200:]}"


def platform_gaps(platform: str, has_proc: bool) -> dict[str, str]:
    """The limits a platform cannot apply, with why: the process limit counts the user's
    tasks in /proc, and macOS does not enforce RLIMIT_AS."""
    gaps = {}
    if not has_proc:
        gaps["processes"] = "no /proc to count the user's processes"
    if platform == "darwin":
        gaps["address_space_mib"] = "macOS does not enforce RLIMIT_AS"
    return gaps


_GAPS = platform_gaps(sys.platform, os.path.isdir("/proc/self"))


def applicable(limits: ToolLimits) -> ToolLimits:
    """``limits`` without those this platform cannot apply (``limit_warnings`` says which)."""
    unset: dict[str, Any] = dict.fromkeys(_GAPS)
    return attrs.evolve(limits, **unset)


def limit_warnings(name: str, limits: ToolLimits) -> list[str]:
    """What ``limits`` promise and will not get here, for the server's log at registration."""
    warnings = []
    missing = {field: why for field, why in _GAPS.items() if getattr(limits, field) is not None}
    if missing:
        warnings.append(
            f"tool {name!r}: this platform cannot apply its limits {', '.join(missing)} "
            f"({'; '.join(missing.values())}): its calls run without them"
        )
    if limits.network is False:
        failure = network_isolation_failure()
        if failure is not None:
            warnings.append(
                f"tool {name!r} is to run without network, which is not possible here "
                f"({failure}): its calls will fail"
            )
    if os.geteuid() == 0 and limits.user is None:
        warnings.append(
            f"tool {name!r} runs as root: it can lift its own limits and its process limit does not "
            "hold; give it a user of its own (ToolLimits(user=...))"
        )
    return warnings


async def call_in_subprocess(import_path: str, args: dict[str, Any], limits: ToolLimits) -> Any:
    """Run the tool at ``import_path`` with ``args`` in a child process under ``limits``;
    return its result. Raises ``RuntimeError`` with a message the model can read for an
    error of the tool, a limit it went over or a child that died.

    Cancellation (the tool's timeout): SIGTERM, then SIGKILL after ``KILL_GRACE``; raises
    ``Cancelled`` once the child is gone.
    """
    done = await trio.run_process(
        [sys.executable, "-m", _RUNNER, "--limits", applicable(limits).as_json(), import_path],
        stdin=json.dumps(args).encode(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        deliver_cancel=_terminate_then_kill,
    )
    if done.returncode != 0:
        raise RuntimeError(_describe_exit(done.returncode, limits))
    try:
        reply = json.loads(done.stdout)
    except ValueError:
        raise RuntimeError("the tool process wrote no reply") from None
    if reply.get("error"):
        raise RuntimeError(reply["error"])
    return reply["result"]


def _describe_exit(returncode: int, limits: ToolLimits) -> str:
    if returncode >= 0:
        return f"the tool process failed (exit {returncode})"
    name = signal.Signals(-returncode).name
    if returncode == -signal.SIGXCPU:
        return f"the tool process went over its CPU-time limit ({limits.cpu_seconds} s) and was ended"
    if returncode == -signal.SIGKILL and limits.cpu_seconds is not None:
        return f"the tool process was ended by SIGKILL (its CPU-time limit is {limits.cpu_seconds} s)"
    return f"the tool process was ended by {name}"


async def _terminate_then_kill(process: trio.Process) -> None:
    """Ask the child to stop, and kill it if it has not within ``KILL_GRACE`` seconds
    (``run_process`` cancels this once the child has exited)."""
    with contextlib.suppress(OSError):  # it exited already
        process.terminate()
        await trio.sleep(KILL_GRACE)
        process.send_signal(signal.SIGKILL)
