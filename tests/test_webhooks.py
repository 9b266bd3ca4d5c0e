"""Webhooks: a job's end reaches the operator's endpoints, signed as OpenAI signs, at least
once, with one ``webhook-id`` per event however many attempts it takes.

Real parts: each store, the dispatcher and the deliverer of the runtime, its httpx sender,
and a real HTTP receiver on loopback (tests/webhook_receiver.py); the signatures are
checked by the ``standardwebhooks`` package and by the ``openai`` SDK.
"""

from __future__ import annotations

import base64
import datetime
import json
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import openai
import pytest
import standardwebhooks
import trio
import trustme

from backstream import Store
from backstream.actors.clock import WallClock
from backstream.actors.dispatcher import Dispatcher
from backstream.actors.notifier import Notifier
from backstream.actors.webhooks import WebhookDeliverer, WebhookEvents, WebhookSendError, WebhookSettings
from backstream.protocol.events import ApprovalRequiredEvent, ErrorInfo, LogEvent, StatusEvent, TextEvent
from backstream.protocol.records import JobProgress, JobRecord, JobRequest
from backstream.protocol.webhooks import WebhookEndpoint, delivery_for, event_body, parse_endpoint
from backstream.runtime.webhook_sender import HttpWebhookSender
from tests.webhook_receiver import Receiver, open_receiver

SECRET = "whsec_" + base64.b64encode(b"backstream-webhooks-test-secret!").decode()
FAST = (0.05, 0.05, 0.05)


@attrs.frozen
class Harness:
    events: WebhookEvents
    deliverer: WebhookDeliverer
    dispatcher: Dispatcher
    notifier: Notifier


@asynccontextmanager
async def delivering(
    store: Store,
    endpoints: Sequence[WebhookEndpoint],
    *,
    schedule: tuple[float, ...] = FAST,
    timeout: float = 2.0,
    concurrency: int = 4,
    instance_id: str = "i_a",
) -> AsyncIterator[Harness]:
    """The runtime's dispatcher and deliverer on ``store``, as ``open_runtime`` wires them."""
    settings = WebhookSettings(tuple(endpoints), schedule, timeout, concurrency, poll=0.05)
    clock = WallClock()
    notifier = Notifier(store, clock, max_per_user=100)
    events = WebhookEvents(store, store, settings, clock)
    sender = HttpWebhookSender(SECRET)
    deliverer = WebhookDeliverer(store, sender, settings, clock, instance_id=instance_id)
    events.on_recorded = deliverer.wake
    notifier.webhooks = events
    dispatcher = Dispatcher(store, store, notifier, clock, instance_id=instance_id, webhooks=events)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)
            await nursery.start(deliverer.run)
            yield Harness(events, deliverer, dispatcher, notifier)
            nursery.cancel_scope.cancel()
    finally:
        await sender.aclose()


async def end_job(
    store: Store,
    job_id: str,
    status: str = "completed",
    *,
    text: str = "all done",
    error: ErrorInfo | None = None,
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
    waited: str | None = None,
) -> None:
    """A job that wrote ``text`` (and, with ``waited``, a wait for approval of that call)
    and ended with ``status``, committed as a job commits."""
    now = time.time()
    request = JobRequest("backstream/echo", ({"role": "user", "content": "hi"},))
    record = JobRecord(
        job_id=job_id,
        user="alice",
        thread_id="t1",
        message_id=job_id,
        request=request,
        status="running",
        seq=0,
        epoch=1,
        content_length=0,
        created_at=now,
        updated_at=now,
        owner="i_a",
        lease_until=now + 30,
    )
    await store.create_job(record)
    written: list[LogEvent] = [StatusEvent(seq=1, status="running"), TextEvent(seq=2, text=text)]
    if waited is not None:
        written.append(ApprovalRequiredEvent(seq=3, call_id=waited, name="delete_file", arguments="{}"))
    last = len(written) + 1
    running = JobProgress(status="running", seq=last - 1, content_length=len(text), updated_at=now)
    await store.commit(job_id, written, running)
    end = StatusEvent(seq=last, status=status, error=error, finish_reason=finish_reason, usage=usage)  # type: ignore[arg-type]
    ended = JobProgress(
        status=status,  # type: ignore[arg-type]
        seq=last,
        content_length=len(text),
        updated_at=now,
        finished_at=now,
        error=error,
        usage=usage,
        expires_at=now + 3600,
    )
    await store.commit(job_id, [end], ended)


def verify_both(headers: dict[str, str], body: bytes) -> object:
    """The event as the ``openai`` SDK unwraps it, once ``standardwebhooks`` agreed."""
    standardwebhooks.Webhook(SECRET).verify(body, headers)
    client = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:1/v1")
    return client.webhooks.unwrap(body, headers, secret=SECRET)


