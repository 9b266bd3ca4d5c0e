"""What stores keep: job records, requests, progress and notifications, and their JSON forms.

Plain frozen values, shared by the actors that write them and the stores that keep them.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from typing import Any

import attrs
import cattrs
import orjson

from backstream.protocol.codec import converter as wire
from backstream.protocol.codec import dumps
from backstream.protocol.events import ErrorInfo, JobStatus, JobSummary, LogEvent

__all__ = [
    "PREVIEW_CHARS",
    "JobProgress",
    "JobRecord",
    "JobRequest",
    "NotificationRecord",
    "SharedCapacity",
    "events_from_json",
    "events_to_json",
    "format_time",
    "job_summary",
    "log_bytes",
    "progress_to_dict",
    "record_from_dict",
    "record_to_dict",
    "request_bytes",
]


@attrs.frozen
class JobRequest:
    """What the job was asked to do: kept with the job, sent to the model."""

    model: str
    messages: tuple[dict[str, Any], ...]
    params: dict[str, Any] = attrs.field(factory=dict)
    tools: tuple[str, ...] = ()
    annotations: dict[str, Any] = attrs.field(factory=dict)
    """What the caller attached to the job to be given back as it was (the Responses API's
    instructions, metadata and tools); never sent to the model."""


@attrs.frozen
class SharedCapacity:
    """Limits a store shared by many instances enforces as it creates a job."""

    now: float
    lease_until: float
    max_jobs: int
    max_jobs_per_user: int


@attrs.frozen
class JobProgress:
    """The fields of a job record that each commit moves forward."""

    status: JobStatus
    seq: int
    content_length: int
    updated_at: float
    finished_at: float | None = None
    error: ErrorInfo | None = None
    usage: dict[str, Any] | None = None
    expires_at: float | None = None
    preview: str | None = None
    """On a terminal commit, the start of the job's content (``PREVIEW_CHARS``): its outbox
    entry carries it to the notification, so nobody reads the log back for it. Not a field
    of the record."""


PREVIEW_CHARS = 200
"""The characters of a job's content a notification of its end shows."""


def _int_tuple(values: Sequence[int]) -> tuple[int, ...]:
    return tuple(values)


@attrs.frozen
class JobRecord:
    """A job as the store keeps it. ``seq`` is the last entry written durably."""

    job_id: str
    user: str
    thread_id: str
    message_id: str
    request: JobRequest
    status: JobStatus
    seq: int
    epoch: int
    content_length: int
    created_at: float
    updated_at: float
    finished_at: float | None = None
    error: ErrorInfo | None = None
    usage: dict[str, Any] | None = None
    expires_at: float | None = None
    abort_requested: bool = False
    owner: str | None = None  # the runtime instance that runs it
    lease_until: float | None = None  # past this, without renewal, the job is an orphan
    handoffs: int = 0
    """How many of its takeovers followed a clean hand-off (a stopping instance left it
    running for another) rather than a crash: those do not count toward
    ``max_continuations``."""
    epoch_ends: tuple[int, ...] = attrs.field(default=(), converter=_int_tuple)
    """``epoch_ends[e - 1]``: the last ``seq`` epoch ``e`` wrote durably, which the log kept
    when the job was taken over at epoch ``e + 1`` (the record's ``seq`` at the takeover)."""

    def kept_through(self, epoch: int) -> int | None:
        """The last ``seq`` a reader of ``epoch`` saw that the log still holds as it was;
        None for the current epoch or one the job never had."""
        return self.epoch_ends[epoch - 1] if 1 <= epoch < self.epoch <= len(self.epoch_ends) + 1 else None

    @property
    def model(self) -> str:
        return self.request.model

    def advanced(self, progress: JobProgress) -> JobRecord:
        return attrs.evolve(
            self,
            status=progress.status,
            seq=progress.seq,
            content_length=progress.content_length,
            updated_at=progress.updated_at,
            finished_at=progress.finished_at,
            error=progress.error,
            usage=progress.usage,
            expires_at=progress.expires_at,
        )


@attrs.frozen
class NotificationRecord:
    notification_id: str
    user: str
    type: str  # ai.message.received | system.warning | ai.tool.approval_required
    job_id: str
    thread_id: str
    title: str
    body: str
    created_at: float
    read: bool = False


def format_time(ts: float | None) -> str | None:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-21T10:00:00.123Z``."""
    if ts is None:
        return None
    moment = _dt.datetime.fromtimestamp(ts, tz=_dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def job_summary(record: JobRecord, watchers: int) -> JobSummary:
    """The wire summary of a job: the one place it is built, for live and stored jobs alike
    (a live job's actor first takes a ``JobRecord`` snapshot of itself)."""
    created = format_time(record.created_at)
    updated = format_time(record.updated_at)
    assert created is not None and updated is not None
    return JobSummary(
        job_id=record.job_id,
        thread_id=record.thread_id,
        message_id=record.message_id,
        status=record.status,
        model=record.model,
        seq=record.seq,
        epoch=record.epoch,
        content_length=record.content_length,
        created_at=created,
        updated_at=updated,
        finished_at=format_time(record.finished_at),
        error=record.error,
        usage=record.usage,
        watchers=watchers,
    )


_records = cattrs.Converter()


def events_to_json(events: Sequence[LogEvent]) -> str:
    """Compact JSON (orjson: a store's every flush encodes its entries)."""
    return dumps([wire.unstructure(ev, LogEvent) for ev in events])


def events_from_json(text: str) -> list[LogEvent]:
    try:
        items = orjson.loads(text)
    except orjson.JSONDecodeError:  # a lone surrogate, which orjson refuses to read
        items = json.loads(text)
    return [wire.structure(item, LogEvent) for item in items]  # type: ignore[arg-type]


def record_to_dict(record: JobRecord) -> dict[str, Any]:
    return _records.unstructure(record)  # type: ignore[no-any-return]


def record_from_dict(data: dict[str, Any]) -> JobRecord:
    return _records.structure(data, JobRecord)


def request_bytes(request: JobRequest) -> int:
    """What a job's request counts against its user's quota of stored bytes: its compact
    JSON in UTF-8 (as the SQLite store keeps it), the same on every store."""
    data = _records.unstructure(request)
    return len(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode())


def log_bytes(events: Sequence[LogEvent]) -> int:
    """What log entries count against their user's quota: ``events_to_json`` in UTF-8, as
    each commit stores a batch (every store counts the batches it appends)."""
    return len(events_to_json(events).encode()) if events else 0


def progress_to_dict(progress: JobProgress) -> dict[str, Any]:
    """The progress fields as they appear in ``record_to_dict``'s output."""
    data: dict[str, Any] = _records.unstructure(progress)
    del data["preview"]  # the outbox entry's, not the record's
    return data
