"""Watchers: cursors over a job's log that deliver batches at a bounded rate.

A watcher is not a queue. It holds a cursor and reads from the log when its
consumer asks for the next batch, so its memory stays constant however slowly
the consumer reads, and the job never waits for it.

Delivery follows PROTOCOL.md: a batch as soon as the consumer is idle and an
entry exists, then at most one per ``batch_ms`` while entries keep coming;
``from_seq`` is the previous ``to_seq + 1``; the terminal status ends the watch.

The leading edge: a watcher whose previous batch was cut at least ``batch_ms`` ago cuts
the next one the moment an entry is there. While entries keep coming faster than that,
batches are cut on slots ``batch_ms`` apart, on a grid that every watcher of a job shares
(its phase comes from the job id, so jobs spread over the interval): after a batch cut at
time t (or for slot t), an entry that comes before t + ``batch_ms`` waits for the first
slot at least ``batch_ms`` after t. Watchers of a job that keep up therefore read the same
range at the same moment: the log merges it once and the frame is encoded once for all
of them. A batch cut for a slot counts at the slot's time, so an event loop that runs a
little late does not push the grid back; one that runs more than a quarter interval late
(an overloaded process) skips slots, which sheds frames where the load is.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from backstream.actors.joblog import JobLog, merge_events, summarize_events
from backstream.actors.ports import StoredLogs
from backstream.protocol.errors import BadRequestError, GoneError
from backstream.protocol.events import Batch, LogEvent, StatusEvent, ToolCallDeltaEvent
from backstream.protocol.lifecycle import is_terminal
from backstream.protocol.offsets import stale_epoch_error
from backstream.protocol.records import JobRecord

__all__ = ["LiveSource", "LogSource", "StoredSource", "Vouching", "Watcher", "check_kept", "follow_epoch"]


class LogSource(Protocol):
    @property
    def epoch(self) -> int:
        """The epoch of the entries ``read`` returns (it grows when a job is recovered)."""
        ...

    async def read(
        self, after_seq: int, *, max_events: int, max_chars: int, merge_text: bool = True
    ) -> tuple[LogEvent, ...]:
        """Entries after ``after_seq``, text merged unless ``merge_text`` is false; maybe none.

        Cancellation: nothing is consumed; the cursor is the caller's.
        """
        ...

    async def wait_beyond(self, seq: int) -> None:
        """Return once an entry after ``seq`` may exist. Raises ``GoneError`` if the log is gone.

        Cancellation: safe; nothing is consumed.
        """
        ...

    async def kept_through(self, epoch: int) -> int | None:
        """The last ``seq`` of an earlier ``epoch`` than the log's that the log kept; None
        if the job's record does not say. Cancellation: safe (a read)."""
        ...

    def close(self) -> None:
        """The watch ended: release what the source holds (e.g. a remote tail). Idempotent."""
        ...


class LiveSource:
    """The log of a job running in this process: read straight from memory."""

    def __init__(self, log: JobLog) -> None:
        self._log = log

    @property
    def epoch(self) -> int:
        return self._log.epoch

    async def read(
        self, after_seq: int, *, max_events: int, max_chars: int, merge_text: bool = True
    ) -> tuple[LogEvent, ...]:
        """Cancellation: nothing is consumed; the cursor is the caller's."""
        # The watcher has already waited; only honour a pending cancellation here.
        await trio.lowlevel.checkpoint_if_cancelled()
        log = self._log
        if log.terminal is not None and after_seq >= log.last_seq:
            # The job ended before the cursor: nothing will ever come.
            raise BadRequestError(f"after_seq {after_seq} is beyond the job's last seq {log.last_seq}")
        if not merge_text:
            return tuple(log.entries(after_seq, after_seq + max_events))
        return log.read(after_seq, max_events=max_events, max_chars=max_chars)

    async def wait_beyond(self, seq: int) -> None:
        """Cancellation: safe; nothing is consumed."""
        await self._log.wait_beyond(seq)

    async def kept_through(self, epoch: int) -> int | None:
        """A live log keeps its epoch: never asked. Cancellation: safe."""
        await trio.lowlevel.checkpoint()
        return None

    def close(self) -> None:
        pass


