"""Encoded ``job.events`` frames shared by the watchers of one job.

Watchers of a job that keep up read the same entries in the same batches, and
a batch's frame depends only on its job, epoch and seq range. Encoding it once
for all of them takes the JSON work of a fan-out from one per watcher to one per
batch. Bounded by total characters held; the oldest frames go first.
"""

from __future__ import annotations

from backstream.protocol.codec import batch_message, encode
from backstream.protocol.events import Batch

__all__ = ["FrameCache"]


class FrameCache:
    """Frames by (job, epoch, from_seq, to_seq), at most ``max_chars`` characters in all."""

    def __init__(self, max_chars: int = 4 * 1024 * 1024) -> None:
        self._frames: dict[tuple[str, int, int, int], str] = {}
        self._chars = 0
        self._max_chars = max_chars
        self.hits = 0
        self.misses = 0

    def frame(self, batch: Batch) -> str:
        """The frame of ``batch``: the one encoded before for the same range, or a new one."""
        key = (batch.job_id, batch.epoch, batch.from_seq, batch.to_seq)
        text = self._frames.get(key)
        if text is not None:
            self.hits += 1
            return text
        self.misses += 1
        text = encode(batch_message(batch))
        if len(text) <= self._max_chars:
            self._frames[key] = text
            self._chars += len(text)
            while self._chars > self._max_chars:
                self._chars -= len(self._frames.pop(next(iter(self._frames))))
        return text

    @property
    def chars(self) -> int:
        return self._chars
