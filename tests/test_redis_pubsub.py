"""No broadcast: an instance hears of a job only while it runs or watches it, of a user only
while it holds a connection of theirs, and reads a watched job once for all its watchers.
On one Redis and on a cluster (sharded pub/sub)."""

from __future__ import annotations

import hashlib
import random
import subprocess
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import coredis
import pytest
import trio
import trio.testing

from backstream import Batch, Config, Runtime, open_runtime
from backstream.actors.remote_tail import TAIL_WINDOW, RemoteTails, TailedSource
from backstream.protocol.events import LogEvent
from backstream.runtime.stores.redis import RedisStore
from backstream.runtime.stores.redis_client import script_bodies
from backstream.runtime.stores.redis_housekeeping import OUTBOX_FULL_PASS_S
from backstream.runtime.stores.redis_subscriber import RedisSubscriberStatistics
from tests.conftest import REDIS_HOST, delete_prefix, redis_url, require_redis
from tests.helpers import check_contiguous, collect, joined_text, terminal
from tests.test_redis_faults import own_redis

MSG = [{"role": "user", "content": "x"}]


@asynccontextmanager
async def instances(
    url: str, count: int, *, cluster: bool = False, config: Config | None = None
) -> AsyncIterator[list[Runtime]]:
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    config = config or Config(drain_timeout=0, flush_ms=20)
    try:
        async with AsyncExitStack() as stack:
            yield [
                await stack.enter_async_context(open_runtime(config, store=RedisStore(url, prefix=prefix)))
                for _ in range(count)
            ]
    finally:
        if not cluster:
            await delete_prefix(prefix)


@pytest.fixture(params=["redis", "cluster"])
def where(request: pytest.FixtureRequest) -> tuple[str, bool]:
    if request.param == "cluster":
        return request.getfixturevalue("redis_cluster"), True
    require_redis()
    return redis_url(), False


async def lorem(rt: Runtime, message_id: str, tokens: int, rate: float) -> str:
    started = await rt.start_job(
        user="alice",
        thread_id="t",
        message_id=message_id,
        model="backstream/lorem",
        messages=MSG,
        params={"max_tokens": tokens, "tokens_per_s": rate},
    )
    return started.job_id


def heard(rt: Runtime) -> RedisSubscriberStatistics:
    assert isinstance(rt.store, RedisStore)
    return rt.store.statistics().subscriber


async def test_an_instance_that_neither_runs_nor_watches_a_job_hears_nothing_of_it(
    where: tuple[str, bool],
) -> None:
    url, cluster = where
    async with instances(url, 3, cluster=cluster) as (a, b, c):
        with c.subscribe_notifications("bob"):  # C holds a connection of another user only
            job_id = await lorem(a, "m1", tokens=80, rate=200)
            batches = await collect(b, job_id)
            assert terminal(batches).status == "completed"
            with trio.fail_after(5):
                await a.wait_idle()
            await trio.sleep(0.2)  # anything still on its way to C
            idle = heard(c)
            assert idle.messages_total == 0, idle
            assert idle.channels_subscribed == 1  # bob's notifications, nothing of the job
        assert heard(b).messages_total > 0  # the watcher heard of the commits
        with trio.fail_after(5):
            while heard(b).channels_subscribed or heard(c).channels_subscribed:
                await trio.sleep(0.01)  # unsubscribed once the watch (and the connection) went


async def test_a_job_started_on_a_arrives_whole_on_b_and_c(where: tuple[str, bool]) -> None:
    url, cluster = where
    async with instances(url, 3, cluster=cluster) as (a, b, c):
        job_id = await lorem(a, "m1", tokens=150, rate=300)
        results: dict[str, list[Batch]] = {}

        async def watch(name: str, rt: Runtime) -> None:
            results[name] = await collect(rt, job_id)

        async with trio.open_nursery() as nursery:
            for name, rt in [("b1", b), ("b2", b), ("c", c)]:
                nursery.start_soon(watch, name, rt)
        for batches in results.values():
            check_contiguous(batches)
            assert terminal(batches).status == "completed"
            assert len(joined_text(batches).split()) == 150
        assert len({joined_text(batches) for batches in results.values()}) == 1
        # Two watchers on B, one tail: B followed the job once.
        assert heard(b).subscribes_total == 1 and heard(c).subscribes_total == 1


