"""A job's end carries its effects (the outbox), and an orphan is handed to one new owner.

Run against every store; what a store offers beyond the ports is read from its
``capabilities``, never from its class.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from backstream import Config, Store, open_runtime
from backstream.actors.ports import OUTBOX_CLAIM_S, Capability, JobEndedElsewhereError
from backstream.protocol.events import ErrorInfo, StatusEvent
from backstream.protocol.records import SharedCapacity
from backstream.runtime.stores.redis import RedisStore
from backstream.runtime.stores.sqlite import SqliteStore
from tests.conftest import delete_prefix, redis_url, require_redis
from tests.test_store_conformance import NOW, progress, record, texts

CAPACITY = SharedCapacity(now=NOW, lease_until=NOW + 15, max_jobs=10, max_jobs_per_user=10)


@asynccontextmanager
async def peer_of(store: Store) -> AsyncIterator[Store]:
    """Another instance on the same data (another process's view of the store)."""
    peer: Store
    if isinstance(store, RedisStore):
        peer = RedisStore(
            store.url,
            prefix=store.prefix,
            frame=store.frame,  # the tests' times are one clock's
        )
    else:
        raise AssertionError(f"{store!r} is one process's store: it has no peer")
    await peer.open()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.run)  # its subscriber
            yield peer
            nursery.cancel_scope.cancel()
    finally:
        await peer.aclose()


async def end(store: Store, job_id: str = "j_1", status: str = "completed", **kw: object) -> None:
    await store.commit(
        job_id,
        [StatusEvent(seq=3, status=status, error=kw.get("error"))],  # type: ignore[arg-type]
        progress(3, status, finished_at=NOW + 3, expires_at=NOW + 100, **kw),
    )


async def test_a_terminal_commit_writes_one_outbox_entry(store: Store) -> None:
    await store.create_job(record(owner=None))
    await store.commit("j_1", [StatusEvent(seq=1, status="running"), *texts(2, "hi")], progress(2))
    assert await store.claim_outbox("i_x", NOW, NOW + 30, 10) == []  # nothing ended yet
    failure = ErrorInfo("upstream_error", "the model failed")
    await end(store, status="failed", error=failure)
    with pytest.raises(JobEndedElsewhereError) if Capability.LEASES in store.capabilities else nullcontext():
        await end(store, status="failed", error=failure)  # a retry writes nothing twice
    [entry] = await store.claim_outbox("i_x", NOW, NOW + 30, 10)
    assert (entry.job_id, entry.user, entry.thread_id, entry.status, entry.error) == (
        "j_1",
        "alice",
        "t1",
        "failed",
        failure,
    )
    await store.delete_outbox(["j_1"])
    assert await store.claim_outbox("i_x", NOW + 1000, NOW + 1030, 10) == []


@pytest.mark.needs_capability(Capability.SHARED_BETWEEN_PROCESSES)
async def test_an_entry_is_claimed_by_its_jobs_owner_first(store: Store) -> None:
    """Its owner's dispatcher gets it at once; another instance only once that claim lapsed."""
    await store.create_job(record())  # owner i_a
    await store.commit("j_1", [StatusEvent(seq=1, status="running"), *texts(2, "hi")], progress(2))
    await end(store)
    assert await store.claim_outbox("i_b", NOW + 3 + OUTBOX_CLAIM_S / 2, NOW + 100, 10) == []
    assert [e.job_id for e in await store.claim_outbox("i_a", NOW + 4, NOW + 34, 10)] == ["j_1"]
    assert [e.job_id for e in await store.claim_outbox("i_a", NOW + 5, NOW + 35, 10)] == ["j_1"]  # again
    assert await store.claim_outbox("i_b", NOW + 20, NOW + 50, 10) == []  # i_a's claim holds
    assert [e.job_id for e in await store.claim_outbox("i_b", NOW + 36, NOW + 66, 10)] == ["j_1"]
    assert await store.claim_outbox("i_a", NOW + 40, NOW + 70, 10) == []  # i_b holds it now


