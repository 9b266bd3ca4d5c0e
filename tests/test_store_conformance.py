"""Every store behaviour the runtime relies on, run against memory, SQLite and Redis."""

from __future__ import annotations

import contextlib

import attrs
import cattrs
import pytest
import trio

from backstream import Config, Store, open_runtime
from backstream.actors.clock import WallClock
from backstream.actors.ports import Capability, JobEndedElsewhereError
from backstream.actors.recovery import InterruptOrphans
from backstream.protocol.errors import QuotaExceededError
from backstream.protocol.events import StatusEvent, TextEvent
from backstream.protocol.records import (
    JobProgress,
    JobRecord,
    JobRequest,
    SharedCapacity,
    log_bytes,
    request_bytes,
)
from tests.helpers import check_contiguous, collect, joined_text, store_reader, terminal

NOW = 1_800_000_000.0


def record(
    job_id: str = "j_1", user: str = "alice", message_id: str = "m1", thread_id: str = "t1", **kw: object
) -> JobRecord:
    fields: dict[str, object] = dict(
        job_id=job_id,
        user=user,
        thread_id=thread_id,
        message_id=message_id,
        request=JobRequest("backstream/echo", ({"role": "user", "content": "hi"},), {"temperature": 0.5}),
        status="running",
        seq=0,
        epoch=1,
        content_length=0,
        created_at=NOW,
        updated_at=NOW,
        owner="i_a",
        lease_until=NOW + 15,
    )
    fields.update(kw)
    return JobRecord(**fields)  # type: ignore[arg-type]


async def recover_orphans(store: Store, owner: str, now: float, retention: float = 60) -> list[JobRecord]:
    """Take the orphans over as ``owner`` and end them interrupted (the keeper's default)."""
    policy = InterruptOrphans(store, WallClock(), retention)
    return [await policy.recover(h) for h in await store.take_orphans(owner, now, now + 15)]


def texts(first: int, *words: str) -> list[TextEvent]:
    return [TextEvent(seq=first + i, text=w) for i, w in enumerate(words)]


def progress(seq: int, status: str = "running", **kw: object) -> JobProgress:
    return JobProgress(
        status=status, seq=seq, content_length=kw.pop("content_length", 0), updated_at=NOW + seq, **kw
    )  # type: ignore[arg-type]


async def test_create_is_idempotent_per_user_and_message(store: Store) -> None:
    first, created = await store.create_job(record())
    assert created and first.job_id == "j_1"
    again, created = await store.create_job(record(job_id="j_2"))
    assert not created and again.job_id == "j_1" and again.request == first.request
    other, created = await store.create_job(record(job_id="j_3", user="bob"))
    assert created and other.job_id == "j_3"
    assert (await store.get_job("j_1")) == first
    assert (await store.find_job("alice", "m1")).job_id == "j_1"  # type: ignore[union-attr]
    assert await store.find_job("alice", "m9") is None and await store.get_job("j_2") is None
    # ids with separators cannot collide
    a, _ = await store.create_job(record(job_id="j_4", user="a:b", message_id="c"))
    b, created = await store.create_job(record(job_id="j_5", user="a", message_id="b:c"))
    assert created and a.job_id != b.job_id


async def test_commit_read_and_retry(store: Store) -> None:
    await store.create_job(record())
    await store.commit(
        "j_1", [StatusEvent(seq=1, status="running"), *texts(2, "a", "b")], progress(3, content_length=2)
    )
    await store.commit("j_1", texts(4, "c"), progress(4, content_length=3))
    # a retried commit that overlaps what is stored appends only what is new
    await store.commit("j_1", texts(4, "c", "d"), progress(5, content_length=4))
    await store.commit(
        "j_1",
        [StatusEvent(seq=6, status="completed", finish_reason="stop")],
        progress(6, "completed", content_length=4, finished_at=NOW + 6, expires_at=NOW + 100),
    )
    entries = await store.read("j_1", 0, 100)
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5, 6]
    assert "".join(e.text for e in entries if isinstance(e, TextEvent)) == "abcd"
    assert [e.seq for e in await store.read("j_1", 3, 2)] == [4, 5]
    assert await store.read("j_1", 6, 10) == []
    final = await store.get_job("j_1")
    assert final is not None and final.status == "completed" and final.seq == 6 and final.content_length == 4
    assert final.finished_at == NOW + 6 and final.expires_at == NOW + 100
    await store.commit("j_nope", texts(1, "x"), progress(1))  # nothing to keep: no error
    assert await store.get_job("j_nope") is None


