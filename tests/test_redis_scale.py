"""The Redis store spread over shards: the capacity limits hold under concurrent starts from
two instances (on one Redis and on a cluster); leases are on Redis's clock, so instances
whose clocks disagree keep each other's jobs and still find a dead one's; the retention
sweep is split between instances (each expired job removed once, none left); and a
prefix written by the earlier layout is refused at startup."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio

from backstream import CapacityError, Config, open_runtime
from backstream.actors.clock import WallClock
from backstream.protocol.events import StatusEvent
from backstream.protocol.records import JobProgress, NotificationRecord, SharedCapacity
from backstream.runtime.stores.redis import RedisStore
from backstream.runtime.stores.redis_clock import RedisFrame
from backstream.runtime.stores.redis_housekeeping import ShardShare
from backstream.runtime.stores.redis_keys import SHARDS
from tests.conftest import delete_prefix, redis_url, require_redis
from tests.test_store_conformance import record

MSG = [{"role": "user", "content": "x"}]


@asynccontextmanager
async def _prefix_on(url: str | None) -> AsyncIterator[tuple[str, str]]:
    """A fresh prefix on one Redis (``url`` None) or on the cluster at ``url``."""
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    if url is None:
        require_redis()
    try:
        yield (url or redis_url()), prefix
    finally:
        if url is None:
            await delete_prefix(prefix)


@asynccontextmanager
async def _stores(url: str, prefix: str, count: int) -> AsyncIterator[list[RedisStore]]:
    """``count`` instances; the times the tests give them are one clock's (one frame)."""
    frame = RedisFrame()
    stores = [RedisStore(url, prefix=prefix, frame=frame) for _ in range(count)]
    for store in stores:
        await store.open()
    try:
        yield stores
    finally:
        for store in reversed(stores):  # a client's context closes after those opened in it
            await store.aclose()


async def _running_entries(store: RedisStore) -> int:
    return sum([await store.redis.zcard(store.keys.running(shard)) for shard in range(SHARDS)])


# -- capacity ---------------------------------------------------------------------------


async def _race_creates(url: str, prefix: str, max_jobs: int, per_user: int, users: int) -> int:
    """60 creates at once through two instances; how many got a slot."""
    now = time.time()
    capacity = SharedCapacity(now=now, lease_until=now + 15, max_jobs=max_jobs, max_jobs_per_user=per_user)
    admitted: list[str] = []
    refused: list[str] = []
    async with _stores(url, prefix, 2) as (a, b):

        async def create(store: RedisStore, i: int) -> None:
            try:
                await store.create_job(record(f"j_{i}", user=f"u{i % users}", message_id=f"m{i}"), capacity)
                admitted.append(f"j_{i}")
            except CapacityError:
                refused.append(f"j_{i}")

        async with trio.open_nursery() as nursery:
            for i in range(60):
                nursery.start_soon(create, a if i % 2 else b, i)
        assert len(admitted) + len(refused) == 60
        assert await _running_entries(a) == len(admitted)  # refused starts hold no slot
    return len(admitted)


@pytest.mark.parametrize("max_jobs", [1, 7, 20, 40])
async def test_concurrent_starts_from_two_instances_never_exceed_max_jobs(max_jobs: int) -> None:
    """Every shard holds at most its share, so the total never exceeds ``max_jobs``; with
    no job ending meanwhile, a start is refused only when every shard is full: exactly
    ``max_jobs`` are admitted."""
    async with _prefix_on(None) as (url, prefix):
        assert await _race_creates(url, prefix, max_jobs, per_user=100, users=60) == max_jobs


async def test_concurrent_starts_on_a_cluster_never_exceed_max_jobs(redis_cluster: str) -> None:
    async with _prefix_on(redis_cluster) as (url, prefix):
        assert await _race_creates(url, prefix, 20, per_user=100, users=60) == 20


async def test_concurrent_starts_of_one_user_never_exceed_the_per_user_limit() -> None:
    async with _prefix_on(None) as (url, prefix):
        assert await _race_creates(url, prefix, 100, per_user=3, users=1) == 3


