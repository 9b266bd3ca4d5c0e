"""Jobs, users and shards spread over a Redis Cluster's slots and nodes, and every Lua
script call of the store touches one slot only (read back from the nodes' ``MONITOR``);
what a crash between two one-slot steps leaves is finished by the next create or
``take_orphans``."""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import coredis
import coredis.exceptions
import pytest

from backstream import CapacityError
from backstream.protocol.events import StatusEvent
from backstream.protocol.records import NotificationRecord, SharedCapacity
from backstream.runtime.stores import redis_quota, redis_scripts, redis_seats
from backstream.runtime.stores.redis import RedisStore
from backstream.runtime.stores.redis_clock import RedisFrame
from backstream.runtime.stores.redis_keys import SHARDS
from tests.conftest import delete_prefix, redis_url, require_redis
from tests.test_store_conformance import NOW, progress, record, texts

CAPACITY = SharedCapacity(now=NOW, lease_until=NOW + 15, max_jobs=2, max_jobs_per_user=5)
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _port_of(url: str) -> int:
    return urllib.parse.urlsplit(url.replace("+cluster://", "://")).port or 6379


@asynccontextmanager
async def _opened(url: str, prefix: str, frame: RedisFrame | None = None) -> AsyncIterator[RedisStore]:
    store = RedisStore(url, prefix=prefix, frame=frame)
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()


async def _node_ports(url: str) -> list[int]:
    async with coredis.Redis(port=_port_of(url), decode_responses=True) as node:
        # The primaries: a replica answers writes (the cleanup's) with MOVED.
        return [int(d["port"]) for d in await node.cluster_nodes() if "master" in str(d["flags"])]


@contextmanager
def _monitors(ports: list[int], directory: Path) -> Iterator[list[Path]]:
    """``redis-cli MONITOR`` on each node, into a file each, until the block ends."""
    files = [directory / f"monitor-{port}.log" for port in ports]
    procs = []
    for port, path in zip(ports, files, strict=True):
        with path.open("w") as out:
            procs.append(subprocess.Popen(["redis-cli", "-p", str(port), "monitor"], stdout=out))
    try:
        deadline = time.monotonic() + 5
        while not all(path.read_text().startswith("OK") for path in files):
            assert time.monotonic() < deadline, "MONITOR did not start"
            time.sleep(0.02)
        yield files
    finally:
        time.sleep(0.2)  # the last commands reach the files
        for proc in procs:
            proc.terminate()
            proc.wait(5)


def _script_calls(files: list[Path]) -> list[tuple[str, list[str]]]:
    """Every ``EVALSHA`` the nodes ran: its sha and its keys."""
    calls = []
    for path in files:
        for line in path.read_text().splitlines():
            tokens = _QUOTED.findall(line)
            if len(tokens) >= 3 and tokens[0].upper() == "EVALSHA":
                count = int(tokens[2])
                calls.append((tokens[1], tokens[3 : 3 + count]))
    return calls


