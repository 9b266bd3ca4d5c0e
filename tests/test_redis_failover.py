"""Failovers under a running job: a Sentinel group and a Cluster of our own, their primary
killed (``kill -9``) after it took writes its replica never got, and a primary demoted to
replica under the same address.

What makes a loss certain without ``WAIT``: the replica is frozen (SIGSTOP) and its link
cut from the primary's side (``CLIENT KILL TYPE replica``), so what the primary accepts
from then on reaches no replica; then the primary is killed and the replica, thawed,
is promoted. A write the runtime counted as done in that window is lost, unless it
waited for the replica.
"""

from __future__ import annotations

import logging
import signal
import uuid
from functools import partial
from pathlib import Path

import attrs
import coredis
import pytest
import trio

from backstream import Config, Runtime, StartedJob, open_runtime
from backstream.protocol.errors import UnavailableError
from backstream.protocol.events import Batch, StatusEvent, TextEvent
from backstream.protocol.records import SharedCapacity
from backstream.runtime.server.serve import make_store
from backstream.runtime.stores.redis import REMOTE_OUTAGE_S, RedisStore
from backstream.runtime.stores.redis_client import Replication
from tests.helpers import check_contiguous, joined_text, terminal
from tests.redis_servers import (
    HOST,
    RedisCluster,
    RedisNode,
    SentinelGroup,
    cli,
    redis_cluster_group,
    sentinel_group,
)
from tests.test_store_conformance import NOW, progress, record, texts

MSG = [{"role": "user", "content": "x"}]
WAIT_FOR_ONE = Replication(replicas=1, timeout=0.3)
CONFIG = Config(drain_timeout=0, flush_ms=20, store_outage_limit=60, lease_renew_interval=0.5)


async def lorem(rt: Runtime, tokens: int, rate: float, message_id: str = "m") -> StartedJob:
    return await rt.start_job(
        user="alice",
        thread_id="t",
        message_id=message_id,
        model="backstream/lorem",
        messages=MSG,
        params={"max_tokens": tokens, "tokens_per_s": rate},
    )


def isolate_replica(primary: RedisNode, replica: RedisNode) -> None:
    """From now on ``primary``'s writes reach no replica: the replica is frozen, then its
    link is closed from the primary's side (a frozen replica cannot connect again)."""
    assert replica.proc is not None
    # What came before (the job's record: its start is not waited for) is on the replica.
    assert cli(primary.port, "wait", "1", "5000") == "1"
    replica.proc.send_signal(signal.SIGSTOP)
    assert cli(primary.port, "client", "kill", "type", "replica") != "0"


async def status_on(port: int, key: str) -> str | None:
    async with coredis.Redis(host=HOST, port=port, decode_responses=True) as node:
        raw = await node.hget(key, "status")
        return None if raw is None else str(raw).strip('"')


async def watch_to_end(rt: Runtime, job_id: str, on_batch: object = None) -> list[Batch]:
    batches: list[Batch] = []
    async with rt.watch(job_id, user="alice") as watch:
        async for batch in watch:
            batches.append(batch)
            if on_batch is not None:
                await on_batch(batch)  # type: ignore[operator]
    return batches


async def stored_once_completed(url: str, prefix: str, job_id: str, timeout: float) -> tuple[str, str]:
    """The job's status and text as a store opened afresh on ``url`` reads them, once its
    status is ``completed`` or ``timeout`` has passed."""
    reader = RedisStore(url, prefix=prefix)
    await reader.open()
    try:
        with trio.move_on_after(timeout):
            while True:
                with trio.move_on_after(2):
                    try:
                        record = await reader.get_job(job_id)
                    except UnavailableError:
                        record = None
                    if record is not None and record.status == "completed":
                        break
                await trio.sleep(0.2)
        record = await reader.get_job(job_id)
        assert record is not None
        entries = await reader.read(job_id, 0, 100_000)
        text = "".join(entry.text for entry in entries if isinstance(entry, TextEvent))
        return record.status, text
    finally:
        await reader.aclose()