# Leases only: a SQLite file is locked by one process, so its old writer cannot be
# alive beside a new owner (test_sqlite_lock.py).
@pytest.mark.needs_capability(Capability.LEASES)
async def test_a_handover_fences_the_old_writer_off(store: Store) -> None:
    await store.create_job(record(lease_until=NOW + 15), CAPACITY)  # written by this instance, i_a
    await store.commit("j_1", [StatusEvent(seq=1, status="running"), *texts(2, "durable")], progress(2))
    async with peer_of(store) as peer:
        [handover] = await peer.take_orphans("i_b", NOW + 20, NOW + 35)
        assert (handover.record.owner, handover.record.epoch, handover.record.seq) == ("i_b", 2, 2)
        assert [e.seq for e in handover.entries] == [1, 2]
        assert handover.record.status == "running"  # what to do with it is the new owner's policy
        with pytest.raises(JobEndedElsewhereError):
            await store.commit("j_1", texts(3, "late"), progress(3))  # the old writer
        with pytest.raises(JobEndedElsewhereError):  # again: it never takes the new owner's place
            await store.commit("j_1", texts(3, "late"), progress(3, status="interrupted"))
        assert [e.seq for e in await peer.read("j_1", 0, 10)] == [1, 2]
        await peer.commit("j_1", texts(3, "more"), progress(3))  # the new owner writes on
        held = await peer.get_job("j_1")
        assert held is not None and (held.seq, held.epoch, held.owner) == (3, 2, "i_b")


@pytest.mark.needs_capability(Capability.LEASES)
async def test_exactly_one_of_two_racing_instances_takes_an_orphan(store: Store) -> None:
    await store.create_job(record(lease_until=NOW + 15), CAPACITY)
    async with peer_of(store) as b, peer_of(store) as c:
        taken: dict[str, int] = {}

        async def take(peer: Store, owner: str) -> None:
            taken[owner] = len(await peer.take_orphans(owner, NOW + 20, NOW + 35))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(take, b, "i_b")
            nursery.start_soon(take, c, "i_c")
        assert sorted(taken.values()) == [0, 1]
        winner = "i_b" if taken["i_b"] else "i_c"
        held = await store.get_job("j_1")
        assert held is not None and (held.owner, held.epoch) == (winner, 2)
        # The winner holds a new lease: nobody takes it again before it lapses.
        assert await store.take_orphans("i_d", NOW + 30, NOW + 45) == []


async def test_an_end_whose_process_died_right_after_its_commit_is_notified(tmp_path: Path) -> None:
    """The terminal commit lands, and the process dies before anyone is told: the next
    runtime on the same file finds the outbox entry and notifies the user."""
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)  # the writer
        await store.create_job(record(owner="i_gone"))
        await store.commit(
            "j_1", [StatusEvent(seq=1, status="running"), *texts(2, "all ", "done")], progress(3)
        )
        await store.commit(
            "j_1", [StatusEvent(seq=4, status="completed")], progress(4, "completed", finished_at=NOW)
        )
        nursery.cancel_scope.cancel()
    await store.aclose()  # no notifier ran: the process is gone
    async with open_runtime(Config(drain_timeout=0), store=SqliteStore(tmp_path / "jobs.db")) as rt:
        items, _ = await rt.notifications_list(user="alice")
        assert [(n.type, n.job_id, n.body) for n in items] == [("ai.message.received", "j_1", "all done")]
        assert await rt.store.claim_outbox("i_x", time.time(), time.time() + 30, 10) == []  # carried out


async def test_an_end_left_by_a_dead_instance_is_notified_by_another_on_redis() -> None:
    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    try:
        dead = RedisStore(redis_url(), prefix=prefix)
        await dead.open()
        past = time.time() - 2 * OUTBOX_CLAIM_S  # its claim on the entry has lapsed by now
        await dead.create_job(record(created_at=past, updated_at=past))
        await dead.commit("j_1", [StatusEvent(seq=1, status="running"), *texts(2, "bye")], progress(2))
        ended = attrs.evolve(
            progress(3, "completed", finished_at=past, expires_at=past + 3600), updated_at=past
        )
        await dead.commit("j_1", [StatusEvent(seq=3, status="completed")], ended)
        await dead.aclose()
        async with open_runtime(Config(drain_timeout=0), store=RedisStore(redis_url(), prefix=prefix)) as rt:
            with trio.fail_after(10):
                while not (await rt.notifications_list(user="alice"))[0]:
                    await trio.sleep(0.05)
            items, _ = await rt.notifications_list(user="alice")
            assert [(n.type, n.job_id, n.body) for n in items] == [("ai.message.received", "j_1", "bye")]
    finally:
        await delete_prefix(prefix)


