"""Who watches which job in this process: the watch presence the store holds and the keeper
renews.

A watch counts as presence (no "unwatched" notification for its job) from the moment it
opens until it closes. The store holds one presence per job and process, whatever the
number of its watches here: the first watch of a job to open records it, the last to
close withdraws it, and the keeper renews one per job watched. So a job that a thousand
viewers watch through one instance costs the store one presence, not a thousand. A watch
that delivered the terminal status marks it (``saw_end``) when the last watch of its job
here closes: the job counts as watched when it ended even if the presence is gone before
the notification check runs.

The opens and closes of one job's watches take turns (a lock per job while it has
watches or callers), so a withdrawal and a new record never cross in the store.
"""

from __future__ import annotations

import attrs
import trio

from backstream.actors.ports import Inbox

__all__ = ["PresenceStatistics", "WatchPresence"]


@attrs.frozen
class PresenceStatistics:
    watches: int
    jobs_watched: int


@attrs.define
class _Watched:
    """One job's watches here: how many are open, whether the store holds their presence
    (as far as this process's last write of it says), whether one delivered the end, and
    the turn their writes take."""

    count: int = 0
    recorded: bool = False
    saw_end: bool = False
    turn: trio.Lock = attrs.field(factory=trio.Lock)
    callers: int = 0
    """Opens and closes under way (the entry stays while any is)."""


class WatchPresence:
    """The open watches of this process, counted per job; the store's presence of each
    job watched here is held under ``presence_id`` (the instance's id)."""

    def __init__(self, store: Inbox, presence_id: str) -> None:
        self._store = store
        self._presence_id = presence_id
        self._jobs: dict[str, _Watched] = {}

    async def open(self, job_id: str, until: float) -> None:
        """Count a watch of ``job_id``; the first one here records the presence in the
        store (until ``until`` unless renewed). Raises what the store raises (then nothing
        is counted). Cancellation: nothing is counted; the store may hold a presence,
        which lapses at ``until``."""
        watched = self._enter(job_id)
        try:
            async with watched.turn:
                if not watched.recorded:
                    await self._store.watch_started(job_id, self._presence_id, until)
                    watched.recorded = True
                watched.count += 1
        finally:
            self._leave(job_id, watched)

    async def close(self, job_id: str, *, saw_end: bool) -> None:
        """Uncount a watch of ``job_id`` (``saw_end``: it delivered the terminal status);
        the last one here withdraws the presence. Raises what the store raises (the
        presence then lapses by itself: nobody renews it). Cancellation: the watch is
        uncounted at once; the presence may stay in the store until it lapses."""
        watched = self._enter(job_id)
        watched.count -= 1
        watched.saw_end = watched.saw_end or saw_end
        try:
            if watched.count > 0:
                await trio.lowlevel.checkpoint()
                return
            async with watched.turn:
                if watched.count == 0 and watched.recorded:
                    saw, watched.saw_end = watched.saw_end, False
                    watched.recorded = False
                    await self._store.watch_ended(job_id, self._presence_id, saw_end=saw)
        finally:
            self._leave(job_id, watched)

    def _enter(self, job_id: str) -> _Watched:
        watched = self._jobs.setdefault(job_id, _Watched())
        watched.callers += 1
        return watched

    def _leave(self, job_id: str, watched: _Watched) -> None:
        watched.callers -= 1
        if watched.callers == 0 and watched.count <= 0:
            self._jobs.pop(job_id, None)

    def count(self, job_id: str) -> int:
        """How many watches of ``job_id`` are open here."""
        watched = self._jobs.get(job_id)
        return max(watched.count, 0) if watched is not None else 0

    def snapshot(self) -> tuple[tuple[str, str], ...]:
        """The store's presence of every job watched here, ``(job_id, presence_id)``, as
        the keeper renews them."""
        return tuple((job_id, self._presence_id) for job_id, w in self._jobs.items() if w.count > 0)

    def statistics(self) -> PresenceStatistics:
        counts = [w.count for w in self._jobs.values() if w.count > 0]
        return PresenceStatistics(watches=sum(counts), jobs_watched=len(counts))
