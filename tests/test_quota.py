"""The per-user quota of stored bytes: refused at every front door, held across instances
sharing one Redis, freed by the sweep, counted in the metrics; what a crash between
Redis's one-slot steps leaves of a charge. (What every store does: the conformance suite.)"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import openai
import pytest
import trio
from trio_websocket import open_websocket_url

import backstream
from backstream import Config, MemoryStore, open_runtime
from backstream.protocol.events import StatusEvent
from backstream.protocol.records import JobRequest, SharedCapacity, log_bytes, request_bytes
from backstream.runtime.server.metrics import metrics_text
from backstream.runtime.stores.redis import RedisStore
from backstream.runtime.stores.redis_client import SAFETY_TTL_S
from backstream.runtime.stores.redis_keys import SHARDS
from backstream.runtime.stores.redis_steps import SHARD_FIELD
from tests.conftest import delete_prefix, redis_url, require_redis
from tests.helpers import collect
from tests.test_ai_sdk import ai_sdk_server
from tests.test_ai_sdk_server import response, send_frame, url
from tests.test_instances import two_instances
from tests.test_responses_api import in_thread
from tests.test_responses_api import served as served_http
from tests.test_store_conformance import NOW, progress, record, texts
from tests.upstream_server import FakeUpstream
from tests.ws_helpers import raw_client, served, start_fields

BIG = "x" * 3000  # a message past a quota of 2000 bytes on its own


async def start(rt: backstream.Runtime, message_id: str, text: str, *, user: str = "alice") -> str:
    """A job that runs until aborted: its log does not count while it runs."""
    started = await rt.start_job(
        user=user,
        thread_id="t",
        message_id=message_id,
        model="backstream/lorem",
        messages=[{"role": "user", "content": text}],
        params={"max_tokens": 100_000, "tokens_per_s": 1},
    )
    return started.job_id


def cost_of(text: str) -> int:
    """The bytes ``start``'s request takes (as the runtime builds it)."""
    request = JobRequest(
        "backstream/lorem",
        ({"role": "user", "content": text},),
        {"max_tokens": 100_000, "tokens_per_s": 1},
    )
    return request_bytes(request)


# -- the runtime: the sweep frees the bytes; the refusals are counted -----------------------


async def test_the_sweep_frees_a_finished_jobs_bytes_and_refusals_are_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    config = Config(retention=60, sweep_interval=5, drain_timeout=0, max_stored_bytes_per_user=4000)
    async with open_runtime(config, store=store) as rt:
        done = await rt.start_job(
            user="alice",
            thread_id="t",
            message_id="m1",
            model="backstream/echo",
            messages=[{"role": "user", "content": "y" * 1500}],
        )
        await collect(rt, done.job_id)  # echoed: its log counts from its end on
        held = await store.stored_bytes("alice")
        assert held > 3000
        with pytest.raises(backstream.QuotaExceededError, match="quota of 4000 bytes"):
            await start(rt, "m2", "z" * 1000)
        assert await store.find_job("alice", "m2") is None
        assert await start(rt, "m3", "z", user="bob")  # another user's quota is their own
        assert rt.statistics().jobs.quota_refusals_total == 1
        assert "backstream_quota_refusals_total 1.0" in metrics_text(rt, None)().decode()
        await trio.sleep(50)  # retained still: its bytes too
        with pytest.raises(backstream.QuotaExceededError):
            await start(rt, "m2", "z" * 1000)
        assert await store.stored_bytes("alice") == held
        await trio.sleep(20)  # past its retention, swept
        assert await store.stored_bytes("alice") == 0
        assert await start(rt, "m2", "z" * 1000)
        assert rt.statistics().jobs.quota_refusals_total == 2


# -- across instances on one Redis ----------------------------------------------------------