class StoredSource:
    """The log of a finished job, or one running in another process: read from the store
    (the runtime reads a running one through a shared ``remote_tail.TailedSource``).

    A log that cannot continue from the cursor surfaces as ``GoneError``, never as a
    gap or a wait that returns at once forever: the job is gone, its record says more
    than its log holds (a store restored from an older snapshot), or it was recovered
    at a new epoch before the cursor. A cursor past the end of a finished job is a
    ``BadRequestError``. ``durable_seq``: the record's ``seq`` as the watch opened (a
    cursor beyond it is checked as ``check_kept`` says before anything after it is read).
    """

    def __init__(self, store: StoredLogs, job_id: str, epoch: int = 1, *, durable_seq: int = 0) -> None:
        self._store = store
        self._job_id = job_id
        self.epoch = epoch
        self.vouched = durable_seq
        """A cursor up to here stands: the store held its entry, at ``epoch``'s time."""

    async def read(
        self, after_seq: int, *, max_events: int, max_chars: int, merge_text: bool = True
    ) -> tuple[LogEvent, ...]:
        """Cancellation: nothing is consumed; the cursor is the caller's."""
        entries = await self._store.read(self._job_id, after_seq, max_events)
        if not entries:
            await self._check_continues(after_seq)
            return ()
        last = entries[-1]
        if after_seq > self.vouched or (isinstance(last, StatusEvent) and last.is_terminal):
            # Read after the entries, the record names the epoch that wrote them.
            await follow_epoch(self, self._store, await self._store.get_job(self._job_id), after_seq)
        self.vouched = max(self.vouched, last.seq)
        if not merge_text:
            return tuple(entries)
        return merge_events(entries, max_events=max_events, max_chars=max_chars)

    async def _check_continues(self, after_seq: int) -> None:
        """Nothing after ``after_seq``: fine if the job may still write it, else gone."""
        gone = GoneError("the job's log is no longer kept; load the result with job.get")
        record = await self._store.get_job(self._job_id)
        if record is None:
            raise gone
        if record.seq > after_seq:  # the record is ahead: read again, after it
            if not await self._store.read(self._job_id, after_seq, 1):
                raise GoneError("the job's stored log is behind its record; load the result with job.get")
        elif record.epoch != self.epoch:
            # Taken over: what this source read came from the store, so it stands if the
            # log still holds the entry at the cursor (a continuation keeps the log).
            if after_seq <= self.vouched and not await _still_holds(self._store, self._job_id, after_seq):
                raise gone  # the store lost what the cursor read
            await follow_epoch(self, self._store, record, after_seq)
        elif is_terminal(record.status):
            # The job ended before the cursor: nothing will ever come.
            raise BadRequestError(f"after_seq {after_seq} is beyond the job's last seq {record.seq}")

    async def wait_beyond(self, seq: int) -> None:
        """Cancellation: safe; nothing is consumed."""
        await self._store.wait_for_entries(self._job_id, seq)

    async def kept_through(self, epoch: int) -> int | None:
        """Cancellation: safe (a read)."""
        record = await self._store.get_job(self._job_id)
        return None if record is None else record.kept_through(epoch)

    def close(self) -> None:
        pass


class Vouching(Protocol):
    """A source's view of its log: the epoch it reads, and how far a cursor stands."""

    epoch: int
    vouched: int
    """A cursor up to here stands: the store held its entry, at ``epoch``'s time."""


async def follow_epoch(source: Vouching, store: StoredLogs, record: JobRecord | None, after_seq: int) -> None:
    """Take the log's epoch from ``record`` (read after the entries it labels); a cursor the
    store never vouched for must have been kept by its epoch (``check_kept``)."""
    if record is None:
        if after_seq > source.vouched:
            raise GoneError("the job's log is no longer kept; load the result with job.get")
        return
    if after_seq > source.vouched:
        if record.epoch != source.epoch:
            await check_kept(store, record, source.epoch, after_seq)
        source.vouched = after_seq
    source.epoch = record.epoch


async def check_kept(store: StoredLogs, record: JobRecord, epoch: int, cursor: int) -> None:
    """A reader's ``cursor`` of ``epoch`` that the store never held at that epoch (it read
    ahead, on the instance that then died) meets the log of a later epoch (``record``, read
    after what it met): it goes on if the log kept the cursor's entry as ``epoch`` wrote it.
    Else ``GoneError`` with ``valid_through`` (the kept ``seq``), ``content_length`` and
    ``epoch``, as a reader coming back after the takeover gets; without ``valid_through``
    when the record does not say what ``epoch`` kept. Cancellation: safe (reads)."""
    kept = record.kept_through(epoch)
    if kept is None:
        raise stale_epoch_error(record.epoch, None)
    if cursor > kept:
        content, _ = summarize_events(await store.read(record.job_id, 0, kept) if kept else ())
        raise stale_epoch_error(record.epoch, kept, content_length=len(content))


async def _still_holds(store: StoredLogs, job_id: str, seq: int) -> bool:
    """Whether the job's stored log still holds its entry ``seq`` (trivially, seq 0)."""
    if seq <= 0:
        return True
    entries = await store.read(job_id, seq - 1, 1)
    return bool(entries) and entries[0].seq == seq


