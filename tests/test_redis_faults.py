"""Redis going away under a running job: our own redis-server on a spare port."""

from __future__ import annotations

import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import coredis
import pytest
import trio
from coredis.tokens import PureToken

from backstream import BackstreamError, Config, GoneError, Runtime, StartedJob, open_runtime
from backstream.protocol.events import ToolResultEvent
from backstream.runtime.stores.redis import RedisStore
from bench._procs import free_port, wait_for_port
from tests import sample_tools
from tests.conftest import REDIS_HOST, redis_url
from tests.helpers import check_contiguous, joined_text, store_reader, terminal
from tests.upstream_server import FakeUpstream, streams

MSG = [{"role": "user", "content": "x"}]


class RedisServer:
    """A redis-server of the test's own. ``persistence="aof"`` logs every write (appendfsync
    always); ``"snapshot"`` keeps only what an explicit SAVE wrote."""

    def __init__(self, directory: Path, persistence: str = "aof") -> None:
        self.directory = directory
        self.persistence = persistence
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        persist = (
            ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
            if self.persistence == "aof"
            else ["--save", "", "--appendonly", "no"]
        )
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                *persist,
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


async def lorem(rt: Runtime, tokens: int, rate: float) -> StartedJob:
    return await rt.start_job(
        user="alice",
        thread_id="t",
        message_id="m",
        model="backstream/lorem",
        messages=MSG,
        params={"max_tokens": tokens, "tokens_per_s": rate},
    )


@contextmanager
def own_redis(tmp_path: Path, persistence: str = "aof") -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is needed for the Redis fault tests")
    server = RedisServer(tmp_path, persistence)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.resume()
            server.kill()


@pytest.mark.parametrize("outage", ["restart", "pause"])
async def test_redis_outage_of_seconds_mid_job_loses_nothing(tmp_path: Path, outage: str) -> None:
    """Redis away for 5 s (killed and restarted with its data, or frozen): the job goes on,
    its watchers see no gap, and everything is written once Redis is back."""
    with own_redis(tmp_path) as redis:
        store = RedisStore(redis_url(redis.port), prefix=f"bstest:{uuid.uuid4().hex[:8]}")
        async with open_runtime(
            Config(drain_timeout=0, flush_ms=20, store_outage_limit=30), store=store
        ) as rt:
            started = await lorem(rt, 150, 50)
            batches, away = [], False
            with trio.fail_after(40):
                async with rt.watch(started.job_id, user="alice") as watch:
                    async for batch in watch:  # local watchers keep streaming while Redis is away
                        batches.append(batch)
                        if not away and batch.to_seq > 30:
                            away = True
                            redis.kill() if outage == "restart" else redis.pause()
                            await trio.sleep(5.0)
                            redis.start() if outage == "restart" else redis.resume()
                await rt.wait_idle()
            check_contiguous(batches)
            assert terminal(batches).status == "completed" and len(joined_text(batches).split()) == 150
            stored = await store.read(started.job_id, 0, 10_000)
            assert [e.seq for e in stored] == list(range(1, terminal(batches).seq + 1))
            info = await rt.get_job(started.job_id, user="alice", include_content=True)
            assert info.content == joined_text(batches) and info.job.status == "completed"
            assert store.statistics().jobs_writing == 0


async def test_redis_down_too_long_fails_the_job_unavailable(tmp_path: Path) -> None:
    with own_redis(tmp_path) as redis:
        store = RedisStore(redis_url(redis.port), prefix=f"bstest:{uuid.uuid4().hex[:8]}")
        async with open_runtime(
            Config(drain_timeout=0, flush_ms=20, store_outage_limit=1.0), store=store
        ) as rt:
            started = await lorem(rt, 1000, 50)
            batches = []
            async with rt.watch(started.job_id, user="alice") as watch:
                async for batch in watch:
                    batches.append(batch)
                    if batch.to_seq > 10 and redis.proc is not None and redis.proc.poll() is None:
                        redis.kill()
            end = terminal(batches)
            assert end.status == "failed" and end.error is not None and end.error.code == "unavailable"
            check_contiguous(batches)
            assert 10 < len(joined_text(batches).split()) < 1000  # what it had, kept for its watchers


