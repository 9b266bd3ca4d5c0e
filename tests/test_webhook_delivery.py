"""Webhook deliveries across instances and past a dead endpoint: each event is sent by one
instance at a time; an endpoint that never answers holds up no job, no other endpoint,
and no memory (its backlog waits in the store); and the queue's ports on every store."""

from __future__ import annotations

import collections
import json
import time
import uuid

import attrs
import pytest
import trio

from backstream import Config, Store, open_runtime
from backstream.actors.webhooks import WebhookSettings
from backstream.protocol.webhooks import WebhookDelivery, delivery_for, event_body, event_id, parse_endpoint
from backstream.runtime.stores.redis import RedisStore
from backstream.runtime.webhook_sender import HttpWebhookSender
from tests.conftest import delete_prefix, redis_url, require_redis
from tests.test_webhooks import SECRET, delivering
from tests.webhook_receiver import open_receiver


def deliveries(url: str, count: int, now: float) -> list[WebhookDelivery]:
    endpoint = parse_endpoint(url)
    out = []
    for i in range(count):
        evt = event_id(f"j_{i}", "response")
        body = event_body(evt, "response.completed", now, {"id": f"j_{i}"})
        out.append(delivery_for(endpoint, evt, "response.completed", body, now))
    return out


async def test_two_instances_on_redis_send_each_event_once(nursery: trio.Nursery) -> None:
    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    receiver = await open_receiver(nursery, delay=0.01)
    first, second = RedisStore(redis_url(), prefix=prefix), RedisStore(redis_url(), prefix=prefix)
    await first.open()
    await second.open()
    try:
        endpoint = parse_endpoint(receiver.url)
        batch = deliveries(receiver.url, 60, time.time())
        await first.record_webhooks(batch)
        await second.record_webhooks(batch)  # recorded again by another instance: nothing twice
        assert (await first.webhook_counts()).pending == 60
        async with (
            delivering(first, [endpoint], instance_id="i_a", concurrency=8) as a,
            delivering(second, [endpoint], instance_id="i_b", concurrency=8) as b,
        ):
            await receiver.wait_for(60)
            await trio.sleep(0.5)  # nothing comes twice
            sent = [a.deliverer.statistics().delivered_total, b.deliverer.statistics().delivered_total]
        counts = collections.Counter(receiver.ids())
        assert len(counts) == 60 and set(counts.values()) == {1}
        assert sum(sent) == 60
        assert (await first.webhook_counts()).pending == 0
    finally:
        await second.aclose()  # the reverse of opening: each holds scopes entered at open()
        await first.aclose()
        await delete_prefix(prefix)


async def test_an_endpoint_that_never_answers_holds_up_no_job_and_no_other_endpoint(
    nursery: trio.Nursery,
) -> None:
    stuck = await open_receiver(nursery, hang=True)
    healthy = await open_receiver(nursery)
    endpoints = (parse_endpoint(stuck.url), parse_endpoint(healthy.url))
    # An attempt may take an hour: a design that waited for it would never end these jobs.
    settings = WebhookSettings(endpoints, retry_schedule=(3600.0,), timeout=3600.0, concurrency=2, poll=0.05)
    sender = HttpWebhookSender(SECRET)
    config = Config(drain_timeout=0, max_jobs_per_user=100)
    async with open_runtime(config, webhooks=settings, webhook_sender=sender) as rt:
        for i in range(30):
            await rt.start_job(user="alice", thread_id="t", message_id=f"m{i}", model="backstream/echo",
                               messages=[{"role": "user", "content": f"job {i}"}])  # fmt: skip
        with trio.fail_after(30):
            while len(await rt.list_jobs(user="alice", statuses=frozenset({"completed"}), limit=100)) < 30:
                await trio.sleep(0.05)
        await healthy.wait_for(30)
        deliverer = rt.webhook_deliverer
        assert deliverer is not None
        await trio.sleep(0.3)
        assert deliverer.statistics().in_flight == 2  # the stuck endpoint's two, no more
        assert stuck.connections_open == 2
        counts = await rt.store.webhook_counts()
        assert counts.pending == 30  # the stuck endpoint's backlog: in the store
        assert deliverer.statistics().delivered_total == 30
    await sender.aclose()


