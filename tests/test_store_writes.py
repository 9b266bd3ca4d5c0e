"""A job writes its log to the store in batches, never once per token."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import trio

from backstream import Config, MemoryStore, open_runtime
from backstream.protocol.events import LogEvent, TextEvent
from backstream.protocol.records import JobProgress, JobRecord, JobRequest
from backstream.runtime.stores.sqlite import SqliteStore
from tests.helpers import collect, terminal


class CountingStore(MemoryStore):
    """The memory store, counting commits and their sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.commits: list[tuple[int, str]] = []

    async def commit(self, job_id: str, entries: Sequence[LogEvent], progress: JobProgress) -> None:
        self.commits.append((len(entries), progress.status))
        await super().commit(job_id, entries, progress)


async def run(tokens: int, rate: float, **config: object) -> tuple[CountingStore, int]:
    store = CountingStore()
    async with open_runtime(Config(drain_timeout=0, **config), store=store) as rt:  # type: ignore[arg-type]
        started = await rt.start_job(
            user="u",
            thread_id="t",
            message_id="m",
            model="backstream/lorem",
            messages=[{"role": "user", "content": "x"}],
            params={"max_tokens": tokens, "tokens_per_s": rate},
        )
        last = terminal(await collect(rt, started.job_id, user="u")).seq
        await rt.wait_idle()
    return store, last


async def test_slow_stream_is_written_every_flush_ms(autojump_clock: trio.testing.MockClock) -> None:
    store, last = await run(100, 50, flush_ms=100, flush_events=64)  # 2 s at 50 tokens/s
    assert sum(n for n, _ in store.commits) == last  # every entry written exactly once
    assert 18 <= len(store.commits) <= 23  # about one per 100 ms, not one per token
    assert store.commits[-1][1] == "completed"


async def test_fast_stream_is_written_every_flush_events(autojump_clock: trio.testing.MockClock) -> None:
    store, last = await run(6400, 64_000, flush_ms=10_000, flush_events=64)  # 0.1 s, no timer fires
    assert sum(n for n, _ in store.commits) == last
    assert max(n for n, _ in store.commits) <= 64 + 1
    assert 100 <= len(store.commits) <= 105


async def test_sqlite_flush_writes_progress_not_the_request(tmp_path: Path) -> None:
    """A job with a 1 MB prompt: its creation writes the prompt once; each flush after it
    writes what changed (entries and progress), not the prompt again."""
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        prompt = "word " * 200_000
        record = JobRecord(
            job_id="j_1",
            user="alice",
            thread_id="t",
            message_id="m",
            request=JobRequest("backstream/echo", ({"role": "user", "content": prompt},)),
            status="running",
            seq=0,
            epoch=1,
            content_length=0,
            created_at=1.0,
            updated_at=1.0,
        )
        await store.create_job(record)
        wal = tmp_path / "jobs.db-wal"
        after_create = wal.stat().st_size
        for seq in range(1, 21):
            await store.commit(
                "j_1",
                [TextEvent(seq=seq, text="x")],
                JobProgress(status="running", seq=seq, content_length=seq, updated_at=1.0 + seq),
            )
        grown = wal.stat().st_size - after_create
        assert grown < 512 * 1024, grown  # 20 flushes of a few pages each, not 20 MB
        stored = await store.get_job("j_1")
        assert stored is not None and stored.request == record.request and stored.seq == 20
        assert stored.content_length == 20 and stored.updated_at == 21.0
        nursery.cancel_scope.cancel()
    await store.aclose()
