"""Two runtimes sharing one Redis: watch, abort, list, get and capacity across instances."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

import backstream
from backstream import Config, Runtime, open_runtime
from backstream.runtime.stores.redis import RedisStore
from tests.conftest import delete_prefix, redis_url, require_redis
from tests.helpers import check_contiguous, collect, joined_text, terminal

MSG = [{"role": "user", "content": "x"}]


@asynccontextmanager
async def two_instances(**config: object) -> AsyncIterator[tuple[Runtime, Runtime]]:
    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    settings = Config(drain_timeout=0, flush_ms=20, **config)  # type: ignore[arg-type]
    try:
        async with (
            open_runtime(settings, store=RedisStore(redis_url(), prefix=prefix)) as a,
            open_runtime(settings, store=RedisStore(redis_url(), prefix=prefix)) as b,
        ):
            assert a.instance_id != b.instance_id
            yield a, b
    finally:
        await delete_prefix(prefix)


async def lorem(
    rt: Runtime, message_id: str, tokens: int = 200, rate: float = 100, user: str = "alice"
) -> str:
    started = await rt.start_job(
        user=user,
        thread_id="t",
        message_id=message_id,
        model="backstream/lorem",
        messages=MSG,
        params={"max_tokens": tokens, "tokens_per_s": rate},
    )
    return started.job_id


async def test_watch_get_and_list_through_the_other_instance() -> None:
    async with two_instances() as (a, b):
        job_id = await lorem(a, "m1")
        batches = await collect(b, job_id)  # live, through Redis
        check_contiguous(batches)
        assert terminal(batches).status == "completed"
        assert len(joined_text(batches).split()) == 200
        info = await b.get_job(job_id, user="alice", include_content=True)
        assert info.content == joined_text(batches)
        assert [j.job_id for j in await b.list_jobs(user="alice")] == [job_id]
        again = await b.start_job(
            user="alice", thread_id="t", message_id="m1", model="backstream/lorem", messages=MSG
        )
        assert again.existing and again.job_id == job_id  # idempotent across instances
        with pytest.raises(backstream.NotFoundError):
            await b.get_job(job_id, user="bob")


async def test_abort_through_the_other_instance() -> None:
    async with two_instances() as (a, b):
        job_id = await lorem(a, "m1", tokens=10_000, rate=50)
        await trio.sleep(0.3)
        t0 = trio.current_time()
        result = await b.abort(job_id, user="alice")
        assert trio.current_time() - t0 < 1.0  # A stopped it within a second
        assert result.aborted and result.job.status == "aborted"
        assert (await a.get_job(job_id, user="alice")).job.status == "aborted"
        with trio.fail_after(1):
            await a.wait_idle()  # the job's actor is gone once its end's notification is made
        assert a.statistics().jobs.running == 0


async def test_capacity_holds_across_instances() -> None:
    async with two_instances(max_jobs_per_user=1, max_jobs=2) as (a, b):
        first = await lorem(a, "m1", tokens=10_000, rate=10)
        with pytest.raises(backstream.CapacityError):
            await lorem(b, "m2", tokens=10, rate=10)  # the user's slot is taken on A
        await lorem(b, "m3", tokens=10_000, rate=10, user="bob")
        with pytest.raises(backstream.CapacityError, match="cluster"):
            await lorem(a, "m4", tokens=10, rate=10, user="carol")  # two running in the cluster
        await a.abort(first, user="alice")  # a finished job gives its slot back
        await lorem(b, "m5", tokens=10, rate=10, user="carol")


async def test_a_lost_log_gives_gone_never_a_gap() -> None:
    """If Redis loses a job (a restart without persistence), its watchers elsewhere get gone."""
    from backstream import GoneError
    from tests.conftest import REDIS_HOST, REDIS_PORT

    async with two_instances() as (a, b):
        job_id = await lorem(a, "m1", tokens=10_000, rate=50)
        seqs = []
        with pytest.raises(GoneError):
            async with b.watch(job_id, user="alice") as batches:
                async for batch in batches:
                    seqs.append((batch.from_seq, batch.to_seq))
                    if len(seqs) == 3:
                        import coredis

                        async with coredis.Redis(host=REDIS_HOST, port=REDIS_PORT) as r:
                            store = b.store
                            assert isinstance(store, RedisStore)
                            await r.delete([store.keys.job(job_id), store.keys.log(job_id)])
        assert all(y[0] == x[1] + 1 for x, y in itertools.pairwise(seqs))  # no gap before it
        await a.abort(job_id, user="alice")


async def test_a_remote_watch_past_the_end_ends_when_the_job_ends() -> None:
    """Another instance's record may lag the live log, so the cursor is accepted; once the
    job has ended before it, the watch ends with bad_request instead of waiting forever."""
    async with two_instances() as (a, b):
        job_id = await lorem(a, "m1", tokens=20, rate=100)
        with trio.fail_after(10):
            with pytest.raises(backstream.BadRequestError, match="beyond"):
                await collect(b, job_id, after_seq=1000)
