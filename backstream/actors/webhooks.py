"""Webhooks: the events of a job's end (and of a wait for approval), recorded in the
store and sent to the operator's endpoints, signed, at least once.

``WebhookEvents`` builds a job's events when the dispatcher carries out the job's outbox
entry, and records one delivery per endpoint that wants it before the entry is deleted:
a crash anywhere leaves the entry (carried out again, recording the same deliveries,
whose ids derive from the job) or the deliveries (sent by whichever instance claims
them). ``WebhookDeliverer`` (a permanent child of the system supervisor) sends them:
one loop per endpoint, each with at most ``concurrency`` attempts under way, so a slow
or dead endpoint holds up only its own deliveries, which wait in the store, not in
memory. A failed attempt is tried again after the next wait of the retry schedule
(with jitter); once the schedule is spent the delivery is dead-lettered. An endpoint
that answers 410 Gone is disabled until the operator enables it again.
"""

from __future__ import annotations

import abc
import logging
import random
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import attrs
import trio

from backstream.actors.clock import WallClock
from backstream.actors.joblog import read_content
from backstream.actors.ports import OutboxEntry, StoreClosedError, StoredLogs
from backstream.actors.signals import through_outage
from backstream.actors.webhook_queue import WEBHOOK_CLAIM_S, WebhookQueue
from backstream.protocol.events import ApprovalRequiredEvent, StatusEvent
from backstream.protocol.responses import response_status
from backstream.protocol.webhooks import (
    DEFAULT_RETRY_SCHEDULE,
    WebhookDelivery,
    WebhookEndpoint,
    delivery_for,
    event_body,
    event_id,
    next_attempt_delay,
    response_event_type,
)

__all__ = [
    "WebhookDeliverer",
    "WebhookDelivererStatistics",
    "WebhookEvents",
    "WebhookSendError",
    "WebhookSender",
    "WebhookSettings",
]

log = logging.getLogger("backstream.webhooks")

CONTENT_CHARS = 1_000_000
"""At most this much of a job's text goes into ``job.ended`` (for an endpoint that asks)."""


class WebhookSendError(Exception):
    """An attempt got no HTTP answer: refused, reset, timed out, bad TLS."""


class WebhookSender(abc.ABC):
    """Signs and posts a delivery (the runtime's HTTP client)."""

    @abc.abstractmethod
    async def send(self, delivery: WebhookDelivery, timeout: float) -> int:
        """POST the delivery's body, signed, to its URL; return the HTTP status (redirects
        are not followed). Raises ``WebhookSendError`` without an answer within
        ``timeout``. Cancellation: the request is abandoned."""


@attrs.frozen
class WebhookSettings:
    endpoints: tuple[WebhookEndpoint, ...]
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    timeout: float = 10.0
    """Seconds an attempt may take, connecting included."""
    concurrency: int = 4
    """Attempts under way at once per endpoint (per instance)."""
    poll: float = 1.0
    """Seconds between looks for deliveries another instance recorded (or that fell due)."""


