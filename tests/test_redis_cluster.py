"""Redis Cluster through coredis' cluster client: each job's and each user's keys have a slot
of their own (a hash tag each), the instance set another (``test_redis_slots`` checks that
every script call stays in one)."""

from __future__ import annotations

import uuid

import trio

from backstream import Config, open_runtime
from backstream.runtime.stores.redis import RedisStore
from tests.helpers import check_contiguous, collect, joined_text, terminal

MSG = [{"role": "user", "content": "x"}]


async def test_two_instances_on_a_cluster(redis_cluster: str) -> None:
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    config = Config(drain_timeout=0, flush_ms=20)
    async with (
        open_runtime(config, store=RedisStore(redis_cluster, prefix=prefix)) as a,
        open_runtime(config, store=RedisStore(redis_cluster, prefix=prefix)) as b,
    ):
        started = await a.start_job(
            user="alice",
            thread_id="t",
            message_id="m",
            model="backstream/lorem",
            messages=MSG,
            params={"max_tokens": 60, "tokens_per_s": 200},
        )
        batches = await collect(b, started.job_id)  # live through the other instance, over the cluster
        check_contiguous(batches)
        assert terminal(batches).status == "completed" and len(joined_text(batches).split()) == 60
        again = await b.start_job(
            user="alice", thread_id="t", message_id="m", model="backstream/lorem", messages=MSG
        )
        assert again.existing and again.job_id == started.job_id
        slow = await a.start_job(
            user="alice",
            thread_id="t",
            message_id="m2",
            model="backstream/lorem",
            messages=MSG,
            params={"max_tokens": 10_000, "tokens_per_s": 50},
        )
        await trio.sleep(0.2)
        result = await b.abort(slow.job_id, user="alice")
        assert result.aborted and result.job.status == "aborted"
        assert [j.job_id for j in await b.list_jobs(user="alice")] == [slow.job_id, started.job_id]
        with trio.fail_after(5):
            await a.wait_idle()  # A's job has ended, its end's notification made
        items, _ = await b.notifications_list(user="alice")
        # The first was watched to the end; the second was stopped with nobody watching.
        assert [(n.job_id, n.title) for n in items] == [(slow.job_id, "Response stopped")]
        assert a.store.cluster and isinstance(a.store, RedisStore)