async def test_wait_for_entries_wakes_on_commit(store: Store) -> None:
    await store.create_job(record())
    woke = trio.Event()

    async def waiter() -> None:
        await store.wait_for_entries("j_1", 0)
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(0.1)
        assert not woke.is_set()
        await store.commit("j_1", texts(1, "x"), progress(1))
        with trio.fail_after(0.5):  # well before the poll fallback
            await woke.wait()
    with trio.fail_after(0.5):
        await store.wait_for_entries("j_1", 0)  # already beyond: returns at once


async def test_list_jobs_order_and_filters(store: Store) -> None:
    for i, (thread, status) in enumerate([("t1", "completed"), ("t2", "running"), ("t1", "running")]):
        await store.create_job(
            record(job_id=f"j_{i}", message_id=f"m{i}", thread_id=thread, created_at=NOW + i)
        )
        if status == "completed":
            await store.commit(
                f"j_{i}",
                [StatusEvent(seq=1, status="completed")],
                progress(1, "completed", finished_at=NOW, expires_at=NOW + 50),
            )
    await store.create_job(record(job_id="j_b", user="bob", message_id="m0"))
    assert [r.job_id for r in await store.list_jobs("alice")] == ["j_2", "j_1", "j_0"]
    assert [r.job_id for r in await store.list_jobs("alice", thread_id="t1")] == ["j_2", "j_0"]
    assert [r.job_id for r in await store.list_jobs("alice", statuses=frozenset({"completed"}))] == ["j_0"]
    assert [r.job_id for r in await store.list_jobs("alice", limit=2)] == ["j_2", "j_1"]
    assert [r.job_id for r in await store.list_jobs("bob")] == ["j_b"]


async def test_delete_expired_frees_everything(store: Store) -> None:
    await store.create_job(record())
    await store.commit(
        "j_1",
        [*texts(1, "x"), StatusEvent(seq=2, status="completed")],
        progress(2, "completed", finished_at=NOW, expires_at=NOW + 60),
    )
    await store.create_job(record(job_id="j_2", message_id="m2"))  # still running: never swept
    assert await store.delete_expired(NOW + 59) == []
    assert await store.delete_expired(NOW + 61) == ["j_1"]
    assert await store.get_job("j_1") is None and await store.read("j_1", 0, 10) == []
    assert [r.job_id for r in await store.list_jobs("alice")] == ["j_2"]
    fresh, created = await store.create_job(record(job_id="j_3"))  # the message id is free again
    assert created and fresh.job_id == "j_3"


async def test_delete_job_removes_a_finished_job_now_and_frees_its_bytes(store: Store) -> None:
    await store.create_job(record(), roomy())
    await store.create_job(record(job_id="j_2", message_id="m2", thread_id="t2"), roomy())
    assert await store.delete_job("j_2") is False  # running: not deleted
    end = [*texts(1, "x"), StatusEvent(seq=2, status="completed")]
    await store.commit("j_1", end, progress(2, "completed", finished_at=NOW, expires_at=NOW + 600))
    assert await store.stored_bytes("alice") > request_bytes(record().request)
    assert await store.delete_job("j_1") is True
    assert await store.get_job("j_1") is None and await store.read("j_1", 0, 10) == []
    assert [r.job_id for r in await store.list_jobs("alice")] == ["j_2"]
    assert await store.list_jobs("alice", thread_id="t1") == []
    assert await store.stored_bytes("alice") == request_bytes(record().request)  # j_2's alone
    assert await store.delete_job("j_1") is False and await store.delete_job("j_nope") is False
    assert await store.delete_expired(NOW + 601) == []  # nothing left for the sweep
    fresh, created = await store.create_job(record(job_id="j_3"), roomy())  # the message id is free again
    assert created and fresh.job_id == "j_3"