class WebhookEvents:
    """Builds the events and records their deliveries."""

    def __init__(
        self, queue: WebhookQueue, logs: StoredLogs, settings: WebhookSettings, clock: WallClock
    ) -> None:
        self._queue = queue
        self._logs = logs
        self._settings = settings
        self._clock = clock
        self.recorded_total = 0
        self.on_recorded: Callable[[], None] | None = None
        """Called after deliveries were recorded here (the deliverer's ``wake``)."""

    def _wanting(self, event_type: str) -> list[WebhookEndpoint]:
        return [e for e in self._settings.endpoints if e.wants(event_type)]

    async def job_ended(self, entry: OutboxEntry) -> None:
        """Record the events of the job's end (repeating it records nothing twice).
        Raises ``UnavailableError``. Cancellation: recorded or not; call again."""
        record = await self._logs.get_job(entry.job_id)
        end = await self._end_status(entry.job_id, record.seq if record else 0)
        finish_reason = end.finish_reason if end is not None else None
        created = (record.finished_at or record.updated_at) if record else self._clock.now()
        deliveries: list[WebhookDelivery] = []
        response_type = response_event_type(entry.status, entry.error, finish_reason)
        response_id = event_id(entry.job_id, "response")
        body = event_body(response_id, response_type, created, {"id": entry.job_id})
        deliveries += self._for(response_type, response_id, body)
        ended = self._wanting("job.ended")
        if ended:
            data: dict[str, Any] = {
                "id": entry.job_id,
                "user": entry.user,
                "thread_id": entry.thread_id,
                "status": entry.status,
                "response_status": response_status(entry.status, entry.error, finish_reason),
                "finish_reason": finish_reason,
                "error": None
                if entry.error is None
                else {"code": entry.error.code, "message": entry.error.message},
                "usage": record.usage if record else None,
                "content_length": record.content_length if record else None,
                "entries": record.seq if record else None,
                "created_at": record.created_at if record else None,
                "finished_at": record.finished_at if record else None,
            }
            ended_id = event_id(entry.job_id, "job.ended")
            plain = event_body(ended_id, "job.ended", created, data)
            content = None
            for endpoint in ended:
                if endpoint.include_content and content is None:
                    content = await self._text(entry.job_id)
                with_content = {**data, "content": content} if endpoint.include_content else None
                text = (
                    plain
                    if with_content is None
                    else event_body(ended_id, "job.ended", created, with_content)
                )
                deliveries.append(delivery_for(endpoint, ended_id, "job.ended", text, self._clock.now()))
        if entry.status == "interrupted" and self._wanting("job.approval_required"):
            deliveries += await self._approvals_logged(entry)
        await self._record(deliveries)

    async def _approvals_logged(self, entry: OutboxEntry) -> list[WebhookDelivery]:
        """The ``job.approval_required`` events of the waits in the job's log. A process
        that died between writing a wait and recording its event left the wait in the
        log; its job ends ``interrupted`` when recovered, and the event is recorded then
        (the same id: an event recorded already is not recorded twice)."""
        deliveries: list[WebhookDelivery] = []
        after = 0
        while True:
            entries = await self._logs.read(entry.job_id, after, 256)
            if not entries:
                return deliveries
            for logged in entries:
                if isinstance(logged, ApprovalRequiredEvent):
                    evt, body = self._approval_body(
                        entry.job_id, entry.user, entry.thread_id, logged.call_id, logged.name
                    )
                    deliveries += self._for("job.approval_required", evt, body)
            after = entries[-1].seq

    def _approval_body(
        self, job_id: str, user: str, thread_id: str, call_id: str, tool: str
    ) -> tuple[str, str]:
        evt = event_id(job_id, "job.approval_required", call_id)
        data = {"id": job_id, "user": user, "thread_id": thread_id, "call_id": call_id, "name": tool}
        return evt, event_body(evt, "job.approval_required", self._clock.now(), data)

    async def approval_required(
        self, *, job_id: str, user: str, thread_id: str, call_id: str, tool: str
    ) -> None:
        """Record ``job.approval_required`` for the call (once per call). Raises
        ``UnavailableError``. Cancellation: recorded or not; call again."""
        evt, body = self._approval_body(job_id, user, thread_id, call_id, tool)
        await self._record(self._for("job.approval_required", evt, body))

    def _for(self, event_type: str, evt: str, body: str) -> list[WebhookDelivery]:
        now = self._clock.now()
        return [delivery_for(e, evt, event_type, body, now) for e in self._wanting(event_type)]

    async def _record(self, deliveries: Sequence[WebhookDelivery]) -> None:
        if not deliveries:
            return
        await self._queue.record_webhooks(deliveries)
        self.recorded_total += len(deliveries)
        if self.on_recorded is not None:
            self.on_recorded()

    async def _end_status(self, job_id: str, seq: int) -> StatusEvent | None:
        entries = await self._logs.read(job_id, max(seq - 1, 0), 1)
        last = entries[-1] if entries else None
        return last if isinstance(last, StatusEvent) else None

    async def _text(self, job_id: str) -> str:
        return await read_content(self._logs, job_id, CONTENT_CHARS)


@attrs.frozen
class WebhookDelivererStatistics:
    delivered_total: int
    """Attempts answered 2xx."""
    failed_attempts_total: int
    """Attempts that failed (no answer, or not 2xx): tried again later, or dead-lettered."""
    dead_lettered_total: int
    """Deliveries whose schedule was spent here: listed by ``backstream webhooks failed``."""
    endpoints_disabled_total: int
    """Endpoints this instance disabled for answering 410 Gone."""
    in_flight: int
    """Attempts under way (at most ``concurrency`` per endpoint)."""


@attrs.define
class _Lane:
    endpoint: WebhookEndpoint
    in_flight: int = 0
    bell: trio.Event = attrs.field(factory=trio.Event)


