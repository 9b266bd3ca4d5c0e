"""Who watches which job in this process: the watch presence the keeper renews.

A watch counts as presence (no "unwatched" notification for its job) from the
moment it opens until it closes. Shared stores also need to hear that it is
still alive, so the keeper renews this process's watches with its leases.
The runtime opens and closes watches; the keeper reads snapshots.
"""

from __future__ import annotations

from collections import Counter

import attrs

__all__ = ["PresenceStatistics", "WatchPresence"]


@attrs.frozen
class PresenceStatistics:
    watches: int
    jobs_watched: int


class WatchPresence:
    """The open watches of this process, by watch id."""

    def __init__(self) -> None:
        self._job_of: dict[str, str] = {}  # watch_id -> job_id
        self._per_job: Counter[str] = Counter()

    def opened(self, watch_id: str, job_id: str) -> None:
        self._job_of[watch_id] = job_id
        self._per_job[job_id] += 1

    def closed(self, watch_id: str) -> None:
        job_id = self._job_of.pop(watch_id, None)
        if job_id is None:
            return
        self._per_job[job_id] -= 1
        if self._per_job[job_id] <= 0:
            del self._per_job[job_id]

    def count(self, job_id: str) -> int:
        """How many watches of ``job_id`` are open here."""
        return self._per_job.get(job_id, 0)

    def snapshot(self) -> tuple[tuple[str, str], ...]:
        """Every open ``(job_id, watch_id)``, as the keeper renews them."""
        return tuple((job_id, watch_id) for watch_id, job_id in self._job_of.items())

    def statistics(self) -> PresenceStatistics:
        return PresenceStatistics(watches=len(self._job_of), jobs_watched=len(self._per_job))
