"""Commits of many jobs sent in one pipeline (``redis_groups.ScriptGroups``), on a
redis-server of the test's own: each commit lands whole in its own job, each gets its own
reply, a script Redis lost is loaded again, and a stopped store fails what waits."""

from __future__ import annotations

import uuid
from pathlib import Path

import coredis
import trio

from backstream.actors.ports import JobEndedElsewhereError, StoreClosedError
from backstream.protocol.errors import UnavailableError
from backstream.protocol.events import TextEvent
from backstream.runtime.stores.redis import RedisStore
from tests.conftest import REDIS_HOST, redis_url
from tests.test_redis_faults import own_redis
from tests.test_store_conformance import progress, record, texts
from tests.test_takeover import opened

JOBS = 30


async def commit_all(store: RedisStore, first: int, words: tuple[str, ...]) -> None:
    """Every job commits at once, as the jobs of an instance do on its flush tick."""
    async with trio.open_nursery() as nursery:
        for index in range(JOBS):
            entries = texts(first, *(f"{word}{index} " for word in words))
            nursery.start_soon(store.commit, f"j_{index}", entries, progress(first + len(words) - 1))


async def test_commits_made_together_go_in_groups_and_each_lands_in_its_job(tmp_path: Path) -> None:
    with own_redis(tmp_path) as redis:
        store = RedisStore(redis_url(redis.port), prefix=f"bstest:{uuid.uuid4().hex[:8]}")
        async with opened(store):
            for index in range(JOBS):
                await store.create_job(record(job_id=f"j_{index}", message_id=f"m{index}", owner="me"))
            await commit_all(store, 1, ("a", "b"))
            groups = store.statistics().commit_groups
            assert groups.calls_sent == JOBS and groups.groups_sent < JOBS // 3  # sent together
            assert groups.largest_group > 10 and groups.calls_waiting == 0
            # Redis restarted without its scripts: each commit is sent again alone.
            async with coredis.Redis(host=REDIS_HOST, port=redis.port) as admin:
                await admin.script_flush()
            await commit_all(store, 3, ("c",))
            for index in range(JOBS):
                logged = await store.read(f"j_{index}", 0, 100)
                assert [(e.seq, e.text) for e in logged if isinstance(e, TextEvent)] == [
                    (1, f"a{index} "),
                    (2, f"b{index} "),
                    (3, f"c{index} "),
                ]
                stored = await store.get_job(f"j_{index}")
                assert stored is not None and stored.seq == 3
            # Another instance took j_0 over: that commit is fenced off in its group, the
            # others land.
            async with coredis.Redis(host=REDIS_HOST, port=redis.port) as admin:
                await admin.hset(store.keys.job("j_0"), {"owner": '"another-instance"'})
            outcomes: dict[int, str] = {}

            async def commit(index: int) -> None:
                try:
                    await store.commit(f"j_{index}", texts(4, "d"), progress(4))
                    outcomes[index] = "landed"
                except JobEndedElsewhereError:
                    outcomes[index] = "fenced"

            async with trio.open_nursery() as committers:
                for index in range(JOBS):
                    committers.start_soon(commit, index)
            assert outcomes == {0: "fenced"} | {index: "landed" for index in range(1, JOBS)}


async def test_commits_under_way_when_the_store_stops_all_end(tmp_path: Path) -> None:
    """Redis frozen: a group waits for its replies, the next commits wait behind it. The
    store stops: every commit ends (``StoreClosedError``, or ``unavailable`` for those whose
    connection Redis never accepted), none waits forever."""
    with own_redis(tmp_path) as redis:
        store = RedisStore(redis_url(redis.port), prefix=f"bstest:{uuid.uuid4().hex[:8]}")
        await store.open()
        failed: list[BaseException] = []
        try:
            for index in range(JOBS):
                await store.create_job(record(job_id=f"j_{index}", message_id=f"m{index}"))
            async with trio.open_nursery() as outer:
                running = trio.CancelScope()

                async def run_store() -> None:
                    with running:
                        await store.run()

                outer.start_soon(run_store)
                while not store.subscribed.is_set():
                    await trio.sleep(0.01)
                redis.pause()  # the group in flight waits for Redis; the others wait behind it

                async def commit(index: int) -> None:
                    try:
                        await store.commit(f"j_{index}", texts(1, "x"), progress(1))
                    except (StoreClosedError, UnavailableError) as exc:
                        failed.append(exc)

                with trio.fail_after(10):
                    async with trio.open_nursery() as committers:
                        for index in range(JOBS):
                            committers.start_soon(commit, index)
                        await trio.sleep(0.2)
                        running.cancel()  # the store stops
        finally:
            redis.resume()
            await store.aclose()
        assert len(failed) == JOBS


async def test_a_commit_cancelled_while_it_waits_for_its_group_is_withdrawn(tmp_path: Path) -> None:
    """Redis frozen: one commit is in flight, five wait behind it; cancelling those five
    takes them out of the queue (none is sent later for nobody), and the first lands."""
    with own_redis(tmp_path) as redis:
        store = RedisStore(redis_url(redis.port), prefix=f"bstest:{uuid.uuid4().hex[:8]}")
        async with opened(store):
            for index in range(6):
                await store.create_job(record(job_id=f"j_{index}", message_id=f"m{index}"))
            groups = store.statistics
            redis.pause()
            try:
                async with trio.open_nursery() as first:
                    first.start_soon(store.commit, "j_0", texts(1, "first"), progress(1))
                    with trio.fail_after(5):
                        while groups().commit_groups.groups_sent == 0:
                            await trio.sleep(0.01)
                    async with trio.open_nursery() as behind:
                        for index in range(1, 6):
                            behind.start_soon(store.commit, f"j_{index}", texts(1, "x"), progress(1))
                        with trio.fail_after(5):
                            while groups().commit_groups.calls_waiting != 5:
                                await trio.sleep(0.01)
                        behind.cancel_scope.cancel()
                    assert groups().commit_groups.calls_waiting == 0
                    redis.resume()
            finally:
                redis.resume()
            assert groups().commit_groups.calls_sent == 1  # the five were never sent
            assert [e.seq for e in await store.read("j_0", 0, 10)] == [1]
            assert await store.read("j_1", 0, 10) == []
