"""Tools used by the tests (importable, so that subprocess isolation and --tools can load them)."""

from __future__ import annotations

import os
import socket
import time
from typing import Literal

import attrs
import trio

from backstream.runtime.tools.registry import ToolLimits, tool


@attrs.frozen
class Greeting:
    name: str
    style: Literal["plain", "loud"] = "plain"


def greet(request: Greeting) -> str:
    """Greet someone."""
    text = f"hello {request.name}"
    return text.upper() if request.style == "loud" else text


def add(a: int, b: int = 0, note: str | None = None) -> int:
    """Add two integers."""
    return a + b


async def slow(seconds: float) -> str:
    """Sleep, then answer."""
    await trio.sleep(seconds)
    return "slept"


def broken(x: int) -> str:
    """Always fails."""
    raise ValueError(f"cannot handle {x}")


def spin(seconds: float) -> str:
    """Block a process for a while (a hang a thread cannot escape)."""
    time.sleep(seconds)
    return "done"


async def add_async(a: int, b: int = 0) -> int:
    """Add two integers, as a coroutine (tests on a mock clock cannot wait for threads)."""
    await trio.lowlevel.checkpoint()
    return a + b


hang_isolated = tool(spin, name="hang_isolated", timeout=3, isolation="subprocess")  # room for a slow start
delete_files = tool(
    add_async, name="delete_files", requires_approval=True, description="Dangerous: needs a person's OK"
)


def stubborn(seconds: float) -> str:
    """Block a process for a while and ignore SIGTERM (only SIGKILL ends it)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)
    return "done"


stubborn_isolated = tool(stubborn, name="stubborn_isolated", timeout=2, isolation="subprocess")


# -- tools that go over their limits (subprocess isolation, ToolLimits) ---------------------


def burn_cpu() -> str:
    """Spin on the CPU for up to a minute."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pass
    return "spun"


def allocate(mib: int) -> str:
    """Hold ``mib`` MiB of memory."""
    block = bytearray(mib * 1024 * 1024)
    return f"held {len(block) // (1024 * 1024)} MiB"


def open_many(count: int) -> str:
    """Open /dev/null ``count`` times at once."""
    files = [open(os.devnull) for _ in range(count)]  # noqa: SIM115 (held open on purpose)
    for file in files:
        file.close()
    return f"opened {count}"


def fork_many(count: int) -> str:
    """Start up to ``count`` processes and never reap them (a fork bomb, bounded): each
    ends at once but stays a zombie, counted against the user, until this process ends."""
    for _ in range(count):
        if os.fork() == 0:
            os._exit(0)
    return f"forked {count}"


def connect(port: int) -> str:
    """Connect to 127.0.0.1:``port``."""
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        return "connected"


# Root is exempt from the process limit: the fork bomb runs as nobody when the tests run as root.
_FORK_USER = "nobody" if os.geteuid() == 0 else None

cpu_limited = tool(burn_cpu, timeout=60, isolation="subprocess", limits=ToolLimits(cpu_seconds=1))
memory_limited = tool(allocate, timeout=30, isolation="subprocess", limits=ToolLimits(address_space_mib=256))
files_limited = tool(open_many, timeout=30, isolation="subprocess", limits=ToolLimits(open_files=32))
processes_limited = tool(
    fork_many, timeout=30, isolation="subprocess", limits=ToolLimits(processes=8, user=_FORK_USER)
)
offline = tool(connect, name="offline", timeout=30, isolation="subprocess", limits=ToolLimits(network=False))
online = tool(connect, name="online", timeout=30, isolation="subprocess")