async def test_sentinel_failover_as_a_job_ends_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """The job ends while its primary's replica is cut off; the primary is then killed and
    the sentinels promote the replica. With WAIT the end was never acknowledged: the job
    writes it again on the new primary, found through the sentinels without a restart,
    and the store there holds the whole text and ``completed``. A later job runs there."""
    with sentinel_group(tmp_path) as group:
        prefix = f"bstest:{uuid.uuid4().hex[:8]}"
        store = RedisStore(group.url, prefix=prefix, replication=WAIT_FOR_ONE)
        old = group.primary()
        [replica] = [node for node in group.servers if node is not old]
        async with open_runtime(CONFIG, store=store) as rt:
            started = await lorem(rt, 60, 120)
            cut = False

            async def cut_off_after_some_text(batch: Batch) -> None:
                nonlocal cut
                if not cut and batch.to_seq > 5:
                    cut = True
                    await trio.to_thread.run_sync(isolate_replica, old, replica)

            with trio.fail_after(30):
                batches = await watch_to_end(rt, started.job_id, cut_off_after_some_text)
                key = store.keys.job(started.job_id)
                while await status_on(old.port, key) != "completed":  # the end reached the primary
                    await trio.sleep(0.05)
            old.kill()
            assert replica.proc is not None
            replica.proc.send_signal(signal.SIGCONT)
            await trio.to_thread.run_sync(group.wait_failover, old)
            # The old primary back, as the new one's replica: the retried end can be acknowledged.
            await trio.to_thread.run_sync(group.restore)
            with trio.fail_after(30):
                await rt.wait_idle()  # the job's end was written and acknowledged
            status, text = await stored_once_completed(group.url, prefix, started.job_id, timeout=30)
            check_contiguous(batches)
            assert terminal(batches).status == "completed" and len(joined_text(batches).split()) == 60
            assert (status, text) == ("completed", joined_text(batches))
            # The same runtime, no restart: a new job lands on the new primary.
            later = await lorem(rt, 5, 200, message_id="m2")
            with trio.fail_after(20):
                assert terminal(await watch_to_end(rt, later.job_id)).status == "completed"
            assert await status_on(replica.port, store.keys.job(later.job_id)) == "completed"


async def test_a_sentinel_failover_mid_job_is_followed_without_a_restart(
    sentinel_servers: SentinelGroup,
) -> None:
    """SENTINEL FAILOVER while a job streams: the old primary is demoted (its clients cut,
    then READONLY), the runtime finds the new one through the sentinels; the job ends
    ``completed`` with its whole text in the store, every flush having waited for a replica."""
    group = sentinel_servers
    prefix = f"bstest:{uuid.uuid4().hex[:8]}"
    replication = Replication(replicas=1, timeout=2.0, each_flush=True)
    store = RedisStore(group.url, prefix=prefix, replication=replication)
    old = group.primary()
    # Until the sentinels demote the old primary (seconds after the promotion), lease
    # renewals land there and are lost with it: the lease must outlast that.
    config = attrs.evolve(CONFIG, lease_ttl=60)
    async with open_runtime(config, store=store) as rt:
        started = await lorem(rt, 150, 100)
        failed_over = False

        async def fail_over(batch: Batch) -> None:
            nonlocal failed_over
            if not failed_over and batch.to_seq > 20:
                failed_over = True
                reply = await trio.to_thread.run_sync(
                    cli, group.sentinels[0].port, "sentinel", "failover", group.service
                )
                assert reply == "OK"

        with trio.fail_after(60):
            batches = await watch_to_end(rt, started.job_id, fail_over)
            # Sentinel demotes the old primary seconds after promoting the new one; writes
            # that land on the old one meanwhile find no replica to WAIT for: retried.
            await rt.wait_idle()
        new = await trio.to_thread.run_sync(group.wait_failover, old)
        await trio.to_thread.run_sync(partial(group.wait_healthy, sentinels_informed=False))
        status, text = await stored_once_completed(group.url, prefix, started.job_id, timeout=10)
        check_contiguous(batches)
        assert (status, text) == ("completed", joined_text(batches)) and len(text.split()) == 150
        assert await status_on(new.port, store.keys.job(started.job_id)) == "completed"


async def test_cluster_primary_of_a_job_killed_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """Three primaries with a replica each; the primary holding the job's slot takes its end
    while its replica is cut off, then is killed, and the cluster promotes the replica.
    WAIT ran on that node's connection: the end was never acknowledged, the job writes it
    again on the new primary (the cluster client follows the slot), nothing is lost."""
    with redis_cluster_group(tmp_path) as cluster:
        prefix = f"bstest:{uuid.uuid4().hex[:8]}"
        store = RedisStore(cluster.url, prefix=prefix, replication=WAIT_FOR_ONE)
        async with open_runtime(CONFIG, store=store) as rt:
            started = await lorem(rt, 60, 120)
            key = store.keys.job(started.job_id)
            old = await trio.to_thread.run_sync(cluster.primary_of_key, key)
            replica = await trio.to_thread.run_sync(_replica_of, cluster, old)
            cut = False

            async def cut_off_after_some_text(batch: Batch) -> None:
                nonlocal cut
                if not cut and batch.to_seq > 5:
                    cut = True
                    await trio.to_thread.run_sync(isolate_replica, old, replica)

            with trio.fail_after(30):
                batches = await watch_to_end(rt, started.job_id, cut_off_after_some_text)
                while await status_on(old.port, key) != "completed":
                    await trio.sleep(0.05)
            old.kill()
            assert replica.proc is not None
            replica.proc.send_signal(signal.SIGCONT)
            await trio.to_thread.run_sync(cluster.wait_healthy)
            assert await trio.to_thread.run_sync(cluster.primary_of_key, key) is replica
            await trio.to_thread.run_sync(cluster.restore)  # a replica for the new primary again
            with trio.fail_after(30):
                await rt.wait_idle()  # the job's end was written and acknowledged
            status, text = await stored_once_completed(cluster.url, prefix, started.job_id, timeout=30)
            check_contiguous(batches)
            assert (status, text) == ("completed", joined_text(batches))
            assert len(text.split()) == 60


