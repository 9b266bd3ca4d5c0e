"""Tools used by the tests (importable, so that subprocess isolation and --tools can load them)."""

from __future__ import annotations

import time
from typing import Literal

import attrs
import trio

from backstream.runtime.tools.registry import tool


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