class WebhookDeliverer:
    """Start with ``await nursery.start(deliverer.run)``. ``run`` keeps nothing between
    runs but the totals of ``statistics``; a claim left by a crash lapses."""

    def __init__(
        self,
        queue: WebhookQueue,
        sender: WebhookSender,
        settings: WebhookSettings,
        clock: WallClock,
        *,
        instance_id: str,
        rng: random.Random | None = None,
    ) -> None:
        self._queue = queue
        self._sender = sender
        self._settings = settings
        self._clock = clock
        self._instance_id = instance_id
        self._rng = rng or random.Random()
        self._lanes = {e.key: _Lane(e) for e in settings.endpoints}
        self._delivered_total = 0
        self._failed_total = 0
        self._dead_total = 0
        self._disabled_total = 0

    def wake(self) -> None:
        """New deliveries were recorded here: look now, not at the next poll."""
        for lane in self._lanes.values():
            lane.bell.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled. Cancellation: attempts under way are abandoned; their claims
        lapse and another round (here or elsewhere) sends them again, same ``webhook-id``."""
        async with trio.open_nursery() as nursery:
            for lane in self._lanes.values():
                nursery.start_soon(self._serve_lane, lane)
            task_status.started()

    async def _serve_lane(self, lane: _Lane) -> None:
        key = lane.endpoint.key
        async with trio.open_nursery() as attempts:
            while True:
                lane.bell = trio.Event()
                free = self._settings.concurrency - lane.in_flight
                claimed: list[WebhookDelivery] = []
                if free > 0 and not await self._disabled(key):
                    now = self._clock.now()
                    claimed = await through_outage(
                        f"webhooks to {lane.endpoint.url}: claiming",
                        partial(
                            self._queue.claim_webhooks,
                            key,
                            self._instance_id,
                            now,
                            now + WEBHOOK_CLAIM_S,
                            free,
                        ),
                    )
                for delivery in claimed:
                    lane.in_flight += 1
                    attempts.start_soon(self._attempt, lane, delivery)
                if claimed and len(claimed) == free:
                    await lane.bell.wait()  # a slot frees (or news): claim again
                elif not claimed:
                    with trio.move_on_after(self._settings.poll):
                        await lane.bell.wait()

    async def _disabled(self, key: str) -> bool:
        disabled = await through_outage(
            "webhooks: reading disabled endpoints", self._queue.disabled_endpoints
        )
        return key in disabled

    async def _attempt(self, lane: _Lane, delivery: WebhookDelivery) -> None:
        try:
            status: int | None = None
            try:
                with trio.fail_after(self._settings.timeout + 1.0):  # the sender has its own
                    status = await self._sender.send(delivery, self._settings.timeout)
                error = "" if 200 <= status < 300 else f"HTTP {status}"
            except (WebhookSendError, trio.TooSlowError) as exc:
                error = str(exc) or "no answer in time"
            await self._settle(lane, delivery, status, error)
        except StoreClosedError:
            pass  # shutting down: the claim lapses, the delivery is sent again later
        finally:
            lane.in_flight -= 1
            lane.bell.set()

    async def _settle(self, lane: _Lane, delivery: WebhookDelivery, status: int | None, error: str) -> None:
        queue, url = self._queue, lane.endpoint.url
        if not error:
            self._delivered_total += 1
            await through_outage(
                "webhooks: settling", partial(queue.settle_webhook, delivery, delivered=True)
            )
            return
        self._failed_total += 1
        if status == 410:
            self._disabled_total += 1
            log.error(
                "webhook endpoint %s (%s) answered 410 Gone: disabled until `backstream webhooks enable %s`",
                url,
                lane.endpoint.key,
                lane.endpoint.key,
            )
            await through_outage(
                "webhooks: disabling", partial(queue.disable_endpoint, lane.endpoint.key, "410 Gone")
            )
            await through_outage(
                "webhooks: releasing", partial(queue.release_webhooks, [delivery.delivery_id])
            )
            return
        failures = delivery.attempts + 1
        delay = next_attempt_delay(self._settings.retry_schedule, failures, self._rng)
        now = self._clock.now()
        if delay is None:
            self._dead_total += 1
            log.error(
                "webhook %s (%s) to %s dead-lettered after %d attempts: %s",
                delivery.event_id,
                delivery.event_type,
                url,
                failures,
                error,
            )
            settled = attrs.evolve(delivery, attempts=failures, last_error=error, dead=True, dead_at=now)
        else:
            log.info(
                "webhook %s to %s failed (%s): attempt %d in %.1fs",
                delivery.event_id,
                url,
                error,
                failures + 1,
                delay,
            )
            settled = attrs.evolve(delivery, attempts=failures, last_error=error, next_at=now + delay)
        await through_outage("webhooks: settling", partial(queue.settle_webhook, settled, delivered=False))

    def statistics(self) -> WebhookDelivererStatistics:
        return WebhookDelivererStatistics(
            delivered_total=self._delivered_total,
            failed_attempts_total=self._failed_total,
            dead_lettered_total=self._dead_total,
            endpoints_disabled_total=self._disabled_total,
            in_flight=sum(lane.in_flight for lane in self._lanes.values()),
        )