async def test_two_runtimes_never_run_more_than_max_jobs_between_them() -> None:
    async with _prefix_on(None) as (url, prefix):
        config = Config(drain_timeout=0, max_jobs=5, max_jobs_per_user=100)
        async with (
            open_runtime(config, store=RedisStore(url, prefix=prefix)) as a,
            open_runtime(config, store=RedisStore(url, prefix=prefix)) as b,
        ):
            started: list[str] = []

            async def start(runtime: object, i: int) -> None:
                try:
                    job = await runtime.start_job(  # type: ignore[attr-defined]
                        user=f"u{i}",
                        thread_id="t",
                        message_id=f"m{i}",
                        model="backstream/lorem",
                        messages=MSG,
                        params={"max_tokens": 10_000, "tokens_per_s": 20},
                    )
                    started.append(job.job_id)
                except CapacityError:
                    pass

            async with trio.open_nursery() as nursery:
                for i in range(16):
                    nursery.start_soon(start, a if i % 2 else b, i)
            assert len(started) == 5
            assert await _running_entries(a.store) == 5  # type: ignore[arg-type]


# -- leases on Redis's clock ---------------------------------------------------------------------


async def test_instances_whose_clocks_disagree_keep_healthy_jobs_and_find_a_dead_ones() -> None:
    """One instance's clock 30 s behind, another's 30 s ahead, a dead one's 60 s ahead: the
    healthy job runs to its end in its first epoch (nobody takes it for an orphan) and the
    dead instance's job is recovered once its lease lapsed on Redis's clock. (Real time, on
    short leases: Redis's clock cannot be mocked.)"""
    config = Config(
        drain_timeout=0,
        lease_ttl=2.0,
        lease_renew_interval=0.4,
        flush_ms=20,
        continuations={"backstream/*": "interrupt"},  # a recovered orphan ends, as it was found
    )
    async with _prefix_on(None) as (url, prefix):
        async with (
            open_runtime(config, store=RedisStore(url, prefix=prefix), clock=WallClock(-30)) as behind,
            open_runtime(config, store=RedisStore(url, prefix=prefix), clock=WallClock(30)) as ahead,
        ):
            healthy = await behind.start_job(
                user="alice",
                thread_id="t",
                message_id="m",
                model="backstream/lorem",
                messages=MSG,
                params={"max_tokens": 100, "tokens_per_s": 25},  # 4 s: two leases
            )
            started = await behind.store.get_job(healthy.job_id)
            assert started is not None and started.owner is not None
            dead = RedisStore(url, prefix=prefix)  # starts a job and never renews it
            await dead.open()
            try:
                now = time.time() + 60
                orphan = record("j_dead", user="bob", created_at=now, updated_at=now, lease_until=now + 2)
                capacity = SharedCapacity(now=now, lease_until=now + 2, max_jobs=10, max_jobs_per_user=10)
                await dead.create_job(orphan, capacity)
            finally:
                await dead.aclose()
            with trio.fail_after(8):
                while (found := await ahead.store.get_job("j_dead")) is None or found.status == "running":
                    await trio.sleep(0.1)
            assert (found.status, found.epoch) == ("interrupted", 2)
            with trio.fail_after(10):
                while (job := await ahead.store.get_job(healthy.job_id)) is None or job.status == "running":
                    await trio.sleep(0.1)
            assert (job.status, job.epoch, job.owner) == ("completed", 1, started.owner)
            recovered = [rt.statistics().keeper.recovered_total for rt in (behind, ahead)]
            assert sum(recovered) == 1


async def test_a_watch_on_an_instance_whose_clock_is_behind_still_counts() -> None:
    """Watch presence is on Redis's clock too: a watch opened through an instance 30 s
    behind keeps another instance from notifying its job's user, until it lapses."""
    async with _prefix_on(None) as (url, prefix):
        behind, ahead = RedisStore(url, prefix=prefix), RedisStore(url, prefix=prefix)
        await behind.open()
        await ahead.open()
        try:
            behind_now, ahead_now = time.time() - 30, time.time()
            behind.frame.anchor(behind_now)  # what each runtime's first call tells its store
            ahead.frame.anchor(ahead_now)
            await behind.watch_started("j_1", "w_1", behind_now + 15)
            note = NotificationRecord(
                notification_id="n_1",
                user="alice",
                type="ai.message.received",
                job_id="j_1",
                thread_id="t1",
                title="done",
                body="hi",
                created_at=ahead_now,
            )
            assert not await ahead.notify_unwatched(note, ahead_now, 10)  # watched
            assert await ahead.notify_unwatched(note, ahead_now + 16, 10)  # the watch lapsed
        finally:
            await ahead.aclose()
            await behind.aclose()