async def test_a_remote_watcher_is_shown_entries_before_they_are_durable(where: tuple[str, bool]) -> None:
    """Commits far apart: the writer announces its new entries at every flush between, so a
    watcher on B is shown entries the store does not hold yet; the job's end makes every
    one durable, and the watch joins whole."""
    url, cluster = where
    config = Config(drain_timeout=0, flush_ms=20, commit_ms=60_000)
    async with instances(url, 2, cluster=cluster, config=config) as (a, b):
        job_id = await lorem(a, "m1", tokens=40, rate=100)
        shown_ahead = False
        batches: list[Batch] = []
        with trio.fail_after(20):
            async with b.watch(job_id, user="alice") as stream:
                async for batch in stream:
                    batches.append(batch)
                    if batch.terminal is None and not shown_ahead:
                        durable = await b.store.read(job_id, 0, 100)
                        shown_ahead = durable[-1].seq < batch.to_seq if durable else True
        assert shown_ahead
        check_contiguous(batches)
        assert terminal(batches).status == "completed"
        assert len(joined_text(batches).split()) == 40
        assert len(await b.store.read(job_id, 0, 100)) == batches[-1].to_seq  # all durable now
        assert isinstance(a.store, RedisStore)
        assert a.store.statistics().entries_announced >= 5


async def _xranges(port: int) -> int:
    async with coredis.Redis(host=REDIS_HOST, port=port, decode_responses=True) as admin:
        stats = await admin.info("commandstats")
        entry = stats.get("cmdstat_xrange")
        return int(entry["calls"]) if isinstance(entry, dict) else 0


async def test_more_watchers_of_a_job_on_one_instance_add_no_reads(tmp_path: Path) -> None:
    """The same job, watched on B by one watcher and then by three: the log is read as
    often (per instance, not per watcher; and mostly not at all, since a commit's
    announcement carries its entries), counted by Redis itself."""
    with own_redis(tmp_path, persistence="snapshot") as redis:
        async with instances(redis_url(redis.port), 2) as (a, b):
            reads = []
            for watchers, message_id in [(1, "m1"), (3, "m3")]:
                before = await _xranges(redis.port)
                job_id = await lorem(a, message_id, tokens=120, rate=100)
                async with trio.open_nursery() as nursery:
                    for _ in range(watchers):
                        nursery.start_soon(collect, b, job_id)
                with trio.fail_after(5):
                    await a.wait_idle()
                reads.append(await _xranges(redis.port) - before)
            one, three = reads
            assert three <= one + 2, reads  # (a read or two at the start and the end)
            tails = b.statistics().remote_tails
            assert tails.tails == 0 and tails.log_reads_total <= one + three
            assert tails.announced_total > 10  # the entries came with the commits' announcements


async def test_more_watchers_of_a_job_on_one_instance_hold_one_presence(where: tuple[str, bool]) -> None:
    """Three watchers of a job on B and one on A: the job's presence in Redis is one entry
    per instance; B's stays while any of its watchers is open, and goes with the last."""
    url, cluster = where
    async with instances(url, 2, cluster=cluster) as (a, b):
        assert isinstance(b.store, RedisStore)
        redis, key = b.store.redis, b.store.keys.watching
        job_id = await lorem(a, "m1", tokens=2000, rate=100)
        async with b.watch(job_id, user="alice") as first, a.watch(job_id, user="alice"):
            assert [batch async for batch in _first(first)]
            async with b.watch(job_id, user="alice"), b.watch(job_id, user="alice"):
                members = sorted(await redis.zrange(key(job_id), 0, -1))
                assert members == sorted([a.instance_id, b.instance_id])
                assert b.watcher_count(job_id) == 3
            assert b.watcher_count(job_id) == 1
            assert sorted(await redis.zrange(key(job_id), 0, -1)) == sorted([a.instance_id, b.instance_id])
        assert list(await redis.zrange(key(job_id), 0, -1)) == []
        assert b.statistics().watchers == 0
        await a.abort(job_id, user="alice")


async def _first(batches: AsyncIterator[Batch]) -> AsyncIterator[Batch]:
    async for batch in batches:
        yield batch
        return


async def test_opens_and_closes_of_one_jobs_watches_never_cross_in_the_store() -> None:
    """Watches of one job opened and closed at random on one instance: whenever one is
    open, its presence is in Redis; once none is, it is gone."""
    require_redis()
    async with instances(redis_url(), 2) as (a, b):
        assert isinstance(b.store, RedisStore)
        redis, key = b.store.redis, b.store.keys.watching
        job_id = await lorem(a, "m1", tokens=5000, rate=50)
        rng = random.Random(7)

        async def one_watch() -> None:
            await trio.sleep(rng.random() * 0.2)
            async with b.watch(job_id, user="alice"):
                assert b.instance_id in await redis.zrange(key(job_id), 0, -1)
                await trio.sleep(rng.random() * 0.2)

        for _ in range(5):
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(one_watch)
            assert b.watcher_count(job_id) == 0
            assert b.instance_id not in await redis.zrange(key(job_id), 0, -1)
        await a.abort(job_id, user="alice")