async def test_the_quota_holds_across_instances() -> None:
    text = "q" * 900
    cost = cost_of(text)
    async with two_instances(max_stored_bytes_per_user=3 * cost, max_jobs_per_user=20) as (a, b):
        admitted: dict[str, str] = {}  # message id: job id
        refused: list[str] = []

        async def try_start(rt: backstream.Runtime, message_id: str) -> None:
            try:
                admitted[message_id] = await start(rt, message_id, text)
            except backstream.QuotaExceededError:
                refused.append(message_id)

        async with trio.open_nursery() as nursery:  # ten racing starts, five on each instance
            for i in range(10):
                nursery.start_soon(try_start, (a, b)[i % 2], f"m{i}")
        assert len(admitted) == 3 and len(refused) == 7
        refusals = a.statistics().jobs.quota_refusals_total + b.statistics().jobs.quota_refusals_total
        assert refusals == 7
        for message_id, job_id in admitted.items():  # a repeat, on either instance, is never refused
            assert await start(a, message_id, text) == job_id == await start(b, message_id, text)
        first = next(iter(admitted.values()))
        await a.abort(first, user="alice")  # ended: its log counts too now, until it is swept
        with pytest.raises(backstream.QuotaExceededError):
            await start(b, "late", text)
        assert await start(b, "bob", text, user="bob")  # another user's quota is their own
        for job_id in admitted.values():
            await b.abort(job_id, user="alice")


# -- the front doors -------------------------------------------------------------------------


async def test_websocket_start_past_the_quota_is_quota_exceeded(autojump_clock: trio.testing.MockClock) -> None:
    config = Config(max_stored_bytes_per_user=2000, drain_timeout=0)
    async with served(config) as srv, raw_client(srv.url) as c:
        await c.hello()
        reply = await c.request("job.start", **start_fields("m1", messages=[{"role": "user", "content": BIG}]))
        assert reply["type"] == "error" and reply["code"] == "quota_exceeded"
        assert "quota of 2000 bytes" in reply["message"]
        ok = await c.request("job.start", **start_fields("m2"))  # a small one still fits
        assert ok["type"] == "job.started"


async def test_responses_start_past_the_quota_is_a_429(upstream: FakeUpstream) -> None:
    async with served_http(upstream, max_stored_bytes_per_user=2000) as server:
        client = server.client()
        with pytest.raises(openai.RateLimitError) as limited:
            await in_thread(lambda: client.responses.create(model="m", input=BIG, background=True))
        assert limited.value.status_code == 429
        body = limited.value.body
        assert isinstance(body, dict) and body["code"] == "quota_exceeded" and body["type"] == "rate_limit_error"
        assert "quota of 2000 bytes" in body["message"]


async def test_ai_sdk_send_past_the_quota_is_an_error_frame() -> None:
    config = Config(max_stored_bytes_per_user=2000, drain_timeout=0)
    async with ai_sdk_server(config) as server, open_websocket_url(url(server)) as ws:
        await ws.send_message(send_frame("r1", "c1", BIG))
        [frame] = await response(ws, "r1")
        assert frame["type"] == "error" and "quota of 2000 bytes" in frame["errorText"]
        assert await server.runtime.list_jobs(user="alice") == []


# -- Redis: what its steps leave of a charge --------------------------------------------------


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisStore]:
    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    store = RedisStore(redis_url(), prefix=prefix)
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()
        await delete_prefix(prefix)


def limits(now: float = NOW, max_jobs: int = 10) -> SharedCapacity:
    return SharedCapacity(now=now, lease_until=now + 15, max_jobs=max_jobs, max_jobs_per_user=10)


