"""Remote tails: the watchers of one job running on another instance share one reader here.

A job running elsewhere is read from the store. Without sharing, each watcher of it
would wait and read on its own: three watchers of one job, three times the reads. A
``RemoteTail`` is the one reader of a job per instance, held while any watcher of it is
open here (``RemoteTails.open``): it follows the job's commits once (``follow_job``: one
subscription however many watch, whose announcements carry the entries where the
store sends them), waits for them once (the first waiter waits in the store; the
others wait for it), reads a range it did not get that way once, and keeps the newest
entries in a window that every watcher reads from (``TailedSource``, a ``LogSource``).

A writer may announce entries before they are durable (``LogStore.announce_entries``): the window
then runs ahead of the store, and the tail knows how far the log is durable
(``durable``, as announced or read). A takeover keeps the old epoch's durable entries
only: once the tail learns of a later epoch, it drops the entries after them, and a
watcher whose cursor went past what the store held is checked against what its epoch
kept (``follow_epoch``), as an ahead cursor is. An announcement of an earlier epoch (a
writer since taken over) is ignored.

Bounded: a tail keeps its newest ``TAIL_WINDOW`` entries. The window is not a mailbox
per watcher: a watcher holds only its cursor, and one that falls behind the window (a
slow consumer, or a replay from the start) reads its range from the store itself,
counted in ``reads_behind_total``, until it catches up with the window; nothing is
dropped and the job never waits for it. Reads within one round (between two returns
of the shared wait) are read once: a watcher that finds nothing new waits for the next
round instead of asking the store again.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import attrs
import trio

from backstream.actors.joblog import merge_events
from backstream.actors.ports import StoredLogs
from backstream.actors.watcher import follow_epoch
from backstream.protocol.errors import BadRequestError, GoneError
from backstream.protocol.events import LogEvent, StatusEvent
from backstream.protocol.lifecycle import is_terminal
from backstream.protocol.records import JobRecord

__all__ = ["TAIL_WINDOW", "RemoteTail", "RemoteTails", "RemoteTailsStatistics", "TailedSource"]

TAIL_WINDOW = 1024
"""Entries a tail keeps (its newest); a watcher behind them reads from the store."""
_FETCH = TAIL_WINDOW
"""Entries one read of the store brings into the window at most."""


@attrs.frozen
class RemoteTailsStatistics:
    tails: int
    """Jobs of other instances followed here (one subscription and one reader each)."""
    watchers: int
    """Watchers reading through a tail."""
    log_reads_total: int
    """Reads of a job's log into its window (one per commit announced, per job)."""
    record_reads_total: int
    waits_total: int
    """Waits in the store (one at a time per job, shared by its watchers)."""
    reads_behind_total: int
    """Reads of a watcher behind its tail's window, straight from the store."""
    announced_total: int
    """Commits whose entries came with their announcement (no read)."""


@attrs.define
class _Counters:
    log_reads: int = 0
    record_reads: int = 0
    waits: int = 0
    reads_behind: int = 0
    announced: int = 0