class Watcher:
    """An async iterator of ``Batch``. Use through ``Runtime.watch``.

    ``__anext__`` waits for entries, then for the batch interval; cancelling it
    loses nothing (the cursor moves only when a batch is returned). Ends after
    the batch that holds the terminal status.

    ``tool_call_deltas`` false (the wire protocol's default) leaves out the opt-in
    ``tool_call_delta`` entries: a batch then ends at its last event, and the fragments
    it skips are covered by the next batch, which holds the call they belong to.
    ``merge_text`` false keeps every text entry as it is in the log.

    Beside the paced iteration, ``read`` and ``wait_beyond`` read the same log unpaced
    over a cursor of the caller's (a replay, or a long poll); ``skip_to`` then moves the
    watcher's own cursor past what the caller read that way.
    """

    def __init__(
        self,
        job_id: str,
        epoch: int,
        source: LogSource,
        *,
        after_seq: int,
        batch_seconds: float,
        max_batch_events: int,
        max_batch_chars: int,
        ended: bool = False,
        tool_call_deltas: bool = True,
        merge_text: bool = True,
        sleep_until: Callable[[float], Awaitable[None]] = trio.sleep_until,
        kept_through: int | None = None,
    ) -> None:
        self.job_id = job_id
        self.epoch = epoch
        self.kept_through = kept_through
        """Set when the reader came with a cursor of an earlier epoch: the last ``seq`` of
        that epoch the log kept (what the reader saw beyond it was lost)."""
        self.cursor = after_seq
        self._source = source
        self._batch_seconds = batch_seconds
        self._max_events = max_batch_events
        self._max_chars = max_batch_chars
        self._last_cut = -float("inf")  # the time (or slot) of the previous batch
        self._next_batch_at = -float("inf")  # the first slot at least batch_seconds after it
        # The job's slot grid: times phase + k * batch_seconds, the same for all its watchers.
        self._phase = (zlib.crc32(job_id.encode()) % 1024) / 1024 * batch_seconds
        self.ended = ended
        self._tool_call_deltas = tool_call_deltas
        self._merge_text = merge_text
        self._sleep_until = sleep_until  # the runtime's Metronome: one timer per slot, not per watcher

    def __aiter__(self) -> Watcher:
        return self

    async def read(self, after_seq: int, *, limit: int | None = None) -> tuple[LogEvent, ...]:
        """The entries after ``after_seq`` that are there now, at once (no wait, no pacing):
        at most ``limit`` (and the watcher's batch bounds), text merged as the watcher merges
        it, ``tool_call_delta`` entries included whatever the watcher's setting; empty when
        none are there yet (then ``wait_beyond``). Leaves the watcher's cursor alone.

        Raises ``GoneError`` when the log cannot continue from ``after_seq``, and
        ``BadRequestError`` for a cursor at or beyond the end of a finished job.
        Cancellation: nothing is consumed."""
        events = await self._source.read(
            after_seq,
            max_events=min(limit or self._max_events, self._max_events),
            max_chars=self._max_chars,
            merge_text=self._merge_text,
        )
        self.epoch = self._source.epoch
        return events

    async def wait_beyond(self, seq: int) -> None:
        """Return once an entry after ``seq`` may exist. Raises ``GoneError`` if the log is gone.

        Cancellation: safe; nothing is consumed."""
        await self._source.wait_beyond(seq)

    async def kept_through_of(self, epoch: int) -> int | None:
        """The last ``seq`` of an earlier ``epoch`` that the log kept (None: not known).
        Cancellation: safe (a read)."""
        return await self._source.kept_through(epoch)

    def close(self) -> None:
        """The watch ended: its source releases what it holds. Idempotent."""
        self._source.close()

    def skip_to(self, seq: int, *, ended: bool) -> None:
        """Move the cursor to ``seq``: the caller has read the entries up to it with ``read``
        (``ended``: they held the terminal status, so the iteration is over)."""
        self.cursor = seq
        self.ended = self.ended or ended

    def _next_slot(self, cut_at: float) -> float:
        """The first slot of the job's grid at least ``batch_seconds`` after ``cut_at``."""
        if self._batch_seconds <= 0:
            return cut_at
        slots = (cut_at + self._batch_seconds - self._phase) / self._batch_seconds
        # 1e-7: float error in the sum, not lateness
        return self._phase + math.ceil(slots - 1e-7) * self._batch_seconds

    async def __anext__(self) -> Batch:
        if self.ended:
            raise StopAsyncIteration
        read_to = self.cursor  # entries up to here were read and held nothing to send
        while True:
            await self._source.wait_beyond(read_to)
            # At most one batch per interval: what arrives meanwhile joins this batch. A
            # watcher idle for an interval cuts at once (the leading edge), else on the grid.
            cut_at = trio.current_time()
            if cut_at < self._last_cut + self._batch_seconds:
                await self._sleep_until(self._next_batch_at)
                # The slot, if the loop woke us at most a quarter interval late; later than
                # that the process is overloaded, and the next batch skips a slot: fewer,
                # larger batches for the same entries.
                cut_at = max(self._next_batch_at, trio.current_time() - self._batch_seconds / 4)

            events = await self._source.read(
                read_to,
                max_events=self._max_events,
                max_chars=self._max_chars,
                merge_text=self._merge_text,
            )
            if events and not self._tool_call_deltas:
                read_to = events[-1].seq
                events = tuple(ev for ev in events if not isinstance(ev, ToolCallDeltaEvent))
            if events:
                break
        self.epoch = self._source.epoch
        batch = Batch(
            job_id=self.job_id,
            epoch=self.epoch,
            from_seq=self.cursor + 1,
            to_seq=events[-1].seq,
            events=events,
        )
        self.cursor = batch.to_seq
        self._last_cut = cut_at
        self._next_batch_at = self._next_slot(cut_at)
        last = events[-1]
        if isinstance(last, StatusEvent) and last.is_terminal:
            self.ended = True
        return batch