async def test_abort_signal(store: Store) -> None:
    await store.create_job(record())
    got = trio.Event()

    async def listen() -> None:
        await store.wait_abort_requested("j_1")
        got.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(listen)
        await trio.sleep(0.1)
        assert not got.is_set()
        await store.request_abort("j_1")
        with trio.fail_after(2):
            await got.wait()
    assert (await store.get_job("j_1")).abort_requested  # type: ignore[union-attr]
    with trio.fail_after(2):
        await store.wait_abort_requested("j_1")  # already requested: returns at once


async def test_orphans_end_interrupted_once(store: Store) -> None:
    from backstream.protocol.records import SharedCapacity

    capacity = SharedCapacity(now=NOW, lease_until=NOW + 15, max_jobs=10, max_jobs_per_user=10)
    await store.create_job(record(lease_until=NOW + 15), capacity)
    await store.commit("j_1", [StatusEvent(seq=1, status="running"), *texts(2, "durable ")], progress(2))
    if Capability.SURVIVES_RESTART not in store.capabilities:
        assert await store.take_orphans("i_b", NOW + 100, NOW + 115) == []  # one process: no orphans
        return
    if Capability.LEASES in store.capabilities:
        assert await store.take_orphans("i_b", NOW + 10, NOW + 25) == []  # the lease still holds
    recovered = await recover_orphans(store, "i_b", NOW + 20)
    assert [r.job_id for r in recovered] == ["j_1"]
    final = recovered[0]
    assert final.status == "interrupted" and final.seq == 3 and final.epoch == 2
    entries = await store.read("j_1", 0, 10)
    assert [e.seq for e in entries] == [1, 2, 3]
    assert isinstance(entries[-1], StatusEvent) and entries[-1].status == "interrupted"
    assert await store.take_orphans("i_c", NOW + 30, NOW + 45) == []  # never twice


async def test_shared_capacity_at_create(store: Store) -> None:
    from backstream import CapacityError
    from backstream.protocol.records import SharedCapacity

    def limits(now: float = NOW) -> SharedCapacity:
        return SharedCapacity(now=now, lease_until=now + 15, max_jobs=2, max_jobs_per_user=1)

    async def create(job_id: str, user: str, now: float = NOW) -> bool:
        return (await store.create_job(record(job_id=job_id, user=user, message_id=job_id), limits(now)))[1]

    assert await create("a", "alice")
    if Capability.SHARED_CAPACITY not in store.capabilities:
        assert await create("b", "alice")  # one process: the registry counts, the store does not
        return
    with pytest.raises(CapacityError, match="you"):
        await create("b", "alice")
    again, created = await store.create_job(record(job_id="a2", user="alice", message_id="a"), limits())
    assert not created and again.job_id == "a"  # a repeated start needs no slot
    assert await create("c", "bob")
    with pytest.raises(CapacityError, match="cluster"):
        await create("d", "carol")
    await store.commit(
        "c",
        [StatusEvent(seq=1, status="completed")],
        progress(1, "completed", finished_at=NOW, expires_at=NOW + 50),
    )  # frees its slot
    assert await create("d", "carol")
    assert await create("e", "dave", now=NOW + 16)  # expired leases (dead instances) do not count


# -- the quota of stored bytes --------------------------------------------------------


def roomy(now: float = NOW) -> SharedCapacity:
    return SharedCapacity(now=now, lease_until=now + 15, max_jobs=100, max_jobs_per_user=100)


async def test_the_quota_refuses_a_create_past_it_and_creates_nothing(store: Store) -> None:
    cost = request_bytes(record().request)
    limit = 2 * cost + cost // 2  # two requests fit, a third does not

    async def create(message_id: str, user: str = "alice") -> tuple[JobRecord, bool]:
        job = record(job_id=f"j_{user}_{message_id}", user=user, message_id=message_id)
        return await store.create_job(job, roomy(), max_stored_bytes=limit)

    assert (await create("m1"))[1] and (await create("m2"))[1]
    assert await store.stored_bytes("alice") == 2 * cost
    with pytest.raises(QuotaExceededError) as refused:
        await create("m3")
    assert refused.value.code == "quota_exceeded" and refused.value.http_status == 429
    assert str(limit) in refused.value.message and str(2 * cost) in refused.value.message
    assert await store.find_job("alice", "m3") is None and await store.get_job("j_alice_m3") is None
    assert len(await store.list_jobs("alice")) == 2 and await store.stored_bytes("alice") == 2 * cost
    again, created = await create("m1")  # a repeat stores nothing: never refused
    assert not created and again.job_id == "j_alice_m1"
    assert (await create("m1", user="bob"))[1]  # another user's quota is their own
    assert await store.stored_bytes("bob") == cost
    _, created = await store.create_job(record(job_id="j_free", message_id="m4"), roomy())
    assert created and await store.stored_bytes("alice") == 3 * cost  # charged all the same


