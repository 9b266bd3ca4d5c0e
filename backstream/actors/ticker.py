"""The flush ticker: one timer for all jobs instead of one per job.

Every ``flush_ms`` it wakes the flushers of the jobs that have new entries;
a job also flushes by itself every ``flush_events`` entries.
"""

from __future__ import annotations

import trio

from backstream.actors.config import Config
from backstream.actors.job import JobActor
from backstream.actors.supervisor import Supervisor

__all__ = ["FlushTicker"]


class FlushTicker:
    def __init__(self, config: Config, jobs: Supervisor[JobActor]) -> None:
        self._interval = config.flush_seconds
        self._jobs = jobs

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Tick until cancelled. Cancellation: stops at once; nothing is pending."""
        task_status.started()
        while True:
            await trio.sleep(self._interval)
            for actor in self._jobs.addresses():
                if actor.has_unflushed:
                    actor.request_flush()
