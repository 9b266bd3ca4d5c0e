"""Wall-clock time that moves with trio's clock, and RFC 3339 formatting.

Timestamps (``created_at``, retention) need wall time; timers need trio's
clock. Deriving one from the other keeps them consistent, and lets tests on
``MockClock`` drive retention as well as timeouts.
"""

from __future__ import annotations

import time

import trio

from backstream.protocol.records import format_time

__all__ = ["WallClock", "format_time"]


class WallClock:
    """Wall time anchored when created, advanced by ``trio.current_time()``. ``offset``
    (seconds) is added to the machine's time: a machine whose clock is that far off."""

    def __init__(self, offset: float = 0.0) -> None:
        self._wall_anchor = time.time() + offset
        self._trio_anchor = trio.current_time()

    def now(self) -> float:
        """Seconds since the epoch."""
        return self._wall_anchor + (trio.current_time() - self._trio_anchor)
