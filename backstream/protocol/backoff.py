"""Exponential backoff with jitter, as plain values: the one schedule every retry loop uses.

Sans-IO: it says how long to wait, the caller sleeps. ``Backoff`` is a small
state machine (``next_delay`` after a failure, ``reset`` after a success), so a
loop that retries forever and a loop that gives up after N attempts share it.
"""

from __future__ import annotations

import random
from typing import Literal

import attrs

__all__ = ["Backoff"]

# Seeding a Random reads the OS's entropy: one generator for every Backoff that is not
# given its own (a job makes several).
_SHARED_RANDOM = random.Random()


@attrs.define
class Backoff:
    """Delays ``base``, ``2*base``, ``4*base``, ... capped at ``cap`` seconds.

    ``jitter``: ``"full"`` draws uniformly from ``[0, delay]`` (AWS's "full jitter",
    for many clients reconnecting at once); ``"equal"`` from ``[delay/2, 3*delay/2]``
    (never retries at once, for a single client); ``"none"`` is deterministic.
    """

    base: float
    cap: float
    jitter: Literal["full", "equal", "none"] = "equal"
    attempt: int = 0
    _random: random.Random = attrs.field(default=_SHARED_RANDOM, repr=False)

    def next_delay(self, *, at_least: float | None = None) -> float:
        """The wait before the next attempt, and count this failure. ``at_least`` (e.g. a
        server's Retry-After) replaces the computed delay; the cap holds either way."""
        self.attempt += 1
        if at_least is not None:
            return min(max(at_least, 0.0), self.cap)
        delay: float = min(self.cap, self.base * 2.0 ** (self.attempt - 1))
        if self.jitter == "full":
            delay = self._random.uniform(0.0, delay)
        elif self.jitter == "equal":
            delay = min(self.cap, delay * (0.5 + self._random.random()))
        return delay

    def reset(self) -> None:
        """After a success: the next failure waits ``base`` again."""
        self.attempt = 0