async def test_an_end_on_this_instance_is_carried_out_without_claiming_it_again(tmp_path: Path) -> None:
    """A job's end writes its outbox entry claimed by its instance; that instance's
    dispatcher takes it as written (no claim script through Redis), within its claim. The
    first end is claimed through Redis (an owner's first claim passes over its shards); the
    second, a moment later, is not: MONITOR sees the notification stored, and no claim."""
    claim_sha = hashlib.sha1(script_bodies()["claim"].encode()).hexdigest()
    insert_sha = hashlib.sha1(script_bodies()["notify_insert"].encode()).hexdigest()
    with own_redis(tmp_path, persistence="snapshot") as redis:
        async with instances(redis_url(redis.port), 1) as (a,):
            started = trio.current_time()

            async def ended_and_notified(message_id: str, count: int) -> None:
                await lorem(a, message_id, tokens=3, rate=1000)
                with trio.fail_after(10):
                    while len((await a.notifications_list(user="alice"))[0]) < count:
                        await trio.sleep(0.02)

            await ended_and_notified("m1", 1)
            monitor = subprocess.Popen(
                ["redis-cli", "-p", str(redis.port), "monitor"], stdout=subprocess.PIPE, text=True
            )
            try:
                await trio.sleep(0.3)  # MONITOR is on
                await ended_and_notified("m2", 2)
            finally:
                monitor.terminate()
                seen, _ = monitor.communicate(timeout=10)
            # Within the first pass's period: no pass over every shard is due in the window.
            assert trio.current_time() - started < OUTBOX_FULL_PASS_S
    assert insert_sha in seen  # the second end's notification was stored meanwhile
    assert claim_sha not in seen


async def test_a_notification_reaches_a_connection_of_its_user_on_another_instance(
    where: tuple[str, bool],
) -> None:
    url, cluster = where
    async with instances(url, 3, cluster=cluster) as (a, b, c):
        with b.subscribe_notifications("alice") as pushes:
            with trio.fail_after(5):
                while heard(b).channels_subscribed != 1:
                    await trio.sleep(0.01)
            job_id = await lorem(a, "m1", tokens=10, rate=1000)  # nobody watches: a notification
            with trio.fail_after(10):
                pushed = await pushes.receive()
            assert pushed.job_id == job_id and pushed.type == "ai.message.received"
        assert heard(c).messages_total == 0  # no connection of alice there


async def test_an_abort_reaches_the_runner_within_a_second(where: tuple[str, bool]) -> None:
    url, cluster = where
    async with instances(url, 2, cluster=cluster) as (a, b):
        job_id = await lorem(a, "m1", tokens=10_000, rate=50)
        await trio.sleep(0.5)  # the runner follows the job's control channel
        t0 = trio.current_time()
        result = await b.abort(job_id, user="alice")
        assert trio.current_time() - t0 < 1.0  # not the 5 s poll
        assert result.aborted and result.job.status == "aborted"
        assert heard(a).messages_total >= 1


async def test_a_watcher_behind_the_tails_window_reads_the_store_and_misses_nothing() -> None:
    """The tail keeps the newest TAIL_WINDOW entries: a replay from the start of a longer
    job reads its range from the store itself until it reaches the window, and still gets
    every entry once, in order."""
    require_redis()
    async with instances(redis_url(), 2) as (a, b):
        job_id = await lorem(a, "m1", tokens=TAIL_WINDOW * 3, rate=3000)
        live: list[Batch] = []
        async with b.watch(job_id, user="alice") as batches:
            async for batch in batches:
                live.append(batch)
                if batch.to_seq > TAIL_WINDOW * 2:
                    break
            replay = await collect(b, job_id)  # from seq 0, while the live watch holds the tail
            assert b.statistics().remote_tails.reads_behind_total > 0
        check_contiguous(replay)
        assert terminal(replay).status == "completed"
        assert len(joined_text(replay).split()) == TAIL_WINDOW * 3


