"""On Redis a job's writes commit at the flush nearest ``commit_ms`` after the last commit
(and whenever a status changes or ``flush_events`` entries wait), and only announce what is
new at the flushes between; on a store that does not announce, every flush commits. The
ticker's flushes are played by hand on a clock that moves only when told."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import trio
import trio.lowlevel
import trio.testing

from backstream import Config, MemoryStore
from backstream.actors.clock import WallClock
from backstream.actors.job_writes import JobWrites
from backstream.actors.joblog import JobLog
from backstream.actors.ports import LogStore
from backstream.protocol.backoff import Backoff
from backstream.protocol.records import JobProgress, events_from_json
from backstream.runtime.stores.redis import RedisStore
from tests.conftest import REDIS_HOST, REDIS_PORT, delete_prefix, redis_url, require_redis
from tests.test_store_conformance import record

CONFIG = Config(flush_ms=100, commit_ms=500, flush_events=64)


def writes_of(store: LogStore, log: JobLog) -> JobWrites:
    def progress(seq: int) -> JobProgress:
        return JobProgress(status=log.status, seq=seq, content_length=log.content_length, updated_at=1.0)

    return JobWrites(
        "j_1",
        log,
        store=store,
        config=CONFIG,
        clock=WallClock(),
        progress=progress,
        ended_elsewhere=lambda: None,
        give_up=lambda: None,
    )


async def durable(store: LogStore) -> int:
    entries = await store.read("j_1", 0, 1000)
    return entries[-1].seq if entries else 0


async def flushes(
    clock: trio.testing.MockClock, store: LogStore, log: JobLog, writes: JobWrites, count: int
) -> list[int]:
    """``count`` flushes, 100 ms apart, a token before each: the durable seq after each."""
    backoff = Backoff(0.1, 2.0, jitter="none")
    seen = []
    for _ in range(count):
        clock.jump(0.1)
        log.append_text("x ")
        assert await writes.flush_round(backoff)
        seen.append(await durable(store))
    return seen


@contextmanager
def listener(channel: str) -> Iterator[list[str]]:
    """``redis-cli`` subscribed to ``channel`` (sharded) for the block: the messages it got."""
    proc = subprocess.Popen(
        ["redis-cli", "-h", REDIS_HOST, "-p", str(REDIS_PORT), "ssubscribe", channel],
        stdout=subprocess.PIPE,
        text=True,
    )
    messages: list[str] = []
    try:
        yield messages
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
        lines = out.splitlines()
        messages += [lines[i + 2] for i, line in enumerate(lines[:-2]) if line == "smessage"]


async def until_subscribed(store: RedisStore, channel: str) -> None:
    """The clock stands still: poll (I/O only) for 5 s of real time at most."""
    deadline = time.monotonic() + 5.0
    while not (await store.redis.pubsub_shardnumsub(channel)).get(channel):
        assert time.monotonic() < deadline, "redis-cli did not subscribe"
        await trio.lowlevel.checkpoint()


async def test_redis_commits_at_the_flush_nearest_commit_ms_and_announces_between(
    mock_clock: trio.testing.MockClock,
) -> None:
    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    store = RedisStore(redis_url(), prefix=prefix)
    await store.open()
    channel = store.keys.job_channel("j_1")
    try:
        with listener(channel) as heard:
            await until_subscribed(store, channel)
            await store.create_job(record(status="queued"))
            log = JobLog("j_1", 1, max_output_chars=10_000)
            writes = writes_of(store, log)
            log.append_status("running")
            log.append_text("a ")
            assert await writes.flush_round(Backoff(0.1, 2.0, jitter="none"))  # a new status: commits
            assert await durable(store) == 2
            # Entries 3 to 12 at flushes 0.1 s apart: the fifth after the commit (0.5 s) commits.
            assert await flushes(mock_clock, store, log, writes, 10) == [2, 2, 2, 2, 7, 7, 7, 7, 7, 12]
            log.append_tool_call("c1", "search", "{}")
            log.append_approval_required("c1", "search", "{}")
            log.append_status("awaiting_approval")  # a change of status commits at the next flush
            mock_clock.jump(0.1)
            assert await writes.flush_round(Backoff(0.1, 2.0, jitter="none"))
            assert await durable(store) == 15
            assert store.statistics().entries_announced == 8
    finally:
        await store.aclose()
        await delete_prefix(prefix)
    said = []
    for message in heard:
        head, durable_seq, entries = message.split(" ", 2)
        seqs = [event.seq for event in events_from_json(entries)]
        said.append((head, seqs[0], seqs[-1], int(durable_seq)))
    assert said == [
        ("j_1@1", 1, 2, 2),  # the first commit's announcement
        ("j_1@1", 3, 3, 2),  # then every entry after the last commit, at each flush
        ("j_1@1", 3, 4, 2),
        ("j_1@1", 3, 5, 2),
        ("j_1@1", 3, 6, 2),
        ("j_1@1", 3, 7, 7),  # a commit that brings a new entry is announced, durable through it
        ("j_1@1", 8, 8, 7),
        ("j_1@1", 8, 9, 7),
        ("j_1@1", 8, 10, 7),
        ("j_1@1", 8, 11, 7),
        ("j_1@1", 8, 12, 12),
        ("j_1@1", 13, 15, 15),  # a change of status, announced with its commit
    ]


async def test_a_store_that_does_not_announce_commits_at_every_flush(
    mock_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    await store.create_job(record(status="queued"))
    log = JobLog("j_1", 1, max_output_chars=10_000)
    writes = writes_of(store, log)
    log.append_status("running")
    assert await flushes(mock_clock, store, log, writes, 4) == [2, 3, 4, 5]