async def test_a_terminal_commit_charges_the_log_once_and_the_sweep_releases_it(store: Store) -> None:
    cost = request_bytes(record().request)
    await store.create_job(record(), roomy(), max_stored_bytes=10 * cost)
    await store.create_job(record(job_id="j_b", user="bob"), roomy())
    first = [StatusEvent(seq=1, status="running"), *texts(2, "é" * 50, "b")]
    await store.commit("j_1", first, progress(3))
    await store.commit("j_1", texts(4, "c"), progress(4))
    await store.commit("j_1", texts(4, "c", "d"), progress(5))  # a retry: "c" is stored once
    assert await store.stored_bytes("alice") == cost  # a running job's log is not counted yet
    end = [StatusEvent(seq=6, status="completed", finish_reason="stop")]
    ended = progress(6, "completed", finished_at=NOW + 6, expires_at=NOW + 100)
    await store.commit("j_1", end, ended)
    batches = [first, texts(4, "c"), texts(5, "d"), end]
    charged = cost + sum(log_bytes(batch) for batch in batches)
    assert await store.stored_bytes("alice") == charged
    with contextlib.suppress(JobEndedElsewhereError):  # Redis: the job ended (this retry landed)
        await store.commit("j_1", end, ended)  # a retried terminal commit charges nothing more
    assert await store.stored_bytes("alice") == charged
    assert await store.delete_expired(NOW + 99) == []
    assert await store.stored_bytes("alice") == charged
    assert await store.delete_expired(NOW + 100) == ["j_1"]
    assert await store.stored_bytes("alice") == 0  # freed with the job
    assert await store.delete_expired(NOW + 200) == []
    assert await store.stored_bytes("alice") == 0 and await store.stored_bytes("bob") == cost
    # The whole quota is free again.
    limit = 2 * cost
    assert (await store.create_job(record(job_id="j_2", message_id="m2"), roomy(), max_stored_bytes=limit))[1]
    assert (await store.create_job(record(job_id="j_3", message_id="m3"), roomy(), max_stored_bytes=limit))[1]


async def test_a_finished_job_over_the_quota_blocks_the_next_start_until_it_expires(store: Store) -> None:
    cost = request_bytes(record().request)
    limit = 3 * cost
    await store.create_job(record(), roomy(), max_stored_bytes=limit)
    end = [*texts(1, "x" * (2 * cost)), StatusEvent(seq=2, status="completed")]
    await store.commit("j_1", end, progress(2, "completed", finished_at=NOW + 2, expires_at=NOW + 10))
    assert await store.stored_bytes("alice") > limit - cost  # its log counts now
    with pytest.raises(QuotaExceededError):
        await store.create_job(record(job_id="j_2", message_id="m2"), roomy(), max_stored_bytes=limit)
    assert await store.delete_expired(NOW + 10) == ["j_1"]
    made, created = await store.create_job(
        record(job_id="j_2", message_id="m2"), roomy(NOW + 10), max_stored_bytes=limit
    )
    assert created and made.job_id == "j_2" and await store.stored_bytes("alice") == cost


# -- the runtime's lifecycle on each store ---------------------------------------------