async def test_each_end_sends_its_openai_event_signed_for_both_verifiers(
    store: Store, nursery: trio.Nursery
) -> None:
    receiver = await open_receiver(nursery)
    endpoint = parse_endpoint(receiver.url)
    async with delivering(store, [endpoint]):
        await end_job(store, "j_done", "completed")
        await end_job(store, "j_fail", "failed", error=ErrorInfo("upstream_error", "the model failed"))
        await end_job(store, "j_stop", "aborted")
        await end_job(store, "j_long", "completed", finish_reason="length")
        await receiver.wait_for(4)
    by_job = {}
    for got in receiver.received:
        event = verify_both(got.headers, got.body)
        body = json.loads(got.body)
        assert got.headers["webhook-id"] == body["id"] == event.id  # type: ignore[attr-defined]
        assert body["object"] == "event" and isinstance(body["created_at"], int)
        assert set(body) == {"id", "object", "created_at", "type", "data"}
        by_job[event.data.id] = (event.type, type(event).__name__)  # type: ignore[attr-defined]
    assert by_job == {
        "j_done": ("response.completed", "ResponseCompletedWebhookEvent"),
        "j_fail": ("response.failed", "ResponseFailedWebhookEvent"),
        "j_stop": ("response.cancelled", "ResponseCancelledWebhookEvent"),
        "j_long": ("response.incomplete", "ResponseIncompleteWebhookEvent"),
    }


async def test_a_tampered_body_or_an_old_timestamp_fails_verification(nursery: trio.Nursery) -> None:
    endpoint = parse_endpoint("http://127.0.0.1:9/hook")
    body = event_body("evt_1", "response.completed", time.time(), {"id": "j_1"})
    delivery = delivery_for(endpoint, "evt_1", "response.completed", body, time.time())
    sender = HttpWebhookSender(SECRET)
    now = datetime.datetime.now(datetime.UTC)
    headers = sender.headers(delivery, now)
    assert verify_both(headers, body.encode()).data.id == "j_1"  # type: ignore[attr-defined]
    tampered = body.replace("j_1", "j_2").encode()
    old = sender.headers(delivery, now - datetime.timedelta(minutes=10))
    for bad_headers, bad_body in ((headers, tampered), (old, body.encode())):
        with pytest.raises(standardwebhooks.WebhookVerificationError):
            standardwebhooks.Webhook(SECRET).verify(bad_body, bad_headers)
        with pytest.raises(openai.InvalidWebhookSignatureError):
            openai.OpenAI(api_key="x").webhooks.unwrap(bad_body, bad_headers, secret=SECRET)
    await sender.aclose()


async def test_a_receiver_down_then_up_gets_each_event_with_one_webhook_id(
    store: Store, nursery: trio.Nursery
) -> None:
    receiver = await open_receiver(nursery, statuses=[500, 503])
    endpoint = parse_endpoint(receiver.url)
    async with delivering(store, [endpoint], schedule=(0.05, 0.1, 0.2, 0.3, 5.0)) as harness:
        await end_job(store, "j_1")
        await receiver.wait_for(2)  # two failed attempts: 500, then 503
        receiver.stop()  # then down: connections refused
        with trio.fail_after(10):
            while harness.deliverer.statistics().failed_attempts_total < 3:
                await trio.sleep(0.02)
        await receiver.start(nursery)
        await receiver.wait_for(3)
        await trio.sleep(0.3)  # nothing more comes
        stats = harness.deliverer.statistics()
    assert len(set(receiver.ids())) == 1 and len(receiver.received) == 3
    assert stats.delivered_total == 1 and stats.failed_attempts_total >= 3
    assert (await store.webhook_counts()).pending == 0


async def test_an_endpoint_failing_every_time_is_dead_lettered_then_redelivered(
    store: Store, nursery: trio.Nursery
) -> None:
    receiver = await open_receiver(nursery, status=500)
    endpoint = parse_endpoint(receiver.url)
    async with delivering(store, [endpoint], schedule=(0.02, 0.02)) as harness:
        await end_job(store, "j_1")
        with trio.fail_after(10):
            while not await store.failed_webhooks(10):
                await trio.sleep(0.02)
        assert harness.deliverer.statistics().dead_lettered_total == 1
        (dead,) = await store.failed_webhooks(10)
        assert (dead.attempts, dead.last_error, dead.event_type) == (3, "HTTP 500", "response.completed")
        assert len(receiver.received) == 3  # the first attempt and the schedule's two
        receiver.status = 200
        await trio.sleep(0.2)
        assert len(receiver.received) == 3  # dead: not tried again by itself
        assert await store.redeliver_webhooks([dead.event_id], time.time()) == 1
        await receiver.wait_for(4)
    assert len(set(receiver.ids())) == 1
    assert await store.failed_webhooks(10) == []