async def test_a_refused_start_leaves_no_charge_nor_trace(redis_store: RedisStore) -> None:
    store, k = redis_store, redis_store.keys
    cost = request_bytes(record().request)
    with pytest.raises(backstream.QuotaExceededError):
        await store.create_job(record(), limits(), max_stored_bytes=cost - 1)
    assert await store.redis.get(k.msg("alice", "m1")) is None  # the user's first step undone
    assert await store.redis.zcard(k.user_running("alice")) == 0
    assert sum([await store.redis.zcard(k.running(shard)) for shard in range(SHARDS)]) == 0
    assert await store.stored_bytes("alice") == 0
    # The cluster is full: the charge made is released with the user's step.
    await store.create_job(record(job_id="j_b", user="bob"), limits(max_jobs=1))
    with pytest.raises(backstream.CapacityError, match="cluster"):
        await store.create_job(record(), limits(max_jobs=1), max_stored_bytes=cost)
    assert await store.stored_bytes("alice") == 0
    assert await store.redis.hlen(k.stored_charges("alice")) == 0


async def test_a_create_repeated_after_its_charge_is_charged_once(redis_store: RedisStore) -> None:
    store, k = redis_store, redis_store.keys
    cost = request_bytes(record().request)
    # What a create that stopped after its user steps leaves: key and charge, no record.
    await store.redis.set(k.msg("alice", "m1"), "j_1")
    await store.redis.hset(k.stored_charges("alice"), {"j_1": str(cost)})
    await store.redis.set(k.stored_bytes("alice"), str(cost))
    made, created = await store.create_job(record("j_2"), limits(), max_stored_bytes=cost)
    assert created and made.job_id == "j_1" and await store.stored_bytes("alice") == cost


async def test_a_charge_whose_keys_redis_expired_lapses_at_the_next_create(redis_store: RedisStore) -> None:
    store, k = redis_store, redis_store.keys
    cost = request_bytes(record().request)
    await store.create_job(record(), limits(), max_stored_bytes=cost)
    end = [*texts(1, "a"), StatusEvent(seq=2, status="completed")]
    await store.commit("j_1", end, progress(2, "completed", finished_at=NOW + 2, expires_at=NOW + 10))
    assert await store.stored_bytes("alice") == cost + log_bytes(end)
    await store.redis.delete([k.job("j_1"), k.log("j_1")])  # their TTL ran out: no sweep came
    assert await store.delete_expired(NOW + 20) == ["j_1"]  # no record: the user is unknown
    assert await store.stored_bytes("alice") == cost + log_bytes(end)
    with pytest.raises(backstream.QuotaExceededError):  # before the keys' own expiry: held
        await store.create_job(record("j_2", message_id="m2"), limits(NOW + 20), max_stored_bytes=cost)
    after = NOW + 10 + SAFETY_TTL_S
    made, created = await store.create_job(
        record("j_2", message_id="m2"), limits(after), max_stored_bytes=cost
    )
    assert created and made.job_id == "j_2"
    assert await store.stored_bytes("alice") == cost  # the lapsed charge dropped


async def test_the_repair_of_an_unfinished_terminal_commit_charges_the_log(redis_store: RedisStore) -> None:
    store, k = redis_store, redis_store.keys
    cost = request_bytes(record().request)
    await store.create_job(record(), limits())
    end = [*texts(1, "abc"), StatusEvent(seq=2, status="completed")]
    await store.commit("j_1", end, progress(2, "completed", finished_at=NOW + 2, expires_at=NOW + 50))
    # Back to what the job slot's step alone leaves: the running entries, the request's charge.
    shard = int(await store.redis.hget(k.job("j_1"), SHARD_FIELD) or -1)
    redis_now = (await store.redis.time()).timestamp()  # leases are on Redis's clock
    await store.redis.zadd(k.running(shard), {"j_1": redis_now + float(store.frame.ahead(NOW + 15))})
    await store.redis.hset(k.stored_charges("alice"), {"j_1": str(cost)})
    await store.redis.set(k.stored_bytes("alice"), str(cost))
    assert await store.take_orphans("i_b", NOW + 20, NOW + 35) == []  # ended: repaired
    assert await store.stored_bytes("alice") == cost + log_bytes(end)
    assert json.loads(await store.redis.hget(k.job("j_1"), "status") or "null") == "completed"