async def test_runtime_lifecycle(unopened_store: Store) -> None:
    store = unopened_store
    config = Config(drain_timeout=0, flush_ms=20, retention=0.5, sweep_interval=0.1)
    async with open_runtime(config, store=store) as rt:
        started = await rt.start_job(
            user="alice",
            thread_id="t",
            message_id="m",
            model="backstream/lorem",
            messages=[{"role": "user", "content": "x"}],
            params={"max_tokens": 40, "tokens_per_s": 400},
        )
        live = await collect(rt, started.job_id)
        check_contiguous(live)
        await rt.wait_idle()
        replay = await collect(rt, started.job_id)  # from the store now: the actor is gone
        check_contiguous(replay)
        assert joined_text(replay) == joined_text(live) and len(joined_text(live).split()) == 40
        assert terminal(replay) == terminal(live)
        info = await rt.get_job(started.job_id, user="alice", include_content=True)
        assert info.content == joined_text(live) and info.job.status == "completed"
        again = await rt.start_job(
            user="alice",
            thread_id="t",
            message_id="m",
            model="backstream/lorem",
            messages=[{"role": "user", "content": "x"}],
        )
        assert again.existing and again.job_id == started.job_id
        slow = await rt.start_job(
            user="alice",
            thread_id="t",
            message_id="m2",
            model="backstream/lorem",
            messages=[{"role": "user", "content": "x"}],
            params={"max_tokens": 1000, "tokens_per_s": 50},
        )
        await trio.sleep(0.2)
        aborted = await rt.abort(slow.job_id, user="alice")
        assert aborted.aborted and aborted.job.status == "aborted"
        stored = await store.get_job(slow.job_id)
        assert (
            stored is not None
            and stored.status == "aborted"
            and stored.content_length == aborted.job.content_length
        )
        await trio.sleep(1.2)  # retention passes, the sweep runs
        assert await store.get_job(started.job_id) is None
        assert await rt.list_jobs(user="alice") == []


async def test_runtime_watch_follows_a_job_through_the_store(unopened_store: Store) -> None:
    store = unopened_store
    """A watcher reading only the store (as on another instance) sees every entry in order."""
    async with open_runtime(Config(drain_timeout=0, flush_ms=20), store=store) as rt:
        started = await rt.start_job(
            user="alice",
            thread_id="t",
            message_id="m",
            model="backstream/lorem",
            messages=[{"role": "user", "content": "x"}],
            params={"max_tokens": 60, "tokens_per_s": 200},
        )
        watcher = store_reader(store, started.job_id, batch_seconds=0.05)
        with trio.fail_after(10):
            batches = [b async for b in watcher]
        check_contiguous(batches)
        assert terminal(batches).status == "completed"
        info = await rt.get_job(started.job_id, user="alice", include_content=True)
        assert joined_text(batches) == info.content


def test_records_survive_serialization() -> None:
    from backstream.protocol.records import record_from_dict, record_to_dict

    full = attrs.evolve(record(), abort_requested=True, usage={"prompt_tokens": 3})
    assert record_from_dict(record_to_dict(full)) == full
    with pytest.raises(cattrs.ClassValidationError):
        record_from_dict({"job_id": "x"})


async def test_leases_of_a_user_with_a_non_ascii_name_are_renewed(store: Store) -> None:
    from backstream import CapacityError
    from backstream.protocol.records import SharedCapacity

    def limits(now: float) -> SharedCapacity:
        return SharedCapacity(now=now, lease_until=now + 15, max_jobs=10, max_jobs_per_user=1)

    for user in ("zoë", "用户", "a:b"):
        await store.create_job(record(job_id=f"j_{user}", user=user, message_id="m"), limits(NOW))
        await store.renew_leases("i_a", [f"j_{user}"], NOW + 100)
        if Capability.SHARED_CAPACITY not in store.capabilities:
            continue  # one process: the registry counts, the store does not
        # The renewed lease still holds at NOW + 20: the user's one slot is taken, and the
        # job is no orphan.
        with pytest.raises(CapacityError, match="you"):
            await store.create_job(record(job_id=f"k_{user}", user=user, message_id="m2"), limits(NOW + 20))
        assert await store.take_orphans("i_b", NOW + 20, NOW + 35) == []
        running = await store.get_job(f"j_{user}")
        assert running is not None and running.status == "running" and running.lease_until == NOW + 100


