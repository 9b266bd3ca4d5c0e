"""Where durable streams live: the interface every store implements, the in-process wake-ups of
readers waiting for a change, and the memory store.

A stream's key is its owner and its name (``stream_key``): one user's streams cannot be named by
another. A store offers three things: the state of a key, an atomic ``update`` that applies a
pure decision (``protocol/streams_state.py``) to it, and reads of messages by position.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

import attrs
import trio

from backstream.protocol.streams_state import Message, StreamState

__all__ = [
    "Change",
    "MemoryStreamStore",
    "StreamChanges",
    "StreamStore",
    "StreamUsage",
    "Watch",
    "owner_of",
    "stream_key",
]

T = TypeVar("T")
_SEPARATOR = "\x1f"


def stream_key(owner: str, name: str) -> str:
    return f"{owner}{_SEPARATOR}{name}"


def owner_of(key: str) -> str:
    return key.partition(_SEPARATOR)[0]


@attrs.frozen
class Change(Generic[T]):
    """What ``update`` writes: a new state (None: the state stays), messages to add after the
    stream's last, and ``fresh`` to drop every old message first (a stream created anew at a
    key whose old stream expired); or ``delete`` the stream and its messages."""

    result: T
    state: StreamState | None = None
    messages: tuple[Message, ...] = ()
    fresh: bool = False
    delete: bool = False


@attrs.frozen
class StreamUsage:
    streams: int
    bytes: int


class StreamStore(Protocol):
    changes: StreamChanges

    async def get(self, key: str) -> StreamState | None:
        """The stored state, expired or soft-deleted ones included; None if there is none."""
        ...

    async def update(self, key: str, decide: Callable[[StreamState | None], Change[T]]) -> Change[T]:
        """Apply ``decide`` to the key's current state atomically (it may run more than once:
        it must be pure) and write what it returns; wakes the key's watchers if it wrote."""
        ...

    async def read(self, key: str, after: int, up_to: int, max_bytes: int) -> list[Message]:
        """The key's messages ending after ``after`` and at most at ``up_to``, in order; at least
        one if there is one, then no more than ``max_bytes`` in all."""
        ...

    async def usage(self, owner: str) -> StreamUsage:
        """The owner's streams and their stored bytes, on every instance sharing the store."""
        ...

    async def expired_keys(self, now: float, limit: int) -> list[str]:
        """Up to ``limit`` keys of streams expired by ``now`` and not yet soft-deleted (maybe
        a few more that are not, or no longer: the caller checks each)."""
        ...


class Watch:
    """Waits for changes of one key: ``arm`` before reading, ``wait`` after (a change between
    the two is not missed)."""

    def __init__(self, changes: StreamChanges, key: str) -> None:
        self._changes = changes
        self._key = key
        self._event = changes.event(key)

    def arm(self) -> None:
        self._event = self._changes.event(self._key)

    async def wait(self) -> None:
        """Until a change of the key here, or (on a store shared by instances) the next poll.
        Cancellation: stops waiting."""
        poll = self._changes.poll_interval
        if poll is None:
            await self._event.wait()
            return
        with trio.move_on_after(poll):
            await self._event.wait()


@attrs.define
class _Watched:
    event: trio.Event
    watchers: int = 0
    interest: contextlib.ExitStack = attrs.Factory(contextlib.ExitStack)


class StreamChanges:
    """Per-key wake-ups inside this process; an entry exists only while someone watches."""

    def __init__(
        self,
        *,
        poll_interval: float | None = None,
        interest: Callable[[str], contextlib.AbstractContextManager[None]] | None = None,
    ) -> None:
        self._watched: dict[str, _Watched] = {}
        self.poll_interval = poll_interval
        """Waiters look again this often (a store shared by instances: a wake-up from
        another instance may be missed while its subscription is being made)."""
        self._interest = interest
        """Entered while a key is watched here: e.g. a subscription to its changes."""

    def event(self, key: str) -> trio.Event:
        return self._watched[key].event

    @contextlib.contextmanager
    def watch(self, key: str) -> Iterator[Watch]:
        entry = self._watched.get(key)
        if entry is None:
            entry = self._watched[key] = _Watched(trio.Event())
            if self._interest is not None:
                entry.interest.enter_context(self._interest(key))
        entry.watchers += 1
        try:
            yield Watch(self, key)
        finally:
            entry.watchers -= 1
            if entry.watchers <= 0 and self._watched.get(key) is entry:
                del self._watched[key]
                entry.interest.close()

    def notify(self, key: str) -> None:
        entry = self._watched.get(key)
        if entry is not None:
            entry.event.set()
            entry.event = trio.Event()

    @property
    def watched(self) -> int:
        return len(self._watched)


class MemoryStreamStore:
    """Streams in this process's memory: gone when it ends."""

    def __init__(self) -> None:
        self.changes = StreamChanges()
        self._states: dict[str, StreamState] = {}
        self._messages: dict[str, list[Message]] = {}
        self._ends: dict[str, list[int]] = {}
        self._usage: dict[str, list[int]] = {}

    async def get(self, key: str) -> StreamState | None:
        await trio.lowlevel.checkpoint()
        return self._states.get(key)

    async def update(self, key: str, decide: Callable[[StreamState | None], Change[T]]) -> Change[T]:
        await trio.lowlevel.checkpoint()
        old = self._states.get(key)
        change = decide(old)  # no checkpoint from here on: atomic
        if change.delete:
            self._states.pop(key, None)
            self._messages.pop(key, None)
            self._ends.pop(key, None)
        elif change.state is not None or change.messages:
            if change.fresh:
                self._messages[key], self._ends[key] = [], []
            if change.state is not None:
                self._states[key] = change.state
            messages = self._messages.setdefault(key, [])
            ends = self._ends.setdefault(key, [])
            for message in change.messages:
                messages.append(message)
                ends.append(message[0])
        else:
            return change
        self._account(key, old, None if change.delete else self._states.get(key))
        self.changes.notify(key)
        return change

    def _account(self, key: str, old: StreamState | None, new: StreamState | None) -> None:
        usage = self._usage.setdefault(owner_of(key), [0, 0])
        usage[0] += (new is not None) - (old is not None)
        usage[1] += (new.stored_bytes if new else 0) - (old.stored_bytes if old else 0)

    async def read(self, key: str, after: int, up_to: int, max_bytes: int) -> list[Message]:
        await trio.lowlevel.checkpoint()
        messages, ends = self._messages.get(key, []), self._ends.get(key, [])
        out: list[Message] = []
        size = 0
        for index in range(bisect.bisect_right(ends, after), len(messages)):
            end, data = messages[index]
            if end > up_to or (out and size + len(data) > max_bytes):
                break
            out.append((end, data))
            size += len(data)
        return out

    async def expired_keys(self, now: float, limit: int) -> list[str]:
        await trio.lowlevel.checkpoint()
        found = []
        for key, state in self._states.items():
            if state.expired(now) and not state.soft_deleted:
                found.append(key)
                if len(found) >= limit:
                    break
        return found

    async def usage(self, owner: str) -> StreamUsage:
        await trio.lowlevel.checkpoint()
        streams, stored = self._usage.get(owner, [0, 0])
        return StreamUsage(streams, stored)