async def test_two_instances_split_the_orphan_scan_and_take_each_orphan_once() -> None:
    """Forty orphans, two instances scanning at once: each orphan taken once. A shard one
    instance scans is skipped by the other until that claim lapses (a third of a lease)."""
    async with _prefix_on(None) as (url, prefix), _stores(url, prefix, 2) as (a, b):
        now = time.time()
        capacity = SharedCapacity(now=now, lease_until=now + 15, max_jobs=100, max_jobs_per_user=100)
        for i in range(40):
            job = record(
                f"j_{i}", user=f"u{i}", owner="i_dead", created_at=now, updated_at=now, lease_until=now + 15
            )
            await a.create_job(job, capacity)
        taken: dict[str, list[str]] = {"i_a": [], "i_b": []}

        async def scan(store: RedisStore, owner: str) -> None:
            taken[owner] += [h.record.job_id for h in await store.take_orphans(owner, now + 20, now + 35)]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(scan, a, "i_a")
            nursery.start_soon(scan, b, "i_b")
        both = taken["i_a"] + taken["i_b"]
        assert len(both) == len(set(both)) == 40

        late = record(
            "j_late", user="v", owner="i_dead", created_at=now, updated_at=now, lease_until=now + 15
        )
        await a.create_job(late, capacity)
        shard = int(await a.redis.hget(a.keys.job("j_late"), "shard") or 0)
        scanner = await a.redis.hget(a.keys.scan(shard), "owner")
        other, other_store = ("i_b", b) if scanner == "i_a" else ("i_a", a)
        assert await other_store.take_orphans(other, now + 21, now + 36) == []  # the shard is scanned
        [handover] = await other_store.take_orphans(other, now + 26, now + 41)  # the claim lapsed
        assert handover.record.job_id == "j_late"


# -- the sweep ---------------------------------------------------------------------------------


async def _finished_jobs(store: RedisStore, count: int, expires_at: float) -> list[str]:
    now = expires_at - 100
    capacity = SharedCapacity(
        now=now, lease_until=now + 15, max_jobs=10 * count, max_jobs_per_user=10 * count
    )
    ended = JobProgress(status="completed", seq=1, content_length=0, updated_at=now, finished_at=now)
    ended = attrs.evolve(ended, expires_at=expires_at)
    ids = [f"j_{i}" for i in range(count)]

    async def make(i: int) -> None:
        job = record(ids[i], user=f"u{i % 7}", message_id=f"m{i}", created_at=now, updated_at=now)
        await store.create_job(job, capacity)
        await store.commit(ids[i], [StatusEvent(seq=1, status="completed")], ended)

    limit = trio.CapacityLimiter(32)

    async def bounded(i: int) -> None:
        async with limit:
            await make(i)

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(bounded, i)
    return ids


async def test_two_instances_split_the_sweep_and_remove_each_expired_job_once() -> None:
    async with _prefix_on(None) as (url, prefix), _stores(url, prefix, 2) as (a, b):
        expires_at = time.time() + 100
        ids = await _finished_jobs(a, 1200, expires_at)
        swept: dict[str, list[str]] = {"a": [], "b": []}

        async def sweep(name: str, store: RedisStore) -> None:
            while batch := await store.delete_expired(expires_at + 1):
                swept[name] += batch

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sweep, "a", a)
            nursery.start_soon(sweep, "b", b)
        both = swept["a"] + swept["b"]
        assert len(both) == len(set(both)) == len(ids)  # each removed once, by one of them
        assert set(both) == set(ids)
        assert swept["a"] and swept["b"]  # both did a share
        k = a.keys
        for shard in range(SHARDS):
            assert await a.redis.zcard(k.expiry(shard)) == 0
            assert await a.redis.zcard(k.expiry_taken(shard)) == 0
            assert await a.redis.hlen(k.outbox(shard)) == 0
        assert [key async for key in a.redis.scan_iter(match="{" + prefix + ":job:*")] == []
        assert all([await a.redis.zcard(k.user_index(f"u{i}")) == 0 for i in range(7)])


async def test_a_batch_whose_sweeper_died_is_swept_by_another_once_its_claim_lapses() -> None:
    async with _prefix_on(None) as (url, prefix), _stores(url, prefix, 2) as (a, b):
        expires_at = time.time() + 100
        await _finished_jobs(a, 3, expires_at)
        shard = int(await a.redis.hget(a.keys.job("j_0"), "shard") or 0)
        args = [repr(expires_at + 1), "0", "0", "10"]  # a claim that ends at once: a dead sweeper
        taken = await a._conn.script("expiry_take", [a.keys.expiry(shard), a.keys.expiry_taken(shard)], args)
        assert "j_0" in taken
        assert "j_0" in await b.delete_expired(expires_at + 1)
        assert await b.get_job("j_0") is None


# -- the instances alive share the shards -------------------------------------------------------