async def test_redis_outage_during_an_approval_wait(tmp_path: Path, upstream: FakeUpstream) -> None:
    """The job waits for a person while Redis restarts: the decision still lands, the job ends
    ``completed``."""
    from tests.test_tools import registry, start, tool_turn

    upstream.script(tool_turn(("c1", "delete_files", '{"a": 1, "b": 2}')), streams(["done"]))
    with own_redis(tmp_path) as redis:
        store = RedisStore(redis_url(redis.port), prefix=f"bstest:{uuid.uuid4().hex[:8]}")
        config = Config(upstream_url=upstream.url, drain_timeout=0, flush_ms=20)
        async with open_runtime(config, store=store, tools=registry(sample_tools.delete_files)) as rt:
            job_id = await start(rt, ["delete_files"])
            with trio.fail_after(5):
                while (await rt.get_job(job_id, user="alice")).job.status != "awaiting_approval":
                    await trio.sleep(0.02)
            redis.kill()
            await trio.sleep(6.0)  # longer than the decision wait's poll: the wait meets the outage
            redis.start()
            await trio.sleep(1.0)
            with trio.fail_after(10):
                summary = await rt.approve(job_id, "c1", True, user="alice")
                assert summary.status in ("running", "completed")
                await rt.wait_idle()
            info = await rt.get_job(job_id, user="alice", include_content=True)
            assert info.job.status == "completed" and info.content == "done"
            assert [(c.output, c.is_error) for c in info.tool_calls] == [("3", False)]
            stored = await store.read(job_id, 0, 100)
            assert [e.seq for e in stored] == list(range(1, info.job.seq + 1))
            assert any(isinstance(e, ToolResultEvent) for e in stored)


async def test_redis_back_from_an_older_snapshot(tmp_path: Path) -> None:
    """Redis restarts from a snapshot older than the job's last writes: the job writes again
    what the store lost, and a reader through the store sees the whole log, never a gap."""
    with own_redis(tmp_path, persistence="snapshot") as redis:
        prefix = f"bstest:{uuid.uuid4().hex[:8]}"
        store = RedisStore(redis_url(redis.port), prefix=prefix)
        async with open_runtime(
            Config(drain_timeout=0, flush_ms=20, store_outage_limit=30), store=store
        ) as rt:
            started = await lorem(rt, 150, 50)
            batches, saved, restored = [], False, False
            with trio.fail_after(30):
                async with rt.watch(started.job_id, user="alice") as watch:
                    async for batch in watch:
                        batches.append(batch)
                        if not saved and batch.to_seq > 20:
                            saved = True
                            async with coredis.Redis(host=REDIS_HOST, port=redis.port) as r:
                                await r.save()  # the snapshot Redis will come back from
                        elif saved and not restored and batch.to_seq > 60:
                            restored = True
                            await trio.sleep(0.2)  # writes after the snapshot land, then are lost
                            redis.kill()
                            redis.start()
                await rt.wait_idle()
            check_contiguous(batches)
            assert terminal(batches).status == "completed"
            # A reader through the store (as on another instance) gets the whole log.
            reader = store_reader(store, started.job_id)
            with trio.fail_after(5):
                replay = [b async for b in reader]
            check_contiguous(replay)
            assert joined_text(replay) == joined_text(batches)
            assert (await rt.get_job(started.job_id, user="alice")).job.seq == terminal(batches).seq
            assert store.statistics().commits_replanned >= 1  # the commit that found the log behind


async def test_a_log_behind_its_record_is_gone_never_a_hang(tmp_path: Path) -> None:
    """A record that says more than its log holds (a restored snapshot, a lost write): a
    reader through the store gets gone at once, and does not spin."""
    with own_redis(tmp_path) as redis:
        prefix = f"bstest:{uuid.uuid4().hex[:8]}"
        store = RedisStore(redis_url(redis.port), prefix=prefix)
        async with open_runtime(Config(drain_timeout=0, flush_ms=20), store=store) as rt:
            started = await lorem(rt, 30, 1000)
            await rt.wait_idle()
            record = await store.get_job(started.job_id)
            assert record is not None and record.status == "completed"
            async with coredis.Redis(host=REDIS_HOST, port=redis.port, decode_responses=True) as r:
                # The record says completed at its seq; its log loses its last batch.
                last = await r.xrevrange(store.keys.log(started.job_id), count=1)
                assert await r.xdel(store.keys.log(started.job_id), [last[0].identifier]) == 1
                before = int((await r.info("stats"))["total_commands_processed"])
                reader = store_reader(store, started.job_id)
                seen = []
                with trio.fail_after(3), pytest.raises(GoneError):
                    async for batch in reader:
                        seen.append(batch)
                after = int((await r.info("stats"))["total_commands_processed"])
            check_contiguous(seen)
            assert seen and seen[-1].to_seq < record.seq  # what the log held, without a gap
            assert after - before < 50  # no busy loop of reads