async def test_an_entry_nobody_claims_is_claimed_where_it_was_written_whatever_the_share() -> None:
    """A and B alive share the shards out. An entry left by a dead instance in B's share
    is not A's to find in its pass; an entry A writes claimed by nobody (a repaired end,
    ``wrote_entry(shard, "")``) is claimed by A's next claim, in whoever's share it is."""
    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    try:
        dead = RedisStore(redis_url(), prefix=prefix)
        await dead.open()
        past = time.time() - 2 * OUTBOX_CLAIM_S  # the dead instance's claims have lapsed
        shards = {}
        for n in range(12):
            job_id = f"j_{n}"
            await dead.create_job(record(job_id=job_id, message_id=f"m{n}", created_at=past, updated_at=past))
            ended = attrs.evolve(progress(1, "completed", finished_at=past), updated_at=past)
            await dead.commit(job_id, [StatusEvent(seq=1, status="completed")], ended)
            shards[job_id] = int(await dead.redis.hget(dead.keys.job(job_id), "shard") or 0)
        await dead.aclose()
        theirs = [job_id for job_id, shard in shards.items() if shard % 2 == 1]  # i_b's share
        assert theirs
        a, b = RedisStore(redis_url(), prefix=prefix), RedisStore(redis_url(), prefix=prefix)
        await a.open()
        await b.open()
        try:
            await a.announce("i_a", time.time() + 60)
            await b.announce("i_b", time.time() + 60)
            await a.announce("i_a", time.time() + 60)
            now = time.time()
            mine = {e.job_id for e in await a.claim_outbox("i_a", now, now + OUTBOX_CLAIM_S, 100)}
            assert mine == {job_id for job_id in shards if job_id not in theirs}
            held = {e.job_id for e in await a.claim_outbox("i_a", now, now + OUTBOX_CLAIM_S, 100)}
            assert held == mine  # its own claims again (not deleted yet), nothing of B's share
            a._housekeeping.wrote_entry(shards[theirs[0]], "")
            again = {e.job_id for e in await a.claim_outbox("i_a", now, now + OUTBOX_CLAIM_S, 100)}
            assert again - mine == {job_id for job_id in theirs if shards[job_id] == shards[theirs[0]]}
        finally:
            await b.aclose()
            await a.aclose()
    finally:
        await delete_prefix(prefix)


async def test_the_dispatcher_carries_out_each_entry_once(autojump_clock: trio.testing.MockClock) -> None:
    """Each end's notification, an abort's too; then the entry goes."""
    from backstream.actors.clock import WallClock
    from backstream.actors.dispatcher import Dispatcher
    from backstream.actors.notifier import Notifier
    from backstream.runtime.stores.memory import MemoryStore

    store, clock = MemoryStore(), WallClock()
    await store.open()
    notifier = Notifier(store, clock, max_per_user=10)
    dispatcher = Dispatcher(store, store, notifier, clock, instance_id="i_a")
    for job_id in ("j_done", "j_stop"):
        await store.create_job(record(job_id=job_id, message_id=job_id))
        await store.commit(job_id, [StatusEvent(seq=1, status="running"), *texts(2, "hello")], progress(2))
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run)
        with notifier.expecting_end("j_done") as done, notifier.expecting_end("j_stop") as stopped:
            await end_at(store, "j_done", "completed")
            await end_at(store, "j_stop", "aborted")
            with trio.fail_after(1):
                await done.wait()
                await stopped.wait()
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    items, _ = await store.list_notifications("alice", unread_only=False, limit=10)
    assert sorted((n.job_id, n.title, n.body) for n in items) == [
        ("j_done", "Response ready", "hello"),
        ("j_stop", "Response stopped", "hello"),
    ]
    assert await store.claim_outbox("i_a", NOW, NOW + 30, 10) == []
    assert dispatcher.statistics().delivered_total == 2


async def end_at(store: Store, job_id: str, status: str) -> None:
    await store.commit(job_id, [StatusEvent(seq=3, status=status)], progress(3, status, finished_at=NOW))  # type: ignore[arg-type]
