"""Webhooks, as plain values: endpoints, events, deliveries and their retry schedule.

Sans-IO: it builds the events a job's end (or a wait for approval) sends, in OpenAI's
envelope (``{"id": "evt_…", "object": "event", "created_at", "type", "data"}``), and
says when a failed delivery is tried again. Signing and sending live in the runtime.

An event's id derives from the job and the event's type, so recording it twice (the
outbox entry carried out again after a crash) records the same delivery, and the
receiver sees one ``webhook-id`` however many attempts it takes.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import urllib.parse
from collections.abc import Sequence
from typing import Any

import attrs

from backstream.protocol.events import ErrorInfo
from backstream.protocol.responses import response_status

__all__ = [
    "ALL_EVENTS",
    "DEFAULT_EVENTS",
    "DEFAULT_RETRY_SCHEDULE",
    "JOB_EVENTS",
    "RESPONSE_EVENTS",
    "WebhookDelivery",
    "WebhookEndpoint",
    "delivery_for",
    "endpoint_key",
    "event_body",
    "event_id",
    "next_attempt_delay",
    "parse_endpoint",
    "parse_retry_schedule",
    "response_event_type",
]

RESPONSE_EVENTS = ("response.completed", "response.failed", "response.cancelled", "response.incomplete")
"""OpenAI's events of a background response's end: every endpoint gets them unless it
names its events."""
JOB_EVENTS = ("job.approval_required", "job.ended")
"""backstream's own events: an endpoint gets them only if it names them."""
ALL_EVENTS = RESPONSE_EVENTS + JOB_EVENTS
DEFAULT_EVENTS = frozenset(RESPONSE_EVENTS)

DEFAULT_RETRY_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
"""Standard Webhooks' suggested waits between attempts: 5 s, 5 min, 30 min, 2 h, 5 h,
10 h, 10 h. After the last, a delivery is dead-lettered."""

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@attrs.frozen
class WebhookEndpoint:
    """Where events go, set by the operator (``--webhook``)."""

    url: str
    events: frozenset[str] = DEFAULT_EVENTS
    include_content: bool = False
    """``job.ended`` carries the job's text too."""

    @property
    def key(self) -> str:
        return endpoint_key(self.url)

    def wants(self, event_type: str) -> bool:
        return event_type in self.events


def endpoint_key(url: str) -> str:
    """A short stable name of an endpoint's URL (store keys, the CLI, metrics)."""
    return "ep_" + hashlib.sha256(url.encode()).hexdigest()[:16]


def parse_endpoint(text: str) -> WebhookEndpoint:
    """``URL`` or ``URL#events=TYPE+TYPE&content=true``: the fragment (never sent) names
    the events (``response.*`` and ``job.*`` stand for their families) and whether
    ``job.ended`` carries the text. Raises ``ValueError`` saying what is wrong."""
    url, _, fragment = text.strip().partition("#")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    events: frozenset[str] = DEFAULT_EVENTS
    include_content = False
    for name, value in urllib.parse.parse_qsl(fragment, keep_blank_values=True):
        if name == "events":
            events = _event_types(re.split(r"[+ |]", value))
        elif name == "content":
            include_content = value.strip().lower() in ("1", "true", "yes", "on")
        else:
            raise ValueError(f"{text!r}: unknown option {name!r} after # (events=…, content=…)")
    return WebhookEndpoint(url, events, include_content)


def endpoint_from_table(table: dict[str, Any]) -> WebhookEndpoint:
    """A TOML table ``{url = "…", events = ["…"], content = true}``."""
    url = table.get("url")
    if not isinstance(url, str):
        raise ValueError(f'{table!r}: a webhook table needs url = "http(s)://…"')
    unknown = set(table) - {"url", "events", "content"}
    if unknown:
        raise ValueError(f"{url!r}: unknown keys {', '.join(sorted(unknown))} (url, events, content)")
    endpoint = parse_endpoint(url)
    events = table.get("events")
    if events is not None:
        if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
            raise ValueError(f"{url!r}: events must be a list of event types")
        endpoint = attrs.evolve(endpoint, events=_event_types(events))
    return attrs.evolve(endpoint, include_content=bool(table.get("content", False)))


def _event_types(names: Sequence[str]) -> frozenset[str]:
    chosen: set[str] = set()
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name.endswith(".*"):
            family = [e for e in ALL_EVENTS if e.startswith(name[:-1])]
            if not family:
                raise ValueError(f"no event types match {name!r}")
            chosen.update(family)
        elif name in ALL_EVENTS:
            chosen.add(name)
        else:
            raise ValueError(f"{name!r} is not an event type ({', '.join(ALL_EVENTS)})")
    if not chosen:
        raise ValueError("events= names no event type")
    return frozenset(chosen)


def parse_retry_schedule(text: str) -> tuple[float, ...]:
    """``5s,5m,30m,2h`` (units ms, s, m, h, d; a bare number is seconds): the waits after
    each failed attempt. Raises ``ValueError``."""
    delays: list[float] = []
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?", part)
        if match is None:
            raise ValueError(f"{part!r} is not a duration such as 5s, 5m, 2h")
        delays.append(float(match[1]) * _UNITS[match[2] or "s"])
    if not delays:
        raise ValueError("the retry schedule needs at least one wait, e.g. 5s,5m,30m")
    return tuple(delays)


def next_attempt_delay(
    schedule: Sequence[float], failures: int, rng: random.Random | None = None
) -> float | None:
    """The wait after the ``failures``-th failed attempt (1-based), with ±20% jitter so
    that events that failed together are not retried together; None once the schedule
    is spent: the delivery is dead-lettered."""
    if failures > len(schedule):
        return None
    delay = schedule[failures - 1]
    return delay * (0.8 + 0.4 * (rng or random).random())


def response_event_type(status: str, error: ErrorInfo | None, finish_reason: str | None) -> str:
    """The OpenAI event of a job's end, as the Responses API shows its status: a stopped
    job (aborted) is ``response.cancelled`` (OpenAI's webhook for a cancelled background
    response, though its event stream ends ``response.incomplete``)."""
    return "response." + response_status(status, error, finish_reason)


def event_id(job_id: str, event_type: str, detail: str = "") -> str:
    """The event's id: the same for the same job, type and detail (a tool call's id)."""
    digest = hashlib.sha256(f"{job_id}\n{event_type}\n{detail}".encode()).hexdigest()
    return "evt_" + digest[:32]


def event_body(event_id_: str, event_type: str, created_at: float, data: dict[str, Any]) -> str:
    """The JSON body, OpenAI's envelope."""
    envelope = {
        "id": event_id_,
        "object": "event",
        "created_at": int(created_at),
        "type": event_type,
        "data": data,
    }
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)


@attrs.frozen
class WebhookDelivery:
    """One event on its way to one endpoint, as the store keeps it."""

    delivery_id: str
    """``<event id>:<endpoint key>``: unique in the store; recording it again is a no-op."""
    endpoint: str
    """The endpoint's key."""
    url: str
    event_id: str
    """The ``webhook-id`` of every attempt."""
    event_type: str
    body: str
    created_at: float
    attempts: int = 0
    next_at: float = 0.0
    last_error: str = ""
    dead: bool = False
    dead_at: float | None = None


def delivery_for(
    endpoint: WebhookEndpoint, event_id_: str, event_type: str, body: str, now: float
) -> WebhookDelivery:
    return WebhookDelivery(
        delivery_id=f"{event_id_}:{endpoint.key}",
        endpoint=endpoint.key,
        url=endpoint.url,
        event_id=event_id_,
        event_type=event_type,
        body=body,
        created_at=now,
        next_at=now,
    )
