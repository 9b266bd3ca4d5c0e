"""Shared job.events frames: the same text encode() gives, bounded in size."""

from __future__ import annotations

from backstream.protocol.codec import batch_message, encode
from backstream.protocol.events import Batch, StatusEvent, TextEvent
from backstream.runtime.server.frames import FrameCache


def batch(job: str, start: int, text: str) -> Batch:
    events = (TextEvent(seq=start, text=text), StatusEvent(seq=start + 1, status="completed"))
    return Batch(job_id=job, epoch=1, from_seq=start, to_seq=start + 1, events=events)


def test_a_frame_is_what_encode_gives_and_is_shared() -> None:
    cache = FrameCache()
    first = cache.frame(batch("j1", 2, "hello"))
    assert first == encode(batch_message(batch("j1", 2, "hello")))
    assert cache.frame(batch("j1", 2, "hello")) is first and cache.hits == 1
    other = cache.frame(batch("j2", 2, "hello"))
    assert other != first and '"j2"' in other and cache.misses == 2


def test_the_cache_keeps_at_most_max_chars() -> None:
    cache = FrameCache(max_chars=1000)
    for i in range(100):
        cache.frame(batch(f"job{i}", 2, "x" * 50))
        assert cache.chars <= 1000
    assert cache.frame(batch("job99", 2, "x" * 50)) and cache.hits == 1  # the newest stays
    huge = cache.frame(batch("big", 2, "y" * 5000))  # larger than the bound: encoded, not kept
    assert "y" * 5000 in huge and cache.chars <= 1000
