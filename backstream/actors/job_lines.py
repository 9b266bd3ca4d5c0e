"""The log lines of a job's start and end: who, which model, how it ended, how long, how
much; never content or tokens.

Each line's fields travel with it as ``extra={"fields": {...}}``: the text format shows
them in the message, the JSON format (``serve --log-format json``) as keys of their own.
"""

from __future__ import annotations

import logging
from typing import Any

from backstream.protocol.events import StatusEvent
from backstream.protocol.records import JobRecord

__all__ = ["log_job_ended", "log_job_started"]

log = logging.getLogger("backstream.job")


def log_job_started(record: JobRecord, *, continued: bool) -> None:
    """Cancellation: not a checkpoint."""
    request = record.request
    fields: dict[str, Any] = {
        "job_id": record.job_id,
        "user": record.user,
        "thread_id": record.thread_id,
        "model": request.model,
        "prompt_messages": len(request.messages),
        "prompt_chars": sum(_chars(message.get("content")) for message in request.messages),
        "tools": len(request.tools),
    }
    if continued:
        fields["continued_at_seq"] = record.seq
    _line("job started", fields)


def log_job_ended(
    record: JobRecord, terminal: StatusEvent, *, ended_at: float, output_chars: int
) -> None:
    """Cancellation: not a checkpoint."""
    fields: dict[str, Any] = {
        "job_id": record.job_id,
        "user": record.user,
        "model": record.request.model,
        "status": terminal.status,
        "error": terminal.error.code if terminal.error is not None else None,
        "duration_s": round(max(0.0, ended_at - record.created_at), 3),
        "entries": terminal.seq,
        "output_chars": output_chars,
    }
    _line("job ended", fields, level=logging.INFO if terminal.error is None else logging.WARNING)


def _line(what: str, fields: dict[str, Any], *, level: int = logging.INFO) -> None:
    if log.isEnabledFor(level):
        shown = " ".join(f"{key}={value}" for key, value in fields.items() if value is not None)
        log.log(level, "%s: %s", what, shown, extra={"fields": fields})


def _chars(content: object) -> int:
    """Characters of a message's content: a string, or text parts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(part.get("text", "")) for part in content if isinstance(part, dict))
    return 0
