"""JSON forms of job records and log entries, for stores that keep text."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import cattrs

from backstream.protocol.codec import converter as wire
from backstream.protocol.events import LogEvent
from backstream.runtime.store import JobRecord

__all__ = ["events_from_json", "events_to_json", "record_from_dict", "record_to_dict"]

_records = cattrs.Converter()


def events_to_json(events: Sequence[LogEvent]) -> str:
    return json.dumps(
        [wire.unstructure(ev, LogEvent) for ev in events], separators=(",", ":"), ensure_ascii=False
    )


def events_from_json(text: str) -> list[LogEvent]:
    return [wire.structure(item, LogEvent) for item in json.loads(text)]  # type: ignore[arg-type]


def record_to_dict(record: JobRecord) -> dict[str, Any]:
    return _records.unstructure(record)  # type: ignore[no-any-return]


def record_from_dict(data: dict[str, Any]) -> JobRecord:
    return _records.structure(data, JobRecord)
