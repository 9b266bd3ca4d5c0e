"""Wall-clock time that moves with trio's clock, and RFC 3339 formatting.

Timestamps (``created_at``, retention) need wall time; timers need trio's
clock. Deriving one from the other keeps them consistent, and lets tests on
``MockClock`` drive retention as well as timeouts.
"""

from __future__ import annotations

import datetime as _dt
import time

import trio

__all__ = ["WallClock", "format_time"]


class WallClock:
    """Wall time anchored when created, advanced by ``trio.current_time()``."""

    def __init__(self) -> None:
        self._wall_anchor = time.time()
        self._trio_anchor = trio.current_time()

    def now(self) -> float:
        """Seconds since the epoch."""
        return self._wall_anchor + (trio.current_time() - self._trio_anchor)


def format_time(ts: float | None) -> str | None:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-21T10:00:00.123Z``."""
    if ts is None:
        return None
    moment = _dt.datetime.fromtimestamp(ts, tz=_dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