async def test_a_writer_whose_job_was_recovered_elsewhere_is_fenced_off(tmp_path: Path) -> None:
    """Instance a renews its leases too late (every 30 s, for a lease_ttl of 2 s), as if it
    had stalled: the other instance takes the job for an orphan and ends it interrupted in
    epoch 2. The instance that still runs it must not write after that ending: the stored
    log keeps exactly one terminal status, and the job stops here too."""
    with own_redis(tmp_path) as redis:
        url, prefix = f"redis://{REDIS_HOST}:{redis.port}/0", f"fence:{uuid.uuid4().hex[:8]}"
        # b ends what it takes over (the interrupt policy): this test is about the fence.
        config = Config(
            drain_timeout=0,
            lease_ttl=2,
            lease_renew_interval=0.5,
            flush_ms=20,
            continuations={"*": "interrupt"},
        )
        late = Config(drain_timeout=0, lease_ttl=2, lease_renew_interval=30, flush_ms=20)
        async with (
            open_runtime(late, store=RedisStore(url, prefix=prefix)) as a,
            open_runtime(config, store=RedisStore(url, prefix=prefix)) as b,
        ):
            started = await lorem(a, tokens=300, rate=50)  # 6 s; its lease lapses after 2
            with trio.fail_after(30):
                await a.wait_idle()  # the job stops on a as well
            entries = await b.store.read(started.job_id, 0, 100_000)
            terminals = [e for e in entries if getattr(e, "is_terminal", False)]
            assert [e.status for e in terminals] == ["interrupted"]  # type: ignore[attr-defined]
            assert entries[-1] is terminals[0]
            assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
            record = (await b.get_job(started.job_id, user="alice")).job
            assert (record.status, record.epoch, record.seq) == ("interrupted", 2, len(entries))


async def test_redis_frozen_past_the_lease_does_not_end_this_instances_own_jobs(tmp_path: Path) -> None:
    """Redis frozen longer than lease_ttl, with one instance: the keeper's renewal waits
    through the freeze and lands with a lease that has lapsed meanwhile. The same round's
    orphan recovery must not take the instance's own running job for an orphan: the job
    goes on and completes, in epoch 1."""
    with own_redis(tmp_path) as redis:
        store = RedisStore(redis_url(redis.port), prefix=f"bstest:{uuid.uuid4().hex[:8]}")
        config = Config(drain_timeout=0, lease_ttl=2, lease_renew_interval=0.5, flush_ms=20)
        async with open_runtime(config, store=store) as rt:
            started = await lorem(rt, tokens=250, rate=50)
            await trio.sleep(1.0)
            redis.pause()
            await trio.sleep(3.5)  # a renewal round is under way when it freezes
            redis.resume()
            with trio.fail_after(30):
                await rt.wait_idle()
            record = (await rt.get_job(started.job_id, user="alice")).job
            assert (record.status, record.epoch) == ("completed", 1)
            assert rt.statistics().keeper.recovered_total == 0