@asynccontextmanager
async def writer_and_follower(url: str) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two stores of one deployment (a prefix of their own), opened and running; closed in
    the reverse of their opening (each holds a scope), their keys deleted."""
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    writer, follower = RedisStore(url, prefix=prefix), RedisStore(url, prefix=prefix)
    for store in (writer, follower):  # opened outside the nursery, as the runtime does
        await store.open()
    try:
        async with trio.open_nursery() as nursery:
            for store in (writer, follower):
                await nursery.start(store.run)
            yield writer, follower
            nursery.cancel_scope.cancel()
    finally:
        for store in (follower, writer):
            await store.aclose()
        if url == redis_url():
            await delete_prefix(prefix)


async def test_a_watcher_that_the_tails_window_passed_while_it_waited_misses_nothing(
    tmp_path: Path,
) -> None:
    """Two watchers of a job on one instance share its tail, one behind the other. The one
    ahead reads first (Redis frozen meanwhile, so the other comes while that read waits)
    and moves the window to its cursor: the one behind, which found the window short of
    its cursor before it waited for the tail, still gets every entry after its cursor."""
    from tests.test_store_conformance import progress, record, texts

    with own_redis(tmp_path) as redis:
        async with writer_and_follower(redis_url(redis.port)) as (writer, follower):
            await writer.create_job(record())
            await writer.commit("j_1", texts(1, "a ", "b ", "c "), progress(3))
            await writer.commit("j_1", texts(4, "d ", "e ", "f "), progress(6))
            tails = RemoteTails(follower)
            ahead, behind = tails.open("j_1", 1), tails.open("j_1", 1)
            got: dict[str, list[int]] = {}

            async def read(name: str, source: TailedSource, after_seq: int) -> None:
                events = await source.read(after_seq, max_events=100, max_chars=10_000, merge_text=False)
                got[name] = [event.seq for event in events]

            redis.pause()
            try:
                async with trio.open_nursery() as readers:
                    readers.start_soon(read, "ahead", ahead, 3)
                    await trio.testing.wait_all_tasks_blocked()  # its read of Redis holds the tail
                    readers.start_soon(read, "behind", behind, 1)
                    await trio.testing.wait_all_tasks_blocked()
                    redis.resume()
            finally:
                redis.resume()
            ahead.close()
            behind.close()
        assert got == {"ahead": [4, 5, 6], "behind": [2, 3, 4, 5, 6]}


async def heard_by_the_writer(follower: RedisStore) -> None:
    """Once the follower's one subscription is acknowledged and its watch request has
    reached the writer (a moment later)."""
    with trio.fail_after(5):
        while follower.statistics().subscriber.channels_subscribed != 1:
            await trio.sleep(0.01)
        await trio.sleep(0.1)


async def test_an_announcement_carries_the_entries_unless_they_are_large() -> None:
    """A follower gets a commit's entries with its announcement; over 64 KiB of them it
    gets the seq only (and reads), so no subscriber's buffer holds large messages."""
    from tests.test_store_conformance import progress, record, texts

    require_redis()
    got: list[list[int]] = []
    epochs: set[int] = set()

    def follow(entries: Sequence[LogEvent], epoch: int, durable: int) -> None:
        got.append([e.seq for e in entries])
        epochs.add(epoch)
        assert durable == (entries[-1].seq if entries else durable)  # a commit's: all durable

    async with writer_and_follower(redis_url()) as (writer, follower):
        await writer.create_job(record())
        with follower.follow_job("j_1", follow):
            await heard_by_the_writer(follower)
            await writer.commit("j_1", texts(1, "small ", "words"), progress(2))
            await writer.commit("j_1", texts(3, "x" * 70_000), progress(3))
            await writer.commit("j_1", texts(4, "again"), progress(4))
            with trio.fail_after(5):
                while follower.subscriber.announced("j_1") != 4:
                    await trio.sleep(0.01)
    assert got == [[1, 2], [], [4]]  # the large one came without its entries
    assert epochs == {1}  # each announcement names its writer's epoch


async def test_entries_announced_before_their_commit_reach_the_follower_once() -> None:
    """Between commits the writer announces the entries after its last commit, with the seq
    the log is durable through; the commit that makes them durable is not announced again
    (it brings the follower nothing), the next announcement says how far it made the log
    durable, and a change of status is announced with its commit."""
    from tests.test_store_conformance import progress, record, texts

    require_redis()
    got: list[tuple[list[int], int]] = []

    def follow(entries: Sequence[LogEvent], epoch: int, durable: int) -> None:
        got.append(([e.seq for e in entries], durable))

    async with writer_and_follower(redis_url()) as (writer, follower):
        await writer.create_job(record())
        with follower.follow_job("j_1", follow):
            await heard_by_the_writer(follower)
            await writer.commit("j_1", texts(1, "a ", "b "), progress(2))
            await writer.announce_entries("j_1", texts(3, "c ", "d "))
            await writer.announce_entries("j_1", texts(3, "c ", "d ", "e "))
            assert [e.seq for e in await follower.read("j_1", 0, 10)] == [1, 2]  # not durable
            await writer.commit("j_1", texts(3, "c ", "d ", "e "), progress(5))
            await writer.announce_entries("j_1", texts(6, "f "))
            await writer.commit("j_1", texts(6, "f "), progress(6, status="awaiting_approval"))
            with trio.fail_after(5):
                while len(got) < 5:
                    await trio.sleep(0.01)
            await trio.sleep(0.1)  # anything more on its way
    assert got == [([1, 2], 2), ([3, 4], 2), ([3, 4, 5], 2), ([6], 5), ([6], 6)]