async def _workload(url: str, prefix: str) -> None:
    """Every script of the store, on two jobs of two users, and a second instance."""
    frame = RedisFrame()  # the test's times are one clock's
    async with _opened(url, prefix, frame) as a, _opened(url, prefix, frame) as b:
        await a.create_job(record("j_a", user="alice", message_id="m", lease_until=NOW + 15), CAPACITY)
        await a.create_job(record("j_b", user="bob", message_id="m", lease_until=NOW + 15), CAPACITY)
        with pytest.raises(CapacityError, match="cluster"):  # the user's step undone
            await a.create_job(record("j_c", user="carol", message_id="m"), CAPACITY)
        await a.commit("j_a", [StatusEvent(seq=1, status="running"), *texts(2, "hi")], progress(2))
        await a.watch_started("j_a", "w_1", NOW + 2)
        await a.renew_watches([("j_a", "w_1")], NOW + 3)
        await a.renew_leases("i_a", ["j_a"], NOW + 16)
        ended = progress(3, "completed", finished_at=NOW + 3, expires_at=NOW + 100)
        await a.commit("j_a", [StatusEvent(seq=3, status="completed")], ended)
        note = NotificationRecord(
            notification_id="n_1",
            user="alice",
            type="ai.message.received",
            job_id="j_a",
            thread_id="t1",
            title="done",
            body="hi",
            created_at=NOW + 4,
        )
        assert await a.notify_unwatched(note, NOW + 4, 10)
        assert [e.job_id for e in await a.claim_outbox("i_a", NOW + 5, NOW + 35, 10)] == ["j_a"]
        [handover] = await b.take_orphans("i_b", NOW + 20, NOW + 35)  # j_b's lease lapsed
        assert handover.record.job_id == "j_b" and handover.record.owner == "i_b"
        assert await a.stored_bytes("alice") > 0  # charged at create, settled at the end
        assert await b.delete_expired(NOW + 200) == ["j_a"]  # and released by the sweep
        assert await a.stored_bytes("alice") == 0
        assert await a.take_seat("alice", "streams", "s_1", 2, 15)
        assert await b.take_seat("bob", "connections", "s_2", 2, 15)
        await a.renew_seats([("alice", "streams", "s_1"), ("bob", "connections", "s_2")], 15)
        await a.release_seat("alice", "streams", "s_1")


async def test_each_script_call_touches_one_slot_and_entities_spread(
    redis_cluster: str, tmp_path: Path
) -> None:
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    ports = await _node_ports(redis_cluster)
    with _monitors(ports, tmp_path) as files:
        await _workload(redis_cluster, prefix)
    calls = _script_calls(files)

    async with coredis.Redis(port=ports[0], decode_responses=True) as node:

        async def slots_of(keys: list[str]) -> set[int]:
            return {await node.cluster_keyslot(key) for key in keys}

        ours = [(sha, keys) for sha, keys in calls if keys and prefix in keys[0]]
        for sha, keys in ours:
            assert len(await slots_of(keys)) == 1, (sha, keys)
        bodies = [getattr(redis_scripts, name) for name in redis_scripts.__all__]
        bodies += redis_quota.SCRIPTS.values()
        bodies += [redis_seats.SEAT_TAKE, redis_seats.SEAT_RENEW]
        assert {hashlib.sha1(body.encode()).hexdigest() for body in bodies} <= {sha for sha, _ in ours}

        # Two jobs of two users: four slots, and a shard's a fifth.
        k = RedisStore(redis_cluster, prefix=prefix).keys
        job_a = await slots_of([k.job("j_a"), k.log("j_a"), k.watching("j_a"), k.notified("j_a", "x")])
        job_b = await slots_of([k.job("j_b"), k.log("j_b")])
        alice = await slots_of(
            [
                k.msg("alice", "m"),
                k.user_running("alice"),
                *k.inbox("alice"),
                k.stored_bytes("alice"),
                k.stored_charges("alice"),
                k.stored_lapse("alice"),
                k.seats("alice", "streams"),
            ]
        )
        bob = await slots_of([k.msg("bob", "m"), k.user_running("bob"), k.seats("bob", "connections")])
        shard = await slots_of([k.running(3), k.expiry(3), k.expiry_taken(3), k.outbox(3), k.scan(3)])
        groups = [job_a, job_b, alice, bob, shard]
        assert all(len(group) == 1 for group in groups)
        assert len(set().union(*groups)) == 5
    await _delete_cluster_prefix(ports, prefix)


async def test_jobs_and_shards_land_on_every_primary(redis_cluster: str) -> None:
    """Keys of one deployment on each of the three primaries: its jobs' and its shards'."""
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    ports = await _node_ports(redis_cluster)
    async with _opened(redis_cluster, prefix) as store:
        many = SharedCapacity(now=NOW, lease_until=NOW + 15, max_jobs=100, max_jobs_per_user=100)
        for i in range(30):
            await store.create_job(record(f"j_{i}", user=f"u{i % 3}", message_id=f"m{i}"), many)
    per_node: dict[int, dict[str, int]] = {}
    for port in ports:
        async with coredis.Redis(port=port, decode_responses=True) as node:
            names = [key async for key in node.scan_iter(match="{" + prefix + ":*")]
        per_node[port] = {
            kind: sum(1 for name in names if name.startswith("{" + f"{prefix}:{kind}:"))
            for kind in ("job", "user", "shard")
        }
    assert all(counts["job"] > 0 and counts["shard"] > 0 for counts in per_node.values()), per_node
    assert sum(counts["job"] for counts in per_node.values()) == 30
    await _delete_cluster_prefix(ports, prefix)


