"""Wake-ups between the tasks of one process, and waiting through a store's outage.

``SignalHub``: every store wakes its local waiters (``wait_for_entries``, aborts,
decisions, the outbox) through one hub. A single-process store signals it when it
writes; a shared store also from its subscriber, for what other instances wrote.
A waiter listens *before* it reads the state it waits on, so a signal sent between
the read and the wait is never lost. A doorbell (``ring``) is a signal kept for its
one waiter (the outbox's dispatcher) until it next waits.

``through_outage``: the one loop that asks a store again, with the shared
``Backoff``, while it raises ``UnavailableError`` (and never once it is closed).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import attrs
import trio

from backstream.protocol.backoff import Backoff
from backstream.protocol.errors import UnavailableError

__all__ = [
    "MAX_LISTENERS",
    "OUTBOX_BELL",
    "OVERFLOW_POLL_S",
    "Listener",
    "SignalHub",
    "SignalHubStatistics",
    "StoreClosedError",
    "Topic",
    "outage_backoff",
    "through_outage",
]

log = logging.getLogger("backstream.signals")

T = TypeVar("T")

Topic = tuple[str, str]
"""``(kind, name)``: e.g. ``("entries", job_id)``, ``("abort", job_id)``,
``("decision", f"{job_id} {call_id}")``."""

MAX_LISTENERS = 100_000
"""Listeners held at once. Past it, a new listener is not registered: its wait sleeps
``OVERFLOW_POLL_S`` (its caller reads again), so a flood of waiters degrades to polling
instead of growing without bound."""
OVERFLOW_POLL_S = 1.0
OUTBOX_BELL = "outbox"
"""Rung when this process wrote an outbox entry (a terminal commit)."""


class StoreClosedError(UnavailableError):
    """The store was closed (``aclose``): unlike an outage, waiting will not help."""


@attrs.frozen
class SignalHubStatistics:
    topics: int
    listeners: int
    overflowed_total: int
    """Listeners that found the hub full and polled instead."""


class Listener:
    """One registration on a topic, made by ``SignalHub.listen``."""

    def __init__(self, hub: SignalHub, event: trio.Event | None) -> None:
        self._hub = hub
        self._event = event

    @property
    def signalled(self) -> bool:
        return self._event is not None and self._event.is_set()

    async def wait(self, timeout: float = math.inf) -> None:
        """Return once signalled (perhaps already) or after ``timeout``. Close: raises
        ``StoreClosedError``. Cancellation: safe; nothing is consumed."""
        self._hub.raise_if_closed()
        if self._event is None:  # the hub was full: poll
            await trio.sleep(min(timeout, OVERFLOW_POLL_S))
        else:
            with trio.move_on_after(timeout):
                await self._event.wait()
        self._hub.raise_if_closed()


class SignalHub:
    """Per-topic wake-ups within one process. Bounded by ``max_listeners`` (see
    ``MAX_LISTENERS``); a signal with nobody listening is dropped (the state it announces
    is in the store, read by the next waiter before it listens)."""

    def __init__(self, max_listeners: int = MAX_LISTENERS) -> None:
        self._topics: dict[Topic, set[trio.Event]] = {}
        self._listeners = 0
        self._max_listeners = max_listeners
        self._overflowed_total = 0
        self._closed = False
        self._bells: dict[str, trio.Event] = {}

    def ring(self, bell: str) -> None:
        """Ring a doorbell (e.g. ``"outbox"``): its one waiter wakes, now or at its next
        ``wait_bell`` (a ring is kept until then, unlike a topic's signal)."""
        self._bells.setdefault(bell, trio.Event()).set()

    async def wait_bell(self, bell: str, timeout: float = math.inf) -> None:
        """Return once the bell rang since the last return (perhaps already), or after
        ``timeout``; consumes the ring. Close: raises ``StoreClosedError``.
        Cancellation: safe; a ring is not consumed."""
        self.raise_if_closed()
        event = self._bells.setdefault(bell, trio.Event())
        with trio.move_on_after(timeout):
            await event.wait()
        self.raise_if_closed()
        if event.is_set() and self._bells.get(bell) is event:
            del self._bells[bell]

    @contextmanager
    def listen(self, topic: Topic) -> Iterator[Listener]:
        """Register for ``topic`` for the block; read the state, then ``wait``."""
        if self._listeners >= self._max_listeners:
            self._overflowed_total += 1
            yield Listener(self, None)
            return
        event = trio.Event()
        if self._closed:
            event.set()
        self._topics.setdefault(topic, set()).add(event)
        self._listeners += 1
        try:
            yield Listener(self, event)
        finally:
            self._listeners -= 1
            events = self._topics.get(topic)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._topics[topic]

    async def wait(self, topic: Topic, timeout: float = math.inf) -> None:
        """Listen and wait at once, for a waiter whose check runs without an await before it.
        Cancellation: safe."""
        with self.listen(topic) as listener:
            await listener.wait(timeout)

    def signal(self, topic: Topic) -> None:
        """Wake every listener of ``topic`` (never blocks)."""
        for event in self._topics.get(topic, ()):
            event.set()

    def signal_job(self, job_id: str) -> None:
        """Wake the readers of a job's log (new entries, its end, or its deletion)."""
        self.signal(("entries", job_id))

    def signal_all(self) -> None:
        """Wake everyone (e.g. after a shared store's subscriber reconnects): they read again."""
        for events in self._topics.values():
            for event in events:
                event.set()

    def close(self) -> None:
        """Wake every listener with ``StoreClosedError``, now and from now on."""
        self._closed = True
        self.signal_all()
        for event in self._bells.values():
            event.set()

    @property
    def closed(self) -> bool:
        return self._closed

    def raise_if_closed(self) -> None:
        if self._closed:
            raise StoreClosedError("the store is closed")

    def waiting(self, kind: str) -> int:
        """Listeners on topics of ``kind``."""
        return sum(len(events) for topic, events in self._topics.items() if topic[0] == kind)

    def statistics(self) -> SignalHubStatistics:
        return SignalHubStatistics(
            topics=len(self._topics), listeners=self._listeners, overflowed_total=self._overflowed_total
        )


def outage_backoff() -> Backoff:
    """The schedule of every wait that meets an outage: 0.1 s, doubling, at most 5 s."""
    return Backoff(0.1, 5.0)


async def through_outage(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    *,
    backoff: Backoff | None = None,
    on_retry: Callable[[UnavailableError], None] | None = None,
    level: int = logging.DEBUG,
) -> T:
    """``await attempt()`` until it does not raise ``UnavailableError``, sleeping by
    ``backoff`` (``outage_backoff()`` if not given) between tries; ``StoreClosedError``
    and every other error pass through. ``on_retry`` counts the retries.
    Cancellation: stops at once (during an attempt or a sleep)."""
    backoff = backoff or outage_backoff()
    while True:
        try:
            return await attempt()
        except StoreClosedError:
            raise
        except UnavailableError as exc:
            if on_retry is not None:
                on_retry(exc)
            delay = backoff.next_delay()
            log.log(level, "%s: %s; retrying in %.1fs", what, exc, delay)
            await trio.sleep(delay)
