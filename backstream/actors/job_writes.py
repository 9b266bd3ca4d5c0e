"""A job's writes to the store: what of its log is durable, and the loop that writes it.

The job actor appends to its log in memory; ``JobWrites`` writes the new entries in batches
(every ``flush_events`` entries or when the registry's ticker asks, every ``flush_ms``),
retries a failed write with backoff, and knows how far the store has the log
(``flushed_seq``) and whether the terminal status is stored (``closed_in_store``).

With a store that announces entries before they are durable (``announces_uncommitted``:
Redis), a flush commits only every ``commit_ms`` (or at ``flush_events`` entries, a change
of status, the end); the flushes between only announce the entries after the last commit
to the instances that follow the job. Their watchers get each entry as soon as they would
with a commit per flush, and the store runs a fifth of the commits (at the defaults).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from backstream.actors.clock import WallClock
from backstream.actors.config import Config
from backstream.actors.joblog import JobLog
from backstream.actors.ports import JobEndedElsewhereError, JobWriter, LogBehindError
from backstream.protocol.backoff import Backoff
from backstream.protocol.events import ErrorInfo, JobStatus, TextEvent
from backstream.protocol.records import JobProgress

__all__ = ["STORE_FAILED", "JobWrites"]

log = logging.getLogger("backstream.job")

STORE_FAILED = ErrorInfo("unavailable", "the job store failed for longer than store_outage_limit")
"""Why a job fails whose writes failed for ``store_outage_limit``."""


class JobWrites:
    """The writes of one job's ``log``. ``progress(seq)`` is the job's progress up to
    ``seq``; ``ended_elsewhere`` is called when the store holds the job as ended or taken
    over by another instance (the work must stop); ``give_up`` when writes failed for
    ``store_outage_limit``."""

    def __init__(
        self,
        job_id: str,
        log_: JobLog,
        *,
        store: JobWriter,
        config: Config,
        clock: WallClock,
        progress: Callable[[int], JobProgress],
        ended_elsewhere: Callable[[], None],
        give_up: Callable[[], None],
    ) -> None:
        self._job_id = job_id
        self._log = log_
        self._store = store
        self._config = config
        self._clock = clock
        self._progress = progress
        self._ended_elsewhere = ended_elsewhere
        self._give_up = give_up
        self.flushed_seq = log_.last_seq  # a rebuilt log's entries are in the store already
        self._flushed_content_length = log_.content_length
        self._flushed_status: JobStatus | None = None
        self.closed_in_store = False
        """The terminal status is written durably."""
        self._lock = trio.Lock()
        self._due = trio.Event()
        self._failing_since: float | None = None  # trio time of the first failed write
        self._committed_at = -float("inf")  # trio time the last commit that landed began
        self._ended_elsewhere_seen = False
        self._announced_seq = self.flushed_seq

    @property
    def has_unflushed(self) -> bool:
        return self._log.last_seq > self.flushed_seq

    def request(self) -> None:
        """Ask the loop to write what is new."""
        self._due.set()

    def appended(self) -> None:
        """Entries were appended: ask for a write once ``flush_events`` wait."""
        if self._log.last_seq - self.flushed_seq >= self._config.flush_events:
            self._due.set()

    async def loop(self) -> None:
        """Write new entries when asked, until the log ends.

        A failed write is retried with backoff; the log keeps growing in memory (bounded
        by ``max_output_chars``) and local watchers keep reading it. Failing for longer
        than ``store_outage_limit`` calls ``give_up``.
        """
        backoff = Backoff(0.1, 2.0, jitter="none")
        while self._log.terminal is None:
            # Woken by the registry's ticker every flush_ms if there is something new, or at
            # flush_events entries: no timer of its own per job.
            await self._due.wait()
            self._due = trio.Event()
            if self._log.terminal is not None:
                return  # the final write happens in the actor's cleanup
            if not await self.flush_round(backoff):
                self._give_up()
                return
            if self._failing_since is not None:
                self._due.set()  # the write failed: try again (after the backoff it slept)

    async def flush_round(self, backoff: Backoff) -> bool:
        """What one request of the ticker does: announce what is new, or commit (after a
        failure, sleeping by ``backoff``). False once writes have failed for
        ``store_outage_limit``. Cancellation: as ``flush`` (an announcement: sent or not)."""
        if self._announce_only():
            await self._announce()
            return True
        return await self._try_flush(backoff)

    def _announce_only(self) -> bool:
        """Whether this flush only announces: the store announces, the last commit is
        younger than ``commit_ms``, and nothing needs a commit now (a status to store,
        ``flush_events`` entries waiting, a failed write to retry)."""
        if not self._store.announces_uncommitted or self._failing_since is not None:
            return False
        if self._log.status != self._flushed_status:
            return False
        if self._log.last_seq - self.flushed_seq >= self._config.flush_events:
            return False
        # Flushes come on the ticker's grid: due at the flush nearest commit_ms after the
        # last commit began, not at the one after it.
        due_after = self._config.commit_seconds - self._config.flush_seconds / 2
        return trio.current_time() - self._committed_at < due_after

    async def _announce(self) -> None:
        """Announce the entries after the last commit (each announcement carries all of
        them, so a follower that joined since needs none before). Nothing when nothing
        is new since the last announcement. A failed announcement is let go: the next
        commit carries the entries. Cancellation: sent or not."""
        last = self._log.last_seq
        if last <= self._announced_seq:
            return
        try:
            await self._store.announce_entries(self._job_id, self._log.entries(self.flushed_seq, last))
        except Exception as exc:
            log.debug("job %s: announcement failed (%s); the next commit carries it", self._job_id, exc)
            return
        self._announced_seq = last

    async def _try_flush(self, backoff: Backoff) -> bool:
        """One write; after a failure, sleep by ``backoff``. False once writes have failed
        for ``store_outage_limit``."""
        try:
            await self.flush()
        except Exception as exc:
            now = trio.current_time()
            if self._failing_since is None:
                self._failing_since = now
            failing_for = now - self._failing_since
            if failing_for >= self._config.store_outage_limit:
                log.error("job %s: the store failed for %gs (%s)", self._job_id, failing_for, exc)
                return False
            delay = backoff.next_delay()
            log.warning("job %s: write failed (%s); retrying in %.1fs", self._job_id, exc, delay)
            await trio.sleep(delay)
        else:
            self._failing_since = None
            backoff.reset()
        return True

    async def write_end(self) -> None:
        """Write the terminal status, retrying through an outage of up to
        ``store_outage_limit`` (counted from the first failed write). Cancellation (shutdown):
        stops retrying; the actor's cleanup makes one last bounded attempt."""
        backoff = Backoff(0.1, 2.0, jitter="none")
        while not self.closed_in_store:
            if not await self._try_flush(backoff):
                return

    async def write_through(self) -> bool:
        """Write everything appended so far, retrying through an outage as ``write_end``
        does; False if the store failed for ``store_outage_limit``. (A job ended elsewhere
        meanwhile is stopped through ``ended_elsewhere``.)"""
        backoff = Backoff(0.1, 2.0, jitter="none")
        while self.has_unflushed and not self.closed_in_store:
            if not await self._try_flush(backoff):
                return False
        return True

    async def flush(self) -> None:
        """Write what is new. If the store's log is behind what this job wrote (Redis back
        from an older snapshot), write again from where the store's log ends."""
        async with self._lock:
            for _ in range(2):
                if self._ended_elsewhere_seen:
                    return  # another owner writes the job now: this writer never writes again
                last = self._log.last_seq
                status = self._log.status
                if last == self.flushed_seq and status == self._flushed_status:
                    return
                entries = self._log.entries(self.flushed_seq, last)
                progress = self._progress(last)
                began = trio.current_time()
                try:
                    await self._store.commit(self._job_id, entries, progress)
                except JobEndedElsewhereError:
                    # Another instance ended it (its lease lapsed): that ending stands. Stop
                    # the work and write nothing more.
                    log.warning("job %s: ended elsewhere while running here; stopping", self._job_id)
                    self._ended_elsewhere_seen = True
                    self.closed_in_store = True
                    self.flushed_seq, self._flushed_status = last, status
                    self._ended_elsewhere()
                    return
                except LogBehindError as behind:
                    log.warning("job %s: %s; writing again from there", self._job_id, behind)
                    self.flushed_seq = min(self.flushed_seq, behind.stored_seq)
                    self._flushed_content_length = sum(  # rare: only after a store lost writes
                        len(e.text)
                        for e in self._log.entries(0, self.flushed_seq)
                        if isinstance(e, TextEvent)
                    )
                    self._flushed_status = None
                    continue
                self.flushed_seq = last
                self._announced_seq = max(self._announced_seq, last)
                self._committed_at = began
                self._flushed_content_length = progress.content_length
                self._flushed_status = status
                if progress.finished_at is not None:
                    self.closed_in_store = True
                return

    async def record_crash(self) -> None:
        """The last resort when the final write failed: the terminal status alone, at the
        last durable seq (the entries after it are lost)."""
        now = self._clock.now()
        progress = JobProgress(
            status="failed",
            seq=self.flushed_seq,
            content_length=self._flushed_content_length,
            updated_at=now,
            finished_at=now,
            error=ErrorInfo("internal", "the job failed on an internal error"),
            expires_at=now + self._config.retention,
        )
        try:
            await self._store.commit(self._job_id, (), progress)
        except Exception:
            log.exception("job %s: could not record its failure in the store", self._job_id)
