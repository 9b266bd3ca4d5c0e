"""Keep-alive pings for every WebSocket connection of a front door, from one task.

A task per connection sleeping between pings held about 3 KB a connection (the task, its
coroutine frames, a cancel scope per sleep): 30 MB for 10,000 idle connections. One
``Heartbeat`` keeps every connection's next deadline in a heap and sleeps until the earliest:

- ``interval`` after a connection was added, or after its last pong, it is pinged (the ping
  goes out in a short-lived task: a socket that does not take it holds nothing else up);
- ``timeout`` after a ping with no pong since, the connection is closed (1000, "no pong
  within the idle timeout");
- at each ping, a connection that sent no data frame since the previous one drops its
  permessage-deflate compressor (``ServerWebSocket.release_idle_compressor``).

An entry made stale by a pong or a removal stays in the heap until its time comes (a
pong's deadline outlives the pong by up to ``timeout``), so the heap holds at most
``timeout / interval + 1`` entries per connection: 4 tuples (about 300 bytes) at the
defaults.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
from collections.abc import Callable

import trio
from trio_websocket import ConnectionClosed

from backstream.runtime.server.websocket import ServerWebSocket

__all__ = ["Beat", "Heartbeat"]

log = logging.getLogger("backstream.frontdoor")


class Beat:
    """One connection's place in the heartbeat."""

    __slots__ = ("close_soon", "generation", "ping_sent_at", "removed", "ws")

    def __init__(self, ws: ServerWebSocket, close_soon: Callable[[int, str], None]) -> None:
        self.ws = ws
        self.close_soon = close_soon
        self.generation = 0  # entries of an older generation are stale
        self.ping_sent_at: float | None = None  # a ping not answered yet
        self.removed = False


class Heartbeat:
    """Run with ``await nursery.start(heartbeat.run)``; then ``add`` each connection once its
    handshake is accepted and ``remove`` it when it ends."""

    def __init__(self, interval: float, timeout: float) -> None:
        self._interval = interval
        self._timeout = timeout
        self._heap: list[tuple[float, int, Beat, int]] = []
        self._order = itertools.count()
        self._sleep: trio.CancelScope | None = None
        self._pings: trio.Nursery | None = None

    def __len__(self) -> int:
        """Entries in the heap (stale ones included)."""
        return len(self._heap)

    def add(self, ws: ServerWebSocket, close_soon: Callable[[int, str], None]) -> Beat:
        beat = Beat(ws, close_soon)
        ws.on_pong = lambda: self._answered(beat)
        self._schedule(beat, trio.current_time() + self._interval)
        return beat

    def remove(self, beat: Beat) -> None:
        beat.removed = True
        beat.ws.on_pong = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ping and expire connections until cancelled. Cancellation: pings under way stop."""
        async with trio.open_nursery() as pings:
            self._pings = pings
            task_status.started()
            while True:
                now = trio.current_time()
                while self._heap and self._heap[0][0] <= now:
                    _, _, beat, generation = heapq.heappop(self._heap)
                    if beat.generation == generation and not beat.removed:
                        self._due(beat, now)
                with trio.CancelScope(deadline=self._heap[0][0] if self._heap else math.inf) as sleep:
                    self._sleep = sleep
                    await trio.sleep_forever()
                self._sleep = None

    def _schedule(self, beat: Beat, when: float) -> None:
        beat.generation += 1
        heapq.heappush(self._heap, (when, next(self._order), beat, beat.generation))
        if self._sleep is not None and when < self._sleep.deadline:
            self._sleep.deadline = when  # wake the runner earlier

    def _answered(self, beat: Beat) -> None:
        """A pong came: the next ping is due an interval from now."""
        if beat.removed:
            return
        beat.ping_sent_at = None
        self._schedule(beat, trio.current_time() + self._interval)

    def _due(self, beat: Beat, now: float) -> None:
        if beat.ping_sent_at is not None:  # the deadline of a ping with no pong
            beat.close_soon(1000, "no pong within the idle timeout")
            self.remove(beat)
            return
        beat.ws.release_idle_compressor()
        beat.ping_sent_at = now
        self._schedule(beat, now + self._timeout)
        assert self._pings is not None
        self._pings.start_soon(self._ping, beat)

    async def _ping(self, beat: Beat) -> None:
        # A ping that does not go out in time leaves its pong's deadline to close the connection.
        with trio.move_on_after(self._timeout), contextlib.suppress(ConnectionClosed):
            try:
                await beat.ws.send_ping()
            except ConnectionClosed:
                raise
            except Exception:  # the connection's fault or ours: it alone ends, never the front door
                log.exception("a keep-alive ping failed: closing its connection")
                beat.close_soon(1011, "internal error")