async def test_410_gone_disables_the_endpoint_until_it_is_enabled(
    store: Store, nursery: trio.Nursery
) -> None:
    gone = await open_receiver(nursery, statuses=[410])
    endpoint = parse_endpoint(gone.url)
    async with delivering(store, [endpoint]) as harness:
        await end_job(store, "j_1")
        await gone.wait_for(1)
        await end_job(store, "j_2")
        await trio.sleep(0.3)
        assert len(gone.received) == 1  # disabled: j_1's event and j_2's wait
        assert await store.disabled_endpoints() == {endpoint.key: "410 Gone"}
        assert harness.deliverer.statistics().endpoints_disabled_total == 1
        assert await store.enable_endpoint(endpoint.key)
        await gone.wait_for(3)
    first, *rest = receiver_jobs(gone)
    assert first == "j_1" and sorted(rest) == ["j_1", "j_2"]


def receiver_jobs(receiver: Receiver) -> list[str]:
    return [json.loads(r.body)["data"]["id"] for r in receiver.received]


async def test_redirects_are_not_followed_and_count_as_failures(store: Store, nursery: trio.Nursery) -> None:
    receiver = await open_receiver(nursery, statuses=[307])
    async with delivering(store, [parse_endpoint(receiver.url)]) as harness:
        await end_job(store, "j_1")
        await receiver.wait_for(2)  # the redirect, then the retry to the same URL
    assert harness.deliverer.statistics().failed_attempts_total == 1
    assert len(set(receiver.ids())) == 1


async def test_backstreams_own_events_go_only_to_endpoints_that_ask(
    store: Store, nursery: trio.Nursery
) -> None:
    plain = await open_receiver(nursery)
    own = await open_receiver(nursery)
    full = await open_receiver(nursery)
    endpoints = [
        parse_endpoint(plain.url),
        parse_endpoint(own.url + "#events=job.*"),
        parse_endpoint(full.url + "#events=job.ended+response.completed&content=true"),
    ]
    async with delivering(store, endpoints) as harness:
        usage = {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}
        await end_job(store, "j_1", text="the final answer", usage=usage)
        await harness.notifier.approval_needed(
            job_id="j_1", user="alice", thread_id="t1", tool="delete_file", call_id="call_7"
        )
        await plain.wait_for(1)
        await own.wait_for(2)
        await full.wait_for(2)
        await trio.sleep(0.2)
    assert [json.loads(r.body)["type"] for r in plain.received] == ["response.completed"]
    by_type = {json.loads(r.body)["type"]: json.loads(r.body) for r in own.received}
    assert set(by_type) == {"job.ended", "job.approval_required"}
    for got in own.received:
        standardwebhooks.Webhook(SECRET).verify(got.body, got.headers)
    assert by_type["job.approval_required"]["data"] == {
        "id": "j_1",
        "user": "alice",
        "thread_id": "t1",
        "call_id": "call_7",
        "name": "delete_file",
    }
    ended = by_type["job.ended"]["data"]
    assert (ended["user"], ended["thread_id"], ended["status"], ended["usage"]) == (
        "alice",
        "t1",
        "completed",
        usage,
    )
    assert (ended["content_length"], ended["entries"], ended["error"]) == (16, 3, None)
    assert "content" not in ended
    full_types = {json.loads(r.body)["type"]: json.loads(r.body) for r in full.received}
    assert set(full_types) == {"job.ended", "response.completed"}
    assert full_types["job.ended"]["data"]["content"] == "the final answer"


async def test_a_wait_whose_event_a_dead_process_never_recorded_is_sent_at_the_jobs_end(
    store: Store, nursery: trio.Nursery
) -> None:
    """The wait is in the log, its event was never recorded (the process died between the
    two); the job is recovered and ends ``interrupted``: its end records the wait's event.
    A job that went past its wait here (and ended otherwise) records none again."""
    own = await open_receiver(nursery)
    async with delivering(store, [parse_endpoint(own.url + "#events=job.approval_required")]):
        await end_job(store, "j_gone", "interrupted", waited="call_1")
        await end_job(store, "j_done", "completed", waited="call_2")
        await own.wait_for(1)
        await trio.sleep(0.3)
    (got,) = own.received
    standardwebhooks.Webhook(SECRET).verify(got.body, got.headers)
    body = json.loads(got.body)
    assert (body["type"], body["data"]["id"], body["data"]["call_id"]) == (
        "job.approval_required",
        "j_gone",
        "call_1",
    )


async def test_https_endpoints_are_verified_against_the_ca_file(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    receiver = await open_receiver(nursery, ssl_context=server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    body = event_body("evt_tls", "response.completed", time.time(), {"id": "j_1"})
    delivery = delivery_for(parse_endpoint(receiver.url), "evt_tls", "response.completed", body, time.time())
    trusting, default = HttpWebhookSender(SECRET, ca_file=str(ca_file)), HttpWebhookSender(SECRET)
    try:
        assert await trusting.send(delivery, 5.0) == 200
        with pytest.raises(WebhookSendError, match="CERTIFICATE_VERIFY_FAILED"):
            await default.send(delivery, 5.0)  # the system's CAs do not know this one
    finally:
        await trusting.aclose()
        await default.aclose()
    assert receiver.ids() == ["evt_tls"]