def _replica_of(cluster: RedisCluster, primary: RedisNode) -> RedisNode:
    for node in cluster.live():
        replication = cli(node.port, "info", "replication")
        if "role:slave" in replication and f"master_port:{primary.port}" in replication:
            return node
    raise LookupError(f"no replica of {primary.port}")


async def test_a_primary_demoted_under_the_same_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``redis://`` names a server that becomes a replica (REPLICAOF) while jobs run: starting
    a job answers ``unavailable`` (retryable), the keeper skips its rounds without crashing,
    and a watcher on another instance is told ``unavailable`` within a few seconds."""
    caplog.set_level(logging.WARNING)
    a, b = RedisNode(tmp_path), RedisNode(tmp_path)
    b.args = ["--replicaof", HOST, str(a.port)]
    try:
        await trio.to_thread.run_sync(a.start)
        await trio.to_thread.run_sync(b.start)
        url = f"redis://{HOST}:{a.port}/0"
        prefix = f"bstest:{uuid.uuid4().hex[:8]}"
        async with (
            open_runtime(CONFIG, store=RedisStore(url, prefix=prefix)) as runs,
            open_runtime(CONFIG, store=RedisStore(url, prefix=prefix)) as elsewhere,
        ):
            started = await lorem(runs, 100_000, 50)
            async with elsewhere.watch(started.job_id, user="alice") as remote:
                with trio.fail_after(10):
                    await remote.__anext__()  # it streams from the store
                # b takes over, a follows it: a's address now answers writes with READONLY
                assert cli(b.port, "replicaof", "no", "one") == "OK"
                assert cli(a.port, "replicaof", HOST, str(b.port)) == "OK"
                demoted_at = trio.current_time()
                with pytest.raises(UnavailableError), trio.fail_after(REMOTE_OUTAGE_S + 5):
                    async for _batch in remote:
                        pass
                assert trio.current_time() - demoted_at < REMOTE_OUTAGE_S + 3
            for rt in (runs, elsewhere):
                with pytest.raises(UnavailableError):
                    await lorem(rt, 5, 100, message_id="m2")
            # The instance running the job cannot renew its lease: its keeper skips rounds.
            skipped = runs.statistics().keeper.skipped_rounds_total
            await trio.sleep(3 * CONFIG.lease_renew_interval)
            assert runs.statistics().keeper.skipped_rounds_total > skipped
            crashes = [r for r in caplog.records if r.name == "backstream.supervisor"]
            assert not crashes, [r.getMessage() for r in crashes]
    finally:
        a.kill()
        b.kill()


async def test_an_end_no_replica_acknowledged_is_not_done_until_one_does(
    sentinel_servers: SentinelGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--store-wait-replicas 1`` while the replica is frozen: a job's end lands on the
    primary but is not acknowledged, and its retry waits again rather than taking the
    landed write for done; once the replica answers, the retry is acknowledged and the
    end's later steps run (the user's capacity is freed)."""
    prefix = f"bstest:{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("BACKSTREAM_REDIS_PREFIX", prefix)
    store = make_store(sentinel_servers.url, Config(store_wait_replicas=1, store_wait_timeout=0.2))
    assert isinstance(store, RedisStore)
    [replica] = [node for node in sentinel_servers.servers if node is not sentinel_servers.primary()]
    assert replica.proc is not None
    await store.open()
    try:
        await store.create_job(record(), SharedCapacity(NOW, NOW + 15, max_jobs=10, max_jobs_per_user=10))
        await store.commit("j_1", texts(1, "a", "b"), progress(2, content_length=2))  # not waited for
        ended = [StatusEvent(seq=3, status="completed")]
        replica.proc.send_signal(signal.SIGSTOP)
        try:
            for _attempt in range(2):
                with pytest.raises(UnavailableError, match="did not replicate to 1 replicas"):
                    await store.commit("j_1", ended, progress(3, "completed", content_length=2))
            assert (await store.get_job("j_1")).status == "completed"  # type: ignore[union-attr]
            assert store.statistics().endings_unfinished == 0  # its later steps wait, unrun
            assert await store.redis.zcard(store.keys.user_running("alice")) == 1
        finally:
            replica.proc.send_signal(signal.SIGCONT)
        await store.commit("j_1", ended, progress(3, "completed", content_length=2))
        assert await store.redis.zcard(store.keys.user_running("alice")) == 0
    finally:
        await store.aclose()
    await trio.to_thread.run_sync(partial(sentinel_servers.wait_healthy, sentinels_informed=False))