class RemoteTail:
    """One job's shared reader (see the module's docstring). Use through ``RemoteTails``."""

    def __init__(self, store: StoredLogs, job_id: str, counters: _Counters) -> None:
        self.job_id = job_id
        self.store = store
        self.watchers = 0
        self.follow: AbstractContextManager[None] = nullcontext()
        self._counters = counters
        self._entries: list[LogEvent] = []
        self._base: int | None = None
        """The window holds every entry after ``_base`` up to ``last_seq`` (None: empty)."""
        self._round = 0
        """Counts the returns of the shared wait: what was read in a round is not read again."""
        self._fetched_round = -1
        self._record: tuple[int, JobRecord | None] | None = None
        self._lock = trio.Lock()
        self._wait_done: trio.Event | None = None
        self.epoch = 0
        """The latest epoch an announcement or a read named (0: none yet)."""
        self.durable = 0
        """The store holds the log through here (in ``epoch``), as announced or read."""

    @property
    def last_seq(self) -> int | None:
        if self._base is None:
            return None
        return self._entries[-1].seq if self._entries else self._base

    def _slice(self, after_seq: int, limit: int) -> list[LogEvent]:
        start = bisect.bisect_right(self._entries, after_seq, key=lambda event: event.seq)
        return self._entries[start : start + limit]

    def _holds_after(self, after_seq: int) -> bool:
        last = self.last_seq
        return self._base is not None and last is not None and self._base <= after_seq < last

    def _behind(self, after_seq: int) -> bool:
        """Whether ``after_seq`` is before the window: its next entries are not in it."""
        return self._base is not None and after_seq < self._base

    async def store_holds(self, seq: int) -> bool:
        """Whether the store's log still holds entry ``seq`` (trivially, seq 0): read from
        the store, not the window. Cancellation: safe (a read)."""
        if seq <= 0:
            return True
        entries = await self.store.read(self.job_id, seq - 1, 1)
        return bool(entries) and entries[0].seq == seq

    async def read(self, after_seq: int, limit: int) -> list[LogEvent]:
        """Up to ``limit`` entries after ``after_seq``: from the window, else read once per
        round into it (or, for a cursor behind the window, from the store). Empty when
        nothing came this round. Cancellation: nothing is consumed."""
        if self._holds_after(after_seq):
            await trio.lowlevel.checkpoint()
            return self._slice(after_seq, limit)
        if not self._behind(after_seq):
            async with self._lock:
                # Checked again: while this reader waited for the lock, another one's read
                # may have moved the window past this cursor (a cursor ahead moves it).
                if self._holds_after(after_seq):
                    return self._slice(after_seq, limit)
                if not self._behind(after_seq):
                    return await self._fetch(after_seq, limit)
        self._counters.reads_behind += 1
        return await self.store.read(self.job_id, after_seq, limit)

    async def _fetch(self, after_seq: int, limit: int) -> list[LogEvent]:
        """``read`` at or past the window's end (the lock held): what the store has after
        ``after_seq``, kept in the window."""
        if after_seq == self.last_seq and self._fetched_round == self._round:
            return []  # read already this round: nothing new since
        fetched = await self.store.read(self.job_id, after_seq, _FETCH)
        self._counters.log_reads += 1
        self._fetched_round = self._round
        if fetched:
            # Read before their announcement came (or without one): the record, read
            # after them, names the epoch that wrote them (a takeover precedes its writes).
            record = await self.store.get_job(self.job_id)
            self._counters.record_reads += 1
            self._record = (self._round, record)
            if record is not None:
                self._learn_epoch(record.epoch)
                if record.epoch == self.epoch:
                    self.durable = max(self.durable, fetched[-1].seq)
        self._keep(after_seq, fetched)
        if self._behind(after_seq):  # announcements meanwhile outgrew the window
            return fetched[:limit]
        return self._slice(after_seq, limit)

    def announced(self, entries: Sequence[LogEvent], epoch: int = 0, durable: int = 0) -> None:
        """An announcement: its entries (maybe none; every one after ``durable``, the seq
        the store holds the log through), and its writer's epoch. Those after the window's
        end are kept if the window reaches their first (else the next read brings them);
        an earlier epoch's are ignored. Never blocks."""
        if epoch and epoch < self.epoch:
            return  # its writer was taken over: the new epoch may not keep them
        if epoch:
            self._learn_epoch(epoch)
        self.durable = max(self.durable, durable)
        last = self.last_seq
        if last is not None and entries and entries[0].seq <= last + 1 <= entries[-1].seq:
            self._keep(last, [event for event in entries if event.seq > last])
            self._counters.announced += 1

    def _learn_epoch(self, epoch: int) -> None:
        """A later epoch wrote: the window keeps what the earlier one made durable (which a
        takeover keeps), not what was only announced."""
        if epoch <= self.epoch:
            return
        if self.epoch and self._base is not None:
            if self._base > self.durable:
                self._entries, self._base = [], None
            else:
                self._entries = [event for event in self._entries if event.seq <= self.durable]
        self.epoch = epoch

    def _keep(self, start: int, fetched: list[LogEvent]) -> None:
        """Add what a read after ``start`` found; drop the oldest past ``TAIL_WINDOW``."""
        last = self.last_seq
        if self._base is None or last is None or not self._base <= start <= last:
            self._entries, self._base = list(fetched), start  # a cursor ahead: the window moves
        else:  # what an announcement brought meanwhile is not kept twice
            self._entries.extend(event for event in fetched if event.seq > last)
        if len(self._entries) > 2 * TAIL_WINDOW:  # trimmed in steps: amortized
            self._base = self._entries[-TAIL_WINDOW - 1].seq
            del self._entries[:-TAIL_WINDOW]

    async def record(self, *, fresh: bool = False) -> JobRecord | None:
        """The job's record, read once per round (``fresh``: read now, as the round's).
        Cancellation: nothing changes."""
        async with self._lock:
            if not fresh and self._record is not None and self._record[0] == self._round:
                return self._record[1]
            record = await self.store.get_job(self.job_id)
            self._counters.record_reads += 1
            self._record = (self._round, record)
            if record is not None:
                self._learn_epoch(record.epoch)
            return record

    def refresh(self) -> None:
        """The record says more than this round read: the next read asks the store."""
        self._round += 1

    async def wait_beyond(self, seq: int) -> None:
        """Return once an entry after ``seq`` may exist: at once if the window has one,
        else when the shared wait in the store returns (the first waiter waits in the
        store, the others for it). Cancellation: safe; a cancelled first waiter ends the
        round early, and the others read again."""
        last = self.last_seq
        if last is not None and last > seq:
            await trio.lowlevel.checkpoint()
            return
        done = self._wait_done
        if done is not None:
            await done.wait()
            return
        done = self._wait_done = trio.Event()
        try:
            self._counters.waits += 1
            await self.store.wait_for_entries(self.job_id, seq)
        finally:
            self._round += 1
            self._wait_done = None
            done.set()


