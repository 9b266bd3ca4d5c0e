"""The replay-then-follow driver every front door streams a job through.

``open_replay`` opens a watch of the job for a client at a ``StreamOffset`` and yields a
``Replay``: an async iterator of the items a ``Projection`` (``protocol.projections``) makes
of the log. A projection that numbers its own items replays the log from its first entry,
unpaced (what the log holds, read at once), then follows it paced like any watch (one batch
per ``batch_ms``, shared with the job's other watchers); the items the client has are
skipped. The offset's epoch fences the stream: a job recovered at another epoch since the
client read is ``GoneError``, the same for every front door.

The path of a resume: the client's offset (``"<epoch>_<seq>"``, or a bare number) is parsed
in ``protocol.offsets``; here ``runtime.watch`` is opened at the projection's start ``seq``
with the offset's epoch (``gone`` if it differs); batches go through the projection, which
drops items numbered at or below the offset; the front door encodes and sends the rest
through its session's gate, each item's offset being ``replay.offset_of(number)``.

``read`` and ``wait_beyond`` expose the same log unpaced for a long poll: what is there now
after a ``seq``, and a wait for more.

Memory: one batch at a time, however slow the client; the job never waits for a reader.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

from backstream.actors.watcher import Watcher
from backstream.protocol.events import Batch, LogEvent, StatusEvent, ToolCallDeltaEvent
from backstream.protocol.offsets import StreamOffset, stale_epoch_error
from backstream.protocol.projections import Projection
from backstream.runtime.api import Runtime

__all__ = ["Replay", "open_replay"]

ItemT = TypeVar("ItemT")


@asynccontextmanager
async def open_replay(
    runtime: Runtime,
    job_id: str,
    projection: Projection[ItemT],
    *,
    user: str,
    offset: StreamOffset,
    max_batch_chars: int | None = None,
) -> AsyncIterator[Replay[ItemT]]:
    """Stream ``job_id`` through ``projection`` for a client at ``offset``.

    Raises ``NotFoundError`` (also for another user's job), ``GoneError`` when the offset's
    epoch is not the log's, ``BadRequestError`` for a start beyond the end of a finished job.
    Cancellation: the watch closes; the job goes on.
    """
    start_seq = projection.begin(offset.seq)
    async with runtime.watch(
        job_id,
        user=user,
        after_seq=start_seq,
        epoch=offset.epoch,
        max_batch_chars=max_batch_chars,
        tool_call_deltas=projection.tool_call_deltas,
        merge_text=projection.merge_text,
    ) as watcher:
        if watcher.kept_through is not None and projection.replays_unpaced:
            await _check_kept_items(watcher, projection.fresh(), offset.seq, watcher.kept_through)
        yield Replay(watcher, projection, offset.seq)


async def _check_kept_items(watcher: Watcher, counter: Projection[ItemT], after: int, kept: int) -> None:
    """A client of an epoch before a takeover (its log ``seq`` is unknown): every item up
    to ``after`` must be made of the entries the log kept of that epoch (through ``kept``).
    Counts them by projecting those entries, a read at a time. Raises ``GoneError`` naming
    the last item that stands if not."""
    counter.begin(-1)
    seq = 0
    while seq < kept:
        events = await watcher.read(seq, limit=kept - seq)
        if not events:
            break
        counter.project(Batch(watcher.job_id, watcher.epoch, seq + 1, events[-1].seq, events))
        seq = events[-1].seq
    if counter.next_number <= after:
        raise stale_epoch_error(watcher.epoch, counter.next_number - 1)


class Replay(Generic[ItemT]):
    """An async iterator of item lists (maybe empty: a batch that added nothing beyond the
    offset). Ends after the batch holding the terminal status. Use through ``open_replay``."""

    def __init__(self, watcher: Watcher, projection: Projection[ItemT], after: int) -> None:
        self._watcher = watcher
        self._projection = projection
        self._after = after
        self._epoch = watcher.epoch
        """The epoch of the batches projected so far."""
        self._unchecked: Batch | None = None
        """A batch of a later epoch read but not yet checked (the check was cancelled)."""
        self._replaying = projection.replays_unpaced
        self.last_batch: Batch | None = None
        """The batch the latest items came from."""

    @property
    def job_id(self) -> str:
        return self._watcher.job_id

    @property
    def epoch(self) -> int:
        """The epoch of the log being read."""
        return self._watcher.epoch

    @property
    def ended(self) -> bool:
        """Whether the terminal status has been read."""
        return self._watcher.ended

    def offset_of(self, number: int) -> StreamOffset:
        """The offset a client resumes from once it has item ``number``."""
        return StreamOffset(number, self._watcher.epoch)

    def __aiter__(self) -> Replay[ItemT]:
        return self

    async def __anext__(self) -> list[ItemT]:
        """The items of the next batch: while replaying, what the log holds now (at once);
        then the next paced batch. Raises ``StopAsyncIteration`` after the terminal status,
        ``GoneError`` if the log can no longer be read.

        Cancellation: nothing is lost; the next call reads the same batch."""
        batch = self._unchecked
        if batch is None:
            batch = await self._replay_batch() if self._replaying else None
        if batch is None:
            batch = await self._watcher.__anext__()
        if batch.epoch != self._epoch:
            self._unchecked = batch  # the watcher's cursor has moved past it: keep it
            await self._check_taken_over(batch.epoch)
            self._unchecked = None
        self.last_batch = batch
        return self._projection.project(batch)

    async def _check_taken_over(self, epoch: int) -> None:
        """The job was taken over while this replay read it. A client whose offset the items
        so far have not reached came ahead of the log (it read on the instance that died):
        its items must all be made of what the log kept of the old epoch. (Batches of
        ``/v1`` are numbered by ``seq``: their source checks the cursor itself.)"""
        projection = self._projection
        if projection.replays_unpaced and projection.next_number <= self._after:
            kept = await self._watcher.kept_through_of(self._epoch)
            if kept is None:
                raise stale_epoch_error(epoch, None)
            await _check_kept_items(self._watcher, projection.fresh(), self._after, kept)
        self._epoch = epoch

    async def _replay_batch(self) -> Batch | None:
        watcher = self._watcher
        while not watcher.ended:
            events = await watcher.read(watcher.cursor)
            if not events:
                break
            to_seq = events[-1].seq
            ended = isinstance(events[-1], StatusEvent) and events[-1].is_terminal
            if not self._projection.tool_call_deltas:
                events = tuple(ev for ev in events if not isinstance(ev, ToolCallDeltaEvent))
            from_seq = watcher.cursor + 1
            watcher.skip_to(to_seq, ended=ended)
            if events:
                return Batch(watcher.job_id, watcher.epoch, from_seq, to_seq, events)
        self._replaying = False  # caught up: follow at the watch's pace
        return None

    # -- long poll ------------------------------------------------------------------------

    async def read(self, after_seq: int, *, limit: int | None = None) -> tuple[LogEvent, ...]:
        """The log's entries after ``after_seq`` that are there now (no wait, no pacing);
        empty if none yet. Raises ``GoneError``; ``BadRequestError`` at or past the end of a
        finished job. Does not move the iteration. Cancellation: nothing is consumed."""
        return await self._watcher.read(after_seq, limit=limit)

    async def wait_beyond(self, seq: int) -> None:
        """Return once an entry after ``seq`` may exist. Raises ``GoneError`` if the log is gone.

        Cancellation: safe; nothing is consumed."""
        await self._watcher.wait_beyond(seq)