async def test_a_subscription_redis_pauses_past_its_acknowledgement_is_retried(tmp_path: Path) -> None:
    """Redis pauses its clients (CLIENT PAUSE, as a failover does) just as the store
    subscribes again: coredis gives up waiting for the acknowledgement after a second and
    raises from its task group. The listener subscribes again once Redis answers; it does
    not crash. (An instance subscribes only to what it follows: here, one job.)"""
    with own_redis(tmp_path) as redis:
        store = RedisStore(redis_url(redis.port), prefix=f"bstest:{uuid.uuid4().hex[:8]}")
        await store.open()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                following = store.follow_job("j_followed")
                following.__enter__()
                with trio.fail_after(5):
                    while store.statistics().subscriber.channels_subscribed != 1:
                        await trio.sleep(0.01)
                async with trio.open_nursery() as pings:  # idle connections: the next subscription
                    for _ in range(4):  # goes out at once, with no handshake (which would wait)
                        pings.start_soon(store.ping)
                async with (
                    coredis.Redis(host=REDIS_HOST, port=redis.port) as admin,
                    admin.pipeline(transaction=True) as both,  # no subscription gets in between
                ):
                    both.client_kill(type_=PureToken.PUBSUB)
                    both.client_pause(5000, PureToken.ALL)  # past coredis' three tries
                # Subscribed again once the pause ends (``subscribed`` is a new event after
                # each loss, so it is polled).
                with trio.fail_after(20):
                    while not (
                        store.statistics().outage_retries
                        and store.statistics().subscriber.channels_subscribed == 1
                    ):
                        await trio.sleep(0.1)
                following.__exit__(None, None, None)
                nursery.cancel_scope.cancel()
        finally:
            await store.aclose()


async def test_while_redis_is_away_another_users_running_job_answers_as_a_missing_one(
    tmp_path: Path,
) -> None:
    """Another user's job is not_found exactly like a job that does not exist, also while
    Redis is away: a running job's id must not answer not_found at once where a missing id
    answers unavailable (that would tell who has a job running)."""
    with own_redis(tmp_path) as redis:
        store = RedisStore(redis_url(redis.port), prefix=f"bstest:{uuid.uuid4().hex[:8]}")
        async with open_runtime(Config(drain_timeout=0, flush_ms=20), store=store) as rt:
            started = await lorem(rt, tokens=100, rate=50)
            missing = "j_" + started.job_id[2:][::-1]

            async def answers(job_id: str) -> list[str]:
                async def watch() -> None:
                    async with rt.watch(job_id, user="bob"):
                        pass

                calls = [
                    lambda: rt.get_job(job_id, user="bob"),
                    lambda: rt.abort(job_id, user="bob"),
                    lambda: rt.approve(job_id, "c1", True, user="bob"),
                    watch,
                ]
                out = []
                for call in calls:
                    with pytest.raises(BackstreamError) as raised:
                        await call()
                    out.append(raised.value.code)
                return out

            assert await answers(started.job_id) == await answers(missing) == ["not_found"] * 4
            redis.kill()
            try:
                assert await answers(started.job_id) == await answers(missing) == ["unavailable"] * 4
            finally:
                redis.start()
            with trio.fail_after(30):
                await rt.wait_idle()
            assert (await rt.get_job(started.job_id, user="alice")).job.status == "completed"


async def test_a_job_that_ends_while_redis_is_away_still_notifies_its_user(tmp_path: Path) -> None:
    """The end of a job nobody watches calls for a notification; Redis is down (restarting
    with its data) when the job asks for it. The request waits out the outage and the
    notification is created once Redis is back (before, the one attempt failed and the
    notification was lost)."""
    with own_redis(tmp_path) as redis:
        store = RedisStore(redis_url(redis.port), prefix=f"bstest:{uuid.uuid4().hex[:8]}")
        async with open_runtime(Config(drain_timeout=0, flush_ms=20), store=store) as rt:
            started = await lorem(rt, 5, 50)
            await rt.wait_idle()
            assert (await rt.notifications_list(user="alice"))[0][0].job_id == started.job_id
            redis.kill()
            try:
                async with trio.open_nursery() as nursery:
                    created: list[bool] = []

                    async def notify() -> None:
                        created.append(
                            await rt.notifier.job_ended(
                                job_id="j_other",
                                user="alice",
                                thread_id="t",
                                status="completed",
                                content="done",
                                error=None,
                            )
                        )

                    nursery.start_soon(notify)
                    await trio.sleep(3.0)  # several attempts meet no Redis
                    assert not created
                    redis.start()
            finally:
                if redis.proc is None or redis.proc.poll() is not None:
                    redis.start()
            assert created == [True]
            listed, _unread = await rt.notifications_list(user="alice")
            assert sorted(n.job_id for n in listed) == sorted([started.job_id, "j_other"])