class TailedSource:
    """A watcher's ``LogSource`` over a ``RemoteTail``: its own epoch, the tail's reads.
    A log that cannot continue from the cursor is a ``GoneError``, a cursor past the end
    of a finished job a ``BadRequestError``, as for ``StoredSource``; so is a cursor beyond
    ``durable_seq`` (the record's ``seq`` as the watch opened) that a takeover lost
    (``watcher.check_kept``)."""

    def __init__(self, tails: RemoteTails, tail: RemoteTail, epoch: int, durable_seq: int = 0) -> None:
        self._tails = tails
        self._tail: RemoteTail | None = tail
        self.epoch = epoch
        self.vouched = durable_seq
        """A cursor up to here stands: the store held its entry, at ``epoch``'s time."""
        self.delivered = durable_seq
        """This source's reads reached here in ``epoch`` (as announced, maybe not durable):
        a cursor up to here needs no look at the record until a later epoch shows up."""

    @property
    def tail(self) -> RemoteTail:
        if self._tail is None:
            raise RuntimeError("the source is closed")
        return self._tail

    async def read(
        self, after_seq: int, *, max_events: int, max_chars: int, merge_text: bool = True
    ) -> tuple[LogEvent, ...]:
        """Cancellation: nothing is consumed; the cursor is the caller's."""
        tail = self.tail
        entries = await tail.read(after_seq, max_events)
        if not entries:
            entries = await self._check_continues(tail, after_seq, max_events)
            if not entries:
                return ()
        if after_seq > self.vouched and (after_seq > self.delivered or tail.epoch != self.epoch):
            # A cursor the store may never have held (given by the client, or read as
            # announced before a takeover): the record, read after these entries, says
            # whether the epoch that wrote them kept it.
            known = tail.epoch
            await follow_epoch(self, tail.store, await tail.record(fresh=True), after_seq)
            if tail.epoch != known:  # the record named a later epoch: read what it kept
                entries = await tail.read(after_seq, max_events)
                if not entries:
                    return ()
        # Announced by a later epoch's writer: the job was taken over. The cursor stands (the
        # store held it, or the record said the old epoch kept it), and every entry read now
        # is either one the log kept of the old epoch or the new one's.
        self.epoch = max(self.epoch, tail.epoch)
        last = entries[-1]
        if isinstance(last, StatusEvent) and last.is_terminal:
            record = await tail.record()  # a recovered job has a new epoch
            if record is not None:
                self.epoch = record.epoch
        if tail.epoch == self.epoch:
            self.vouched = max(self.vouched, min(last.seq, tail.durable))
        self.delivered = max(self.delivered, last.seq)
        if not merge_text:
            return tuple(entries)
        return merge_events(entries, max_events=max_events, max_chars=max_chars)

    async def _check_continues(self, tail: RemoteTail, after_seq: int, limit: int) -> list[LogEvent]:
        """Nothing after ``after_seq`` this round: fine if the job may still write it, the
        entries if the record is ahead (read again), else gone or past the end."""
        gone = GoneError("the job's log is no longer kept; load the result with job.get")
        record = await tail.record()
        if record is None:
            raise gone
        if record.seq > after_seq:
            tail.refresh()
            entries = await tail.read(after_seq, limit)
            if not entries:
                raise GoneError("the job's stored log is behind its record; load the result with job.get")
            return entries
        if record.epoch != self.epoch:
            # Taken over: what this source read came from the store, so it stands if the
            # log still holds the entry at the cursor (a continuation keeps the log).
            if after_seq <= self.vouched and not await tail.store_holds(after_seq):
                raise gone  # the store lost what the cursor read
            await follow_epoch(self, tail.store, record, after_seq)
        if is_terminal(record.status):
            raise BadRequestError(f"after_seq {after_seq} is beyond the job's last seq {record.seq}")
        return []

    async def wait_beyond(self, seq: int) -> None:
        """Cancellation: safe; nothing is consumed."""
        await self.tail.wait_beyond(seq)

    async def kept_through(self, epoch: int) -> int | None:
        """Cancellation: safe (a read)."""
        record = await self.tail.record(fresh=True)
        return None if record is None else record.kept_through(epoch)

    def close(self) -> None:
        """Stop reading through the tail (the last watcher's close drops it). Idempotent."""
        tail, self._tail = self._tail, None
        if tail is not None:
            self._tails.release(tail)


