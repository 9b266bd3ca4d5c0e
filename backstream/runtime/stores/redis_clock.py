"""``RedisFrame``: leases on Redis's clock, whatever the machines' clocks say.

A lease's end and the check whether it lapsed are computed inside the scripts from
``redis.call('TIME')`` (Redis 7 replicates a script's effects, so ``TIME`` is allowed),
never from the caller's wall clock: two instances whose clocks disagree by any amount
agree on when a lease lapses.

What the caller's times still say is *how far ahead* a moment is: a script gets
``ahead(t)``, the seconds by which the caller's time ``t`` lies past the caller's
present, and uses ``TIME + ahead(t)``. The caller's present is measured on the local
monotonic clock from an anchor (the first time the caller told the store its ``now``):
``ahead(t) = (t - now0) - (monotonic() - m0)``. The runtime's clock runs with the
monotonic clock (``WallClock``), so in production ``ahead(now)`` is about 0 (less the
time since the caller read its clock) and ``ahead(now + ttl)`` about ``ttl``; a caller
whose clock runs faster than real time (trio's ``MockClock`` in tests, or the synthetic
times of the store conformance tests) moves the store's view of time by as much.
"""

from __future__ import annotations

import time

__all__ = ["RedisFrame"]


class RedisFrame:
    """One per store: the anchor between the caller's clock and the local monotonic clock."""

    def __init__(self) -> None:
        self._anchor: tuple[float, float] | None = None

    def anchor(self, now: float) -> None:
        """The caller's present is ``now`` (kept from the first call only: later ones
        measure how far the caller's clock ran ahead of real time)."""
        if self._anchor is None:
            self._anchor = (now, time.monotonic())

    def ahead(self, at: float) -> str:
        """How far (seconds, a script argument) the caller's time ``at`` lies past its
        present. Before any anchor the machine's clock stands in for the caller's."""
        if self._anchor is None:
            return repr(at - time.time())
        now0, m0 = self._anchor
        return repr((at - now0) - (time.monotonic() - m0))

    def at(self, now: float) -> str:
        """``ahead(now)``, anchoring on ``now`` first: for calls that carry the caller's now."""
        self.anchor(now)
        return self.ahead(now)