async def _delete_cluster_prefix(ports: list[int], prefix: str) -> None:
    for port in ports:
        async with coredis.Redis(port=port, decode_responses=True) as node:
            for pattern in ("{" + prefix + "}:*", "{" + prefix + ":*"):
                async for key in node.scan_iter(match=pattern):
                    await node.delete([key])


# -- what a crash between two steps leaves, on a single Redis ------------------------------


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisStore]:
    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    try:
        async with _opened(redis_url(), prefix) as store:
            yield store
    finally:
        await delete_prefix(prefix)


async def test_a_create_that_stopped_after_its_user_step_is_finished_by_the_next(
    redis_store: RedisStore,
) -> None:
    store, k = redis_store, redis_store.keys
    # What the user slot's step leaves: the message id names j_1, which has no record.
    await store.redis.set(k.msg("alice", "m1"), "j_1")
    assert await store.find_job("alice", "m1") is None  # nobody sees a half-made job
    assert await store.list_jobs("alice") == []
    made, created = await store.create_job(record("j_2", lease_until=NOW + 15), CAPACITY)
    assert created and made.job_id == "j_1"  # finished under the id the message id names
    found = await store.find_job("alice", "m1")
    assert found is not None and found.job_id == "j_1"
    again, created = await store.create_job(record("j_3", lease_until=NOW + 15), CAPACITY)
    assert not created and again.job_id == "j_1"
    assert await store.redis.zscore(k.running(await _shard(store, "j_1")), "j_1") is not None  # slot taken


async def test_a_terminal_commit_that_stopped_after_its_first_step_is_finished_by_take_orphans(
    redis_store: RedisStore,
) -> None:
    store, k = redis_store, redis_store.keys
    one = SharedCapacity(now=NOW, lease_until=NOW + 15, max_jobs=1, max_jobs_per_user=1)
    await store.create_job(record(lease_until=NOW + 15), one)
    await store.commit(
        "j_1",
        [StatusEvent(seq=1, status="completed")],
        progress(1, "completed", finished_at=NOW + 1, expires_at=NOW + 50),
    )
    # Back to what the job slot's step alone leaves: the running entries still there, the
    # outbox entry only in the record.
    shard = await _shard(store, "j_1")
    lease_at = float(await store.redis.hget(k.job("j_1"), "lease_at") or 0)
    await store.redis.zadd(k.running(shard), {"j_1": lease_at})
    await store.redis.zadd(k.user_running("alice"), {"j_1": lease_at})
    await store.delete_outbox(["j_1"])
    await store.redis.zrem(k.expiry(shard), ["j_1"])
    with pytest.raises(CapacityError):
        await store.create_job(record("j_2", message_id="m2"), one)

    assert await store.take_orphans("i_b", NOW + 20, NOW + 35) == []  # ended: nothing to take
    [entry] = await store.claim_outbox("i_b", NOW + 20, NOW + 50, 10)  # unclaimed: any instance
    assert (entry.job_id, entry.status) == ("j_1", "completed")
    assert await store.redis.zscore(k.expiry(shard), "j_1") == NOW + 50
    await store.delete_outbox(["j_1"])
    assert await store.take_orphans("i_b", NOW + 30, NOW + 45) == []
    assert await store.claim_outbox("i_b", NOW + 100, NOW + 130, 10) == []  # never written twice
    made, created = await store.create_job(record("j_2", message_id="m2"), one)  # both slots free
    assert created and made.job_id == "j_2"