async def test_a_reader_through_the_store_sees_the_epoch_of_a_recovered_job(store: Store) -> None:
    """A job recovered while someone reads it through the store: the batch with its
    ``interrupted`` end carries the new epoch, right after what was durable."""
    from backstream.actors.watcher import StoredSource, Watcher

    if Capability.SURVIVES_RESTART not in store.capabilities:
        return  # one process: nothing is recovered under a reader
    from backstream.protocol.records import SharedCapacity

    await store.create_job(
        record(), SharedCapacity(now=NOW, lease_until=NOW + 15, max_jobs=9, max_jobs_per_user=9)
    )
    await store.commit("j_1", [StatusEvent(seq=1, status="running"), *texts(2, "a ", "b ")], progress(3))
    reader = Watcher(
        "j_1",
        1,
        StoredSource(store, "j_1"),
        after_seq=0,
        batch_seconds=0.0,
        max_batch_events=100,
        max_batch_chars=1000,
    )
    with trio.fail_after(5):
        first = await reader.__anext__()
        assert (first.epoch, first.to_seq) == (1, 3)
        assert [r.job_id for r in await recover_orphans(store, "i_b", NOW + 20)] == ["j_1"]
        second = await reader.__anext__()
    assert (second.epoch, second.from_seq, second.to_seq) == (2, 4, 4)
    assert isinstance(second.events[-1], StatusEvent) and second.events[-1].status == "interrupted"
    assert reader.ended


async def test_a_commit_that_would_leave_a_gap_changes_nothing(store: Store) -> None:
    from backstream.actors.ports import LogBehindError

    await store.create_job(record())
    await store.commit("j_1", [StatusEvent(seq=1, status="running"), *texts(2, "a")], progress(2))
    with pytest.raises(LogBehindError) as behind:
        await store.commit("j_1", texts(5, "e"), progress(5))  # 3 and 4 are not stored
    assert behind.value.stored_seq == 2
    with pytest.raises(LogBehindError):
        await store.commit("j_1", [], progress(4))  # a record may not say more than its log
    held = await store.get_job("j_1")
    assert held is not None and held.seq == 2 and [e.seq for e in await store.read("j_1", 0, 10)] == [1, 2]
    # the writer sends again from where the store's log ends
    await store.commit("j_1", texts(3, "c", "d", "e"), progress(5, content_length=4))
    # a late retry of an older commit is ignored: the record does not go back
    await store.commit("j_1", texts(2, "a", "c"), progress(3, content_length=2))
    final = await store.get_job("j_1")
    assert final is not None and final.seq == 5 and final.content_length == 4
    assert [e.seq for e in await store.read("j_1", 0, 10)] == [1, 2, 3, 4, 5]


async def test_decisions_reach_the_waiter_and_the_first_stands(store: Store) -> None:
    await store.create_job(record())
    got: list[bool] = []

    async def wait(call_id: str) -> None:
        got.append(await store.wait_decision("j_1", call_id))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, "c1")
        await trio.sleep(0.1)
        assert got == []
        await store.send_decision("j_1", "c1", False)
        with trio.fail_after(2):
            while not got:
                await trio.sleep(0.01)
    assert got == [False]
    await store.send_decision("j_1", "c2", True)  # decided before anyone waits
    await store.send_decision("j_1", "c2", False)  # too late: the first decision stands
    with trio.fail_after(2):
        assert await store.wait_decision("j_1", "c2") is True


async def test_a_decision_is_no_abort(store: Store) -> None:
    """Decisions and aborts travel apart: a decision never wakes the abort listener."""
    await store.create_job(record())
    with trio.move_on_after(0.5) as waited:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.wait_abort_requested, "j_1")
            await trio.sleep(0.1)
            await store.send_decision("j_1", "c1", True)
    assert waited.cancelled_caught
    assert not (await store.get_job("j_1")).abort_requested  # type: ignore[union-attr]


async def test_statistics_are_a_frozen_snapshot(store: Store) -> None:
    await store.create_job(record())
    before = store.statistics()
    assert attrs.has(type(before))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        before.jobs = 9  # type: ignore[attr-defined]
    await store.commit("j_1", texts(1, "x"), progress(1))
    assert store.statistics() is not before


async def test_waits_end_when_the_store_is_closed(unopened_store: Store) -> None:
    from backstream.actors.ports import StoreClosedError

    store = unopened_store
    await store.open()
    await store.create_job(record())
    await store.aclose()
    if Capability.SURVIVES_RESTART not in store.capabilities:
        return  # memory: nothing to close
    for wait in (
        store.wait_abort_requested("j_1"),
        store.wait_decision("j_1", "c1"),
        store.wait_for_entries("j_1", 0),
    ):
        with trio.fail_after(2), pytest.raises(StoreClosedError):
            await wait