def test_the_instances_alive_deal_every_shard_to_exactly_one_of_them() -> None:
    for count in range(1, SHARDS + 5):
        alive = [f"i_{n:02d}" for n in reversed(range(count))]  # any order: sorted by id
        share = ShardShare.of(alive)
        dealt = [shard for instance in alive for shard in share.shards([instance])]
        assert sorted(dealt) == list(range(SHARDS))
        assert max(len(share.shards([i])) for i in alive) - min(len(share.shards([i])) for i in alive) <= 1
    two = ShardShare.of(["i_b", "i_a"])
    assert two.shards(["i_a"]) == list(range(0, SHARDS, 2))
    assert two.shards(["i_a", "i_b"]) == list(range(SHARDS))  # one store for two instances
    assert two.shards(["i_new"]) == list(range(SHARDS))  # not announced yet: every shard
    assert two.shards([]) == list(range(SHARDS))


async def test_instances_alive_sweep_only_their_share_until_the_other_withdraws() -> None:
    async with _prefix_on(None) as (url, prefix), _stores(url, prefix, 2) as (a, b):
        expires_at = time.time() + 100
        ids = await _finished_jobs(a, 60, expires_at)
        await a.announce("i_a", time.time() + 60)
        await b.announce("i_b", time.time() + 60)
        await a.announce("i_a", time.time() + 60)  # now A has seen B
        shard_of = {job_id: int(await a.redis.hget(a.keys.job(job_id), "shard") or 0) for job_id in ids}
        mine = set(range(0, SHARDS, 2))  # i_a sorts first
        swept = await a.delete_expired(expires_at + 1)
        assert swept and {shard_of[job_id] for job_id in swept} <= mine
        assert set(swept) == {job_id for job_id in ids if shard_of[job_id] in mine}
        await b.withdraw("i_b")
        await a.announce("i_a", time.time() + 60)
        rest = await a.delete_expired(expires_at + 1)
        assert set(rest) == set(ids) - set(swept)


async def test_an_instance_takes_the_orphans_of_its_share_and_all_once_the_other_is_gone() -> None:
    async with _prefix_on(None) as (url, prefix), _stores(url, prefix, 2) as (a, b):
        now = time.time()
        capacity = SharedCapacity(now=now, lease_until=now + 15, max_jobs=100, max_jobs_per_user=100)
        for i in range(24):
            job = record(f"j_{i}", user=f"u{i}", owner="i_dead", created_at=now, updated_at=now, lease_until=now + 15)
            await a.create_job(job, capacity)
        await b.announce("i_b", now + 60)
        taken = [h.record.job_id for h in await a.take_orphans("i_a", now + 20, now + 35)]
        assert len(taken) == 24  # i_a never announced itself: it scans every shard
        for i in range(24, 48):
            job = record(f"j_{i}", user=f"u{i}", owner="i_dead", created_at=now, updated_at=now, lease_until=now + 15)
            await a.create_job(job, capacity)
        await a.announce("i_a", now + 60)
        later = [h.record.job_id for h in await a.take_orphans("i_a", now + 30, now + 45)]
        shards = {int(await a.redis.hget(a.keys.job(job_id), "shard") or 0) for job_id in later}
        assert later and shards <= set(range(0, SHARDS, 2))
        await b.withdraw("i_b")  # read at once by the next scan, not at the next announcement
        rest = [h.record.job_id for h in await a.take_orphans("i_a", now + 40, now + 55)]
        assert sorted(later + rest) == sorted(f"j_{i}" for i in range(24, 48))


# -- the layout ----------------------------------------------------------------------------------


def test_serve_refuses_a_prefix_written_by_the_earlier_layout() -> None:
    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    old_running = "{" + prefix + "}:running"
    subprocess.run(["redis-cli", "-p", str(_port()), "zadd", old_running, "1", "j_old"], check=True)
    try:
        env = {**os.environ, "BACKSTREAM_REDIS_PREFIX": prefix}
        done = subprocess.run(
            [sys.executable, "-m", "backstream", "serve", "--store", redis_url(), "--port", "0"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert lines[0].startswith(f"backstream serve: cannot open the store {redis_url()}: ")
        assert f"the Redis prefix '{prefix}' holds jobs of an earlier key layout ({old_running}" in lines[0]
        assert "BACKSTREAM_REDIS_PREFIX" in lines[0]
        marker = subprocess.run(
            ["redis-cli", "-p", str(_port()), "exists", "{" + prefix + "}:layout"],
            capture_output=True,
            text=True,
        )
        assert marker.stdout.strip() == "0"  # refused before writing anything
    finally:
        subprocess.run(["redis-cli", "-p", str(_port()), "del", old_running], check=True, capture_output=True)


def _port() -> int:
    from tests.conftest import REDIS_PORT

    return REDIS_PORT
