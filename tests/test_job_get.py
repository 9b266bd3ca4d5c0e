"""``job.get`` never reports a state older than what was known when it was called."""

from __future__ import annotations

import trio

from backstream import Config, MemoryStore, Runtime, open_runtime
from backstream.protocol.records import JobRecord


class SlowReads(MemoryStore):
    """The memory store, with reads of job records that take a while to come back (as over a
    network): the record is read at once, handed back after ``delay``."""

    def __init__(self) -> None:
        super().__init__()
        self.delay = 0.0

    async def get_job(self, job_id: str) -> JobRecord | None:
        found = await super().get_job(job_id)
        await trio.sleep(self.delay)
        return found


async def start(rt: Runtime, message_id: str) -> str:
    started = await rt.start_job(
        user="alice",
        thread_id="t",
        message_id=message_id,
        model="backstream/lorem",
        messages=[{"role": "user", "content": "x"}],
        params={"max_tokens": 100, "tokens_per_s": 100},
    )
    return started.job_id


async def test_get_job_is_never_older_than_the_live_job(autojump_clock: trio.testing.MockClock) -> None:
    store = SlowReads()
    async with open_runtime(Config(drain_timeout=0, flush_ms=500, flush_events=10_000), store=store) as rt:
        job_id = await start(rt, "m")
        await trio.sleep(0.7)  # about 70 entries in memory, 50 written
        known = rt._registry.live(job_id)
        assert known is not None
        seen_seq, seen_length = known.log.last_seq, known.log.content_length
        store.delay = 2.0  # the job ends while its record is on its way back
        info = await rt.get_job(job_id, user="alice", include_content=True)
        assert info.job.seq >= seen_seq and info.job.content_length >= seen_length
        assert len(info.content or "") == info.job.content_length
        store.delay = 0.0
        await rt.wait_idle()
        final = await rt.get_job(job_id, user="alice", include_content=True)
        assert final.job.status == "completed"
        assert (info.content or "") == (final.content or "")[: len(info.content or "")]