async def test_a_claimed_delivery_is_nobody_elses_until_its_claim_lapses(store: Store) -> None:
    now = time.time()
    batch = deliveries("http://127.0.0.1:9/hook", 3, now)
    await store.record_webhooks(batch)
    await store.record_webhooks(batch[:1])  # a repeat records nothing
    key = batch[0].endpoint
    first_two = await store.claim_webhooks(key, "i_a", now, now + 60, 2)
    (third,) = await store.claim_webhooks(key, "i_a", now, now + 60, 5)
    assert len({d.delivery_id for d in [*first_two, third]}) == 3
    assert await store.claim_webhooks(key, "i_a", now + 1, now + 60, 5) == []
    assert await store.claim_webhooks("ep_other", "i_a", now, now + 60, 5) == []
    retry = attrs.evolve(third, attempts=1, next_at=now + 10, last_error="HTTP 500")
    await store.settle_webhook(retry, delivered=False)
    assert await store.claim_webhooks(key, "i_a", now + 5, now + 60, 5) == []  # not due yet
    assert [d.attempts for d in await store.claim_webhooks(key, "i_a", now + 11, now + 70, 5)] == [1]
    await store.settle_webhook(first_two[0], delivered=True)
    assert (await store.webhook_counts()).pending == 2
    dead = attrs.evolve(first_two[1], attempts=8, dead=True, dead_at=now + 1)
    await store.settle_webhook(dead, delivered=False)
    assert [d.delivery_id for d in await store.failed_webhooks(10)] == [dead.delivery_id]
    assert (await store.webhook_counts()).dead == 1
    assert await store.redeliver_webhooks(["evt_unknown"], now) == 0
    assert await store.redeliver_webhooks(None, now + 100) == 1
    # Every claim has lapsed by now: the retried one comes again, and the redelivered one.
    claimed = {d.delivery_id: d for d in await store.claim_webhooks(key, "i_a", now + 100, now + 160, 5)}
    assert sorted(claimed) == sorted([dead.delivery_id, third.delivery_id])
    again = claimed[dead.delivery_id]
    assert (again.attempts, again.dead, again.next_at) == (0, False, now + 100)
    await store.disable_endpoint(key, "410 Gone")
    assert await store.disabled_endpoints() == {key: "410 Gone"}
    assert await store.enable_endpoint(key) and not await store.enable_endpoint(key)
    assert await store.disabled_endpoints() == {}


async def test_the_memory_store_holds_a_bounded_number_of_deliveries(monkeypatch: pytest.MonkeyPatch) -> None:
    from backstream.runtime.stores import memory_webhooks
    from backstream.runtime.stores.memory import MemoryStore

    monkeypatch.setattr(memory_webhooks, "MAX_MEMORY_DELIVERIES", 5)
    store = MemoryStore()
    batch = deliveries("http://127.0.0.1:9/hook", 8, time.time())
    await store.record_webhooks(batch)
    assert (await store.webhook_counts()).pending == 5
    assert store.webhooks_dropped == 3  # the newest, when full: dropped, logged and counted
    claimed = await store.claim_webhooks(batch[0].endpoint, "i_a", time.time(), time.time() + 60, 10)
    assert sorted(d.delivery_id for d in claimed) == sorted(d.delivery_id for d in batch[:5])


async def test_two_runtimes_on_redis_send_each_jobs_event_once(nursery: trio.Nursery) -> None:
    """Jobs end on both instances; each end's event reaches the receiver exactly once."""
    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    receiver = await open_receiver(nursery)
    settings = WebhookSettings((parse_endpoint(receiver.url),), retry_schedule=(0.05,), poll=0.05)
    senders = [HttpWebhookSender(SECRET), HttpWebhookSender(SECRET)]
    config = Config(drain_timeout=0, max_jobs_per_user=100)
    stores = [RedisStore(redis_url(), prefix=prefix), RedisStore(redis_url(), prefix=prefix)]
    try:
        async with (
            open_runtime(config, store=stores[0], webhooks=settings, webhook_sender=senders[0]) as first,
            open_runtime(config, store=stores[1], webhooks=settings, webhook_sender=senders[1]) as second,
        ):
            jobs = []
            for i in range(20):
                rt = (first, second)[i % 2]
                started = await rt.start_job(
                    user="alice", thread_id="t", message_id=f"m{i}", model="backstream/echo",
                    messages=[{"role": "user", "content": f"job {i}"}],
                )  # fmt: skip
                jobs.append(started.job_id)
            await receiver.wait_for(20, timeout=30)
            await trio.sleep(0.5)  # nothing comes twice
        sent = collections.Counter(json.loads(r.body)["data"]["id"] for r in receiver.received)
        assert sent == dict.fromkeys(jobs, 1)
        assert len(set(receiver.ids())) == 20
    finally:
        for sender in senders:
            await sender.aclose()
        await delete_prefix(prefix)
