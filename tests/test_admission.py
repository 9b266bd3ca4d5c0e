"""Capacity, idempotency, authorization, retention and request checks."""

from __future__ import annotations

import pathlib
import random
from collections import Counter

import pytest
import trio

import backstream
from backstream import Config, MemoryStore, open_runtime
from backstream.actors.clock import WallClock
from backstream.actors.job import JobActor
from backstream.actors.registry import Registry, StartRequest
from backstream.actors.supervisor import ChildSpec, Restart, Supervisor
from backstream.protocol.records import JobRequest
from backstream.runtime.models.router import ModelRouter
from backstream.runtime.stores.sqlite import SqliteStore
from backstream.runtime.tools.registry import ToolRegistry
from tests.helpers import collect, joined_text, terminal

MSG = [{"role": "user", "content": "hello there"}]
SLOW = {"max_tokens": 1000, "tokens_per_s": 10}


async def lorem(
    rt: backstream.Runtime, user: str, message_id: str, **params: object
) -> backstream.StartedJob:
    return await rt.start_job(
        user=user,
        thread_id="t",
        message_id=message_id,
        model="backstream/lorem",
        messages=MSG,
        params={**SLOW, **params},
    )


async def test_capacity_per_user_and_global(autojump_clock: trio.testing.MockClock) -> None:
    config = Config(max_jobs=3, max_jobs_per_user=2, capacity_retry_after_ms=1500, drain_timeout=0)
    async with open_runtime(config) as rt:
        a1 = await lorem(rt, "alice", "m1")
        await lorem(rt, "alice", "m2")
        with pytest.raises(backstream.CapacityError) as per_user:
            await lorem(rt, "alice", "m3")
        assert per_user.value.retry_after_ms == 1500 and per_user.value.code == "capacity"
        await lorem(rt, "bob", "m1")  # another user still has room
        with pytest.raises(backstream.CapacityError, match="limit of 3"):
            await lorem(rt, "carol", "m1")
        assert rt.statistics().jobs.running == 3
        await rt.abort(a1.job_id, user="alice")  # a finished job frees its slot
        await lorem(rt, "alice", "m3")
        assert rt.statistics().jobs.running == 3


async def test_idempotent_start_per_user_and_message_id(autojump_clock: trio.testing.MockClock) -> None:
    async with open_runtime(Config(drain_timeout=0)) as rt:
        first = await lorem(rt, "alice", "m1", max_tokens=5)
        again = await lorem(rt, "alice", "m1", max_tokens=5)
        assert not first.existing and again.existing and again.job_id == first.job_id
        await collect(rt, first.job_id)
        after = await lorem(rt, "alice", "m1")
        assert after.existing and after.job_id == first.job_id and after.job.status == "completed"
        other = await lorem(rt, "bob", "m1", max_tokens=5)
        assert not other.existing and other.job_id != first.job_id
        assert rt.statistics().jobs.started_total == 2


