"""The metronome: one timer for the many watchers that sleep until their next batch slot.

A thousand watchers cutting batches every 50 ms wake 20,000 times a second. Through
``trio.sleep_until`` each wake-up is a deadline of its own, and its expiry raises and
catches ``Cancelled`` in the sleeping task. Here sleepers park on the tick of their
wake-up time (times rounded up to ``resolution``), and one task wakes each tick's
sleepers together: a timer per distinct tick, a park and an unpark per sleeper. The
watchers of a job share their slots (see ``watcher``), so they share ticks too.
"""

from __future__ import annotations

import heapq
import math

import attrs
import trio

__all__ = ["Metronome", "MetronomeStatistics"]


@attrs.frozen
class MetronomeStatistics:
    ticks: int
    """Future ticks with a parking lot."""
    sleepers: int
    """Tasks parked on them."""


class Metronome:
    """Run with ``run`` (a system child); watchers call ``sleep_until``.

    Bounded: one parking lot per distinct future tick, so at most ``horizon /
    resolution`` of them for sleepers that look at most ``horizon`` seconds ahead
    (watchers: one batch interval).
    """

    def __init__(self, resolution: float = 0.001) -> None:
        self._resolution = resolution
        self._lots: dict[int, trio.lowlevel.ParkingLot] = {}
        self._ticks: list[int] = []  # a heap of the keys of _lots
        self._timer: trio.CancelScope | None = None  # run()'s sleep, while it runs

    async def sleep_until(self, when: float) -> None:
        """Return at ``when`` or at most one ``resolution`` later; earlier only if the
        metronome stops meanwhile. Without a running metronome, trio's own timer.

        Cancellation: returns nothing and loses nothing; the tick stays for its others.
        """
        timer = self._timer
        if timer is None:
            await trio.sleep_until(when)
            return
        tick = math.ceil(when / self._resolution)
        lot = self._lots.get(tick)
        if lot is None:
            if tick * self._resolution <= trio.current_time():
                await trio.lowlevel.checkpoint()
                return
            lot = self._lots[tick] = trio.lowlevel.ParkingLot()
            heapq.heappush(self._ticks, tick)
            if self._ticks[0] == tick:  # earlier than what run() sleeps until
                timer.deadline = tick * self._resolution
        await lot.park()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Wake each tick's sleepers at its time, until cancelled.

        Cancellation: wakes every sleeper (early) and stops; later sleeps take trio's timer.
        """
        try:
            started = False
            while True:
                with trio.CancelScope() as timer:
                    self._timer = timer
                    timer.deadline = self._ticks[0] * self._resolution if self._ticks else math.inf
                    if not started:
                        started = True
                        task_status.started()
                    await trio.sleep_forever()
                now = trio.current_time()
                while self._ticks and self._ticks[0] * self._resolution <= now:
                    self._lots.pop(heapq.heappop(self._ticks)).unpark_all()
        finally:
            self._timer = None
            for lot in self._lots.values():
                lot.unpark_all()
            self._lots.clear()
            self._ticks.clear()

    def statistics(self) -> MetronomeStatistics:
        """A snapshot of what waits."""
        return MetronomeStatistics(
            ticks=len(self._ticks),
            sleepers=sum(lot.statistics().tasks_waiting for lot in self._lots.values()),
        )