async def test_a_full_cluster_leaves_no_trace_of_the_refused_job(redis_store: RedisStore) -> None:
    store, k = redis_store, redis_store.keys
    one = SharedCapacity(now=NOW, lease_until=NOW + 15, max_jobs=1, max_jobs_per_user=5)
    await store.create_job(record("j_1", user="bob"), one)
    with pytest.raises(CapacityError, match="cluster"):
        await store.create_job(record("j_2"), one)
    assert await store.redis.get(k.msg("alice", "m1")) is None
    assert await store.redis.zcard(k.user_running("alice")) == 0
    assert await store.list_jobs("alice") == []
    later = SharedCapacity(now=NOW + 16, lease_until=NOW + 31, max_jobs=1, max_jobs_per_user=5)
    made, created = await store.create_job(record("j_3"), later)  # bob's lease lapsed
    assert created and made.job_id == "j_3"


async def test_a_terminal_commit_whose_later_steps_failed_is_finished_by_its_retry(tmp_path: Path) -> None:
    """The user's keys refused (a Redis ACL) after the job's step landed: the commit
    raises, and its retry runs the later steps, once."""
    from tests.test_redis_faults import own_redis

    prefix = "bstest:acl"
    with own_redis(tmp_path) as server:
        async with _opened(redis_url(server.port), prefix) as store:
            k = store.keys
            await store.create_job(record(lease_until=NOW + 15), CAPACITY)
            await store.commit("j_1", [StatusEvent(seq=1, status="running")], progress(1))
            patterns = ["~{" + prefix + ":job:*", "~{" + prefix + ":shard:*", "~{" + prefix + "}:*"]
            await store.redis.acl_setuser("default", "resetkeys", *patterns)
            ended = progress(2, "completed", finished_at=NOW + 2, expires_at=NOW + 50)
            with pytest.raises(coredis.exceptions.RedisError):
                await store.commit("j_1", [StatusEvent(seq=2, status="completed")], ended)
            job = await store.get_job("j_1")
            assert job is not None and job.status == "completed"  # the end landed
            assert store.statistics().endings_unfinished == 1
            shard = await _shard(store, "j_1")
            assert await store.redis.zscore(k.running(shard), "j_1") is not None  # listed: found again
            await store.redis.acl_setuser("default", "allkeys")

            await store.commit("j_1", [StatusEvent(seq=2, status="completed")], ended)  # the retry
            assert store.statistics().endings_unfinished == 0
            assert await store.redis.zscore(k.running(shard), "j_1") is None
            assert await store.redis.zscore(k.user_running("alice"), "j_1") is None
            [entry] = await store.claim_outbox("i_a", NOW + 3, NOW + 33, 10)  # claimed by its owner
            assert (entry.job_id, entry.status) == ("j_1", "completed")


async def _shard(store: RedisStore, job_id: str) -> int:
    """The shard a job's record names."""
    raw = await store.redis.hget(store.keys.job(job_id), "shard")
    assert raw is not None
    return int(raw)


async def test_the_layout_names_a_tag_per_job_user_and_shard() -> None:
    """Every key under a job's, a user's or a shard's tag, or the prefix's own (the marker)."""
    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    try:
        async with _opened(redis_url(), prefix) as store:
            await store.create_job(record("j_1", lease_until=NOW + 15), CAPACITY)
            await store.commit("j_1", [StatusEvent(seq=1, status="running"), *texts(2, "hi")], progress(2))
            shard = await _shard(store, "j_1")
            names = {key async for key in store.redis.scan_iter(match=f"*{prefix}*")}
        job, user = "{" + prefix + ":job:j_1}", "{" + prefix + ":user:alice}"
        expected = {
            f"{job}:job:j_1",
            f"{job}:log:j_1",
            f"{user}:msg:5:alice:m1",
            f"{user}:running:5:alice",
            "{" + f"{prefix}:shard:{shard}" + "}:running",
            "{" + prefix + "}:layout",
        }
        assert expected <= names
        tags = [job, user, *("{" + f"{prefix}:shard:{i}" + "}" for i in range(SHARDS)), "{" + prefix + "}"]
        assert all(any(name.startswith(tag + ":") for tag in tags) for name in names), names
    finally:
        await delete_prefix(prefix)