async def test_idempotent_start_does_not_count_against_capacity(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_runtime(Config(max_jobs_per_user=1, drain_timeout=0)) as rt:
        first = await lorem(rt, "alice", "m1")
        again = await lorem(rt, "alice", "m1")
        assert again.existing and again.job_id == first.job_id


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
async def test_a_burst_of_starts_is_admitted_at_once_within_every_limit(
    store_kind: str, tmp_path: pathlib.Path
) -> None:
    """Starts that arrive together are admitted concurrently: the limits still hold
    exactly, and repeats of one message_id all get the one job. (On the real clock: SQLite
    works in threads, which an autojump clock would take for idleness and jump past.)"""
    store = SqliteStore(tmp_path / "jobs.db") if store_kind == "sqlite" else MemoryStore()
    config = Config(max_jobs=7, max_jobs_per_user=4, drain_timeout=0)
    outcomes: list[tuple[str, str, str]] = []  # (user, message_id, job_id or error code)

    async def start(user: str, message_id: str) -> None:
        try:
            started = await lorem(rt, user, message_id, tokens_per_s=1)  # runs past the test
        except backstream.CapacityError as error:
            outcomes.append((user, message_id, error.code))
        else:
            outcomes.append((user, message_id, started.job_id))

    async with open_runtime(config, store=store) as rt:
        async with trio.open_nursery() as nursery:  # the per-user limit, and repeats
            for k in range(6):
                nursery.start_soon(start, "alice", f"m{k}")
            for _ in range(3):
                nursery.start_soon(start, "dave", "same")
        alice = [j for u, _m, j in outcomes if u == "alice"]
        assert sorted(alice).count("capacity") == 2 and len(set(alice) - {"capacity"}) == 4
        dave = [j for u, _m, j in outcomes if u == "dave"]
        assert len(dave) == 3 and len(set(dave)) == 1 and dave[0] != "capacity"
        await start("bob", "again")  # 6 running: one slot left
        for round_ in range(8):  # a start that comes while a repeat holds the slot, a few ticks in
            async with trio.open_nursery() as nursery:
                for _ in range(10):  # a repeat holds a slot until the store says it is one
                    nursery.start_soon(start, "bob", "again")
                for _ in range(round_):
                    await trio.lowlevel.checkpoint()
                nursery.start_soon(start, "carol", f"r{round_}")
            admitted = next(o for o in outcomes if o[1] == f"r{round_}")
            assert admitted[2] != "capacity", f"round {round_}: refused while a slot was free"
            await rt.abort(admitted[2], user="carol")
            while rt.statistics().jobs.running > 6:
                await trio.sleep(0.01)
        bob = {j for u, _m, j in outcomes if u == "bob"}
        assert len(bob) == 1 and "capacity" not in bob
        await start("carol", "last")
        assert rt.statistics().jobs.running == 7
        assert rt.statistics().jobs.started_total == 7 + 8


async def test_another_users_job_is_indistinguishable_from_none(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_runtime(Config(drain_timeout=0)) as rt:
        job = await lorem(rt, "alice", "m1")
        errors = []
        for job_id in (job.job_id, "j_does_not_exist"):
            with pytest.raises(backstream.NotFoundError) as e1:
                await rt.get_job(job_id, user="bob")
            with pytest.raises(backstream.NotFoundError) as e2:
                async with rt.watch(job_id, user="bob"):
                    pass
            with pytest.raises(backstream.NotFoundError) as e3:
                await rt.abort(job_id, user="bob")
            errors.append([str(e.value) for e in (e1, e2, e3)])
        assert errors[0] == errors[1]
        assert await rt.list_jobs(user="bob") == []
        assert (await rt.get_job(job.job_id, user="alice")).job.status == "running"


async def test_retention_frees_the_job(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    async with open_runtime(Config(retention=60, sweep_interval=5, drain_timeout=0), store=store) as rt:
        job = await lorem(rt, "alice", "m1", max_tokens=3)
        await collect(rt, job.job_id)
        await trio.sleep(50)
        assert (await rt.get_job(job.job_id, user="alice")).job.status == "completed"
        await trio.sleep(20)
        with pytest.raises(backstream.NotFoundError):
            await rt.get_job(job.job_id, user="alice")
        assert store.job_count() == 0 and rt.statistics().keeper.swept_total == 1
        fresh = await lorem(rt, "alice", "m1", max_tokens=1)  # the message id is free again
        assert not fresh.existing


async def test_list_jobs_newest_first_with_filters(autojump_clock: trio.testing.MockClock) -> None:
    async with open_runtime(Config(drain_timeout=0)) as rt:
        ids = []
        for i, thread in enumerate(["t1", "t2", "t1"]):
            started = await rt.start_job(
                user="alice",
                thread_id=thread,
                message_id=f"m{i}",
                model="backstream/lorem",
                messages=MSG,
                params={"max_tokens": 2 if i == 0 else 1000},
            )
            ids.append(started.job_id)
            await trio.sleep(0.01)
        await collect(rt, ids[0])
        assert [j.job_id for j in await rt.list_jobs(user="alice")] == ids[::-1]
        assert [j.job_id for j in await rt.list_jobs(user="alice", thread_id="t1")] == [ids[2], ids[0]]
        assert [j.job_id for j in await rt.list_jobs(user="alice", statuses=["completed"])] == [ids[0]]
        assert [j.job_id for j in await rt.list_jobs(user="alice", limit=1)] == [ids[2]]
        with pytest.raises(backstream.BadRequestError):
            await rt.list_jobs(user="alice", limit=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": 5}]}, "content"),
        ({"params": {"api_key": "x"}}, "api_key"),
        ({"params": {"tokens_per_s": -1}}, "tokens_per_s"),
        ({"params": {"max_tokens": "many"}}, "max_tokens"),
        ({"thread_id": ""}, "thread_id"),
        ({"message_id": "x" * 300}, "message_id"),
        ({"tools": ["nope"]}, "unknown tool"),
    ],
)
async def test_bad_requests(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = dict(
        user="alice", thread_id="t", message_id="m", model="backstream/echo", messages=MSG
    )
    args.update(kwargs)
    async with open_runtime(Config(drain_timeout=0)) as rt:
        with pytest.raises(backstream.BadRequestError, match=match):
            await rt.start_job(**args)  # type: ignore[arg-type]
        assert rt.statistics().jobs.started_total == 0


async def test_upstream_params_are_restricted(autojump_clock: trio.testing.MockClock) -> None:
    config = Config(upstream_url="http://127.0.0.1:9/v1", drain_timeout=0)
    async with open_runtime(config) as rt:
        with pytest.raises(backstream.BadRequestError, match="tokens_per_s"):
            await rt.start_job(
                user="a", thread_id="t", message_id="m", model="gpt", messages=MSG, params={"tokens_per_s": 5}
            )


async def test_echo_streams_the_last_user_message(autojump_clock: trio.testing.MockClock) -> None:
    async with open_runtime(Config(drain_timeout=0, echo_words_per_s=10)) as rt:
        messages = [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "x"},
            {"role": "user", "content": "say these five words please"},
        ]
        t0 = trio.current_time()
        started = await rt.start_job(
            user="a", thread_id="t", message_id="m", model="backstream/echo", messages=messages
        )
        batches = await collect(rt, started.job_id, user="a")
        assert joined_text(batches) == "say these five words please"
        assert terminal(batches).usage == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
        assert trio.current_time() - t0 == pytest.approx(0.5, abs=0.06)


async def test_lorem_rate_and_length(autojump_clock: trio.testing.MockClock) -> None:
    async with open_runtime(Config(drain_timeout=0)) as rt:
        t0 = trio.current_time()
        started = await lorem(rt, "a", "m", max_tokens=60, tokens_per_s=30)
        batches = await collect(rt, started.job_id, user="a")
        assert len(joined_text(batches).split()) == 60
        assert trio.current_time() - t0 == pytest.approx(2.0, abs=0.06)


async def test_close_drains_then_interrupts(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    async with open_runtime(Config(drain_timeout=2), store=store) as rt:
        quick = await lorem(rt, "a", "m1", max_tokens=5, tokens_per_s=10)
        slow = await lorem(rt, "a", "m2", max_tokens=100, tokens_per_s=10)
    quick_record = await store.get_job(quick.job_id)
    slow_record = await store.get_job(slow.job_id)
    assert quick_record is not None and quick_record.status == "completed"
    assert slow_record is not None and slow_record.status == "interrupted"
    assert slow_record.content_length >= 15  # about 2 s of words kept
    entries = await store.read(slow.job_id, 0, 10_000)
    assert entries[-1].kind == "status" and entries[-1].seq == slow_record.seq


async def test_running_counts_stay_right_under_concurrent_starts_and_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Starts, aborts and natural ends of many users at once: no user ever runs more than
    the limit, and once everything has ended every count is back to zero exactly."""
    config = Config(max_jobs=20, max_jobs_per_user=3, drain_timeout=0)
    users = [f"u{n}" for n in range(5)]
    rng = random.Random(7)
    seen_over_limit: list[Counter[str]] = []
    outcomes: Counter[str] = Counter()

    async with open_runtime(config) as rt:

        async def watch_the_truth() -> None:  # what runs, as the jobs supervisor knows it
            while True:
                per_user = Counter(actor.record.user for actor in rt._job_supervisor.addresses())
                if max(per_user.values(), default=0) > 3:
                    seen_over_limit.append(per_user)
                await trio.sleep(0.005)

        async def churn(user: str, worker: int) -> None:
            for i in range(12):
                try:
                    started = await lorem(rt, user, f"w{worker}-{i}", max_tokens=rng.randint(1, 30))
                except backstream.CapacityError:
                    outcomes["refused"] += 1
                    await trio.sleep(rng.random() / 2)
                    continue
                outcomes["started"] += 1
                if rng.random() < 0.4:
                    await trio.sleep(rng.random())
                    await rt.abort(started.job_id, user=user)

        async with trio.open_nursery() as checking:
            checking.start_soon(watch_the_truth)
            async with trio.open_nursery() as nursery:
                for user in users:
                    for worker in range(3):
                        nursery.start_soon(churn, user, worker)
            await rt.wait_idle()
            await trio.sleep(0.1)  # the registry takes the last endings
            checking.cancel_scope.cancel()
        assert seen_over_limit == []
        # Trio schedules in a random order, so how many get in varies; the limit was contended.
        assert outcomes["started"] > 30 and outcomes["refused"] > 10
        stats = rt.statistics().jobs
        assert stats.running == 0 and stats.users_running == 0
        assert stats.started_total == outcomes["started"]
        assert sum(stats.finished_total.values()) == outcomes["started"]
        for user in users:  # every slot is free again, and no more than that
            for i in range(3):
                await lorem(rt, user, f"again-{i}")
            with pytest.raises(backstream.CapacityError, match="you have 3 jobs running"):
                await lorem(rt, user, "one-too-many")
        assert rt.statistics().jobs.users_running == len(users)


async def test_a_restarted_registry_rebuilds_its_counts_from_the_jobs_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = Config(max_jobs=10, max_jobs_per_user=2, drain_timeout=0)
    store = MemoryStore()
    router = ModelRouter(config, {}, None)
    jobs: Supervisor[JobActor] = Supervisor("jobs", concurrent_shutdown=True)
    system: Supervisor[None] = Supervisor("system")
    registry = Registry(
        config, store, WallClock(), jobs, instance_id="i_test", tools=ToolRegistry.with_builtins()
    )

    async def start(message_id: str, tokens: int) -> str:
        request = JobRequest(
            model="backstream/lorem",
            messages=tuple(MSG),
            params={"max_tokens": tokens, "tokens_per_s": 10},
        )
        record, existing = await registry.start_job(
            StartRequest("alice", "t", message_id, request, router.resolve(request))
        )
        assert not existing
        return record.job_id

    async with trio.open_nursery() as nursery:
        await nursery.start(jobs.run)
        await nursery.start(system.run)
        spec = ChildSpec("registry", registry.fresh_child, Restart.PERMANENT, shutdown=0)
        await system.start_child(spec)
        await start("short", 5)  # ends after 0.5 s
        await start("long", 1000)
        assert await system.terminate_child("registry")
        await system.start_child(spec)  # fresh: counts only what runs now
        with pytest.raises(backstream.CapacityError, match="you have 2 jobs running"):
            await start("third", 1000)
        assert registry.statistics().users_running == 1
        await trio.sleep(1)  # the short job ends; its ending reaches the fresh registry
        await start("third", 1000)
        with pytest.raises(backstream.CapacityError):
            await start("fourth", 1000)
        assert registry.statistics().running == 2
        nursery.cancel_scope.cancel()