class RemoteTails:
    """This instance's tails, one per job of another instance that is watched here.
    Bounded by the watchers open here (a tail lives while one of them reads through it)."""

    def __init__(self, store: StoredLogs) -> None:
        self._store = store
        self._tails: dict[str, RemoteTail] = {}
        self._counters = _Counters()

    def open(self, job_id: str, epoch: int, durable_seq: int = 0) -> TailedSource:
        """A source for one watcher of ``job_id`` (its record's ``epoch`` and ``seq``, as the
        watch opens); ``close`` it when the watch ends."""
        tail = self._tails.get(job_id)
        if tail is None:
            tail = RemoteTail(self._store, job_id, self._counters)
            tail.follow = self._store.follow_job(job_id, tail.announced)
            tail.follow.__enter__()
            self._tails[job_id] = tail
        tail.watchers += 1
        return TailedSource(self, tail, epoch, durable_seq)

    def release(self, tail: RemoteTail) -> None:
        tail.watchers -= 1
        if tail.watchers == 0 and self._tails.get(tail.job_id) is tail:
            del self._tails[tail.job_id]
            tail.follow.__exit__(None, None, None)

    def statistics(self) -> RemoteTailsStatistics:
        counters = self._counters
        return RemoteTailsStatistics(
            tails=len(self._tails),
            watchers=sum(tail.watchers for tail in self._tails.values()),
            log_reads_total=counters.log_reads,
            record_reads_total=counters.record_reads,
            waits_total=counters.waits,
            reads_behind_total=counters.reads_behind,
            announced_total=counters.announced,
        )
