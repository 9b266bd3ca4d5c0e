"""What a workflow job's log records of its steps (``docs/workflows.md``).

A workflow's log holds, in order: text it emitted, then a step (``step`` started, perhaps
the approval entries of a step that asks a person, ``step`` finished), more text, the next
step, and so on. A replay reads it back as ``WorkflowHistory``: each step as recorded with
the text emitted before it, and the text after the last one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Final

import attrs

from backstream.protocol.events import (
    ApprovalEvent,
    ApprovalRequiredEvent,
    LogEvent,
    RewindEvent,
    StepEvent,
    StepRecord,
    TextEvent,
)

__all__ = [
    "MAX_SUMMARY_CHARS",
    "WORKFLOW_PREFIX",
    "RecordedStep",
    "WorkflowHistory",
    "current_step",
    "short_summary",
    "step_bytes",
    "workflow_history",
    "workflow_name_of",
]

WORKFLOW_PREFIX: Final = "workflow/"
"""A job's model named ``workflow/<name>`` runs the workflow registered as ``<name>``."""
MAX_SUMMARY_CHARS: Final = 200
"""A step's ``summary`` is cut to this many characters."""


def workflow_name_of(model: str) -> str | None:
    """The workflow a model name names (``workflow/triage`` -> ``triage``), or None."""
    return model.removeprefix(WORKFLOW_PREFIX) if model.startswith(WORKFLOW_PREFIX) else None


def short_summary(value: Any) -> str:
    """A one-line summary of ``value`` for a step entry (at most ``MAX_SUMMARY_CHARS``)."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = " ".join(text.split())
    return text if len(text) <= MAX_SUMMARY_CHARS else text[: MAX_SUMMARY_CHARS - 1] + "…"


def step_bytes(event: StepEvent) -> int:
    """What a step entry counts toward ``max_workflow_recorded_bytes``: its data and
    summary in UTF-8."""
    return len((event.data or "").encode()) + len(event.summary.encode())


@attrs.frozen
class RecordedStep:
    """One step as the log holds it."""

    step: int
    name: str
    started: StepEvent
    finished: StepEvent | None
    text_before: str
    """The text the workflow emitted between the previous step and this one."""
    approval_asked: bool = False
    """The step asked a person (``approval_required`` logged)."""
    approved: bool | None = None
    """The person's decision, once logged."""


@attrs.frozen
class WorkflowHistory:
    steps: tuple[RecordedStep, ...]
    trailing_text: str
    """The text emitted after the last step (all of it when there is no step)."""
    recorded_bytes: int


@attrs.define
class _Open:
    started: StepEvent
    text_before: str
    asked: bool = False
    approved: bool | None = None


def workflow_history(entries: Iterable[LogEvent]) -> WorkflowHistory:
    """The steps a workflow job's log records, in order. The log's order is the lifecycle
    table's (``LOG_ORDER``): text only between steps, approvals only inside one."""
    steps: list[RecordedStep] = []
    text: list[str] = []
    opened: _Open | None = None
    recorded = 0
    for ev in entries:
        if isinstance(ev, TextEvent):
            text.append(ev.text)
        elif isinstance(ev, RewindEvent):  # not written by workflows; honoured all the same
            text = ["".join(text)[: ev.content_length]]
        elif isinstance(ev, StepEvent):
            recorded += step_bytes(ev)
            if ev.phase == "started":
                opened = _Open(ev, "".join(text))
                text = []
            elif opened is not None:
                steps.append(_recorded(opened, ev))
                opened = None
        elif isinstance(ev, ApprovalRequiredEvent) and opened is not None:
            opened.asked = True
        elif isinstance(ev, ApprovalEvent) and opened is not None:
            opened.approved = ev.approved
    if opened is not None:
        steps.append(_recorded(opened, None))
    return WorkflowHistory(steps=tuple(steps), trailing_text="".join(text), recorded_bytes=recorded)


def _recorded(opened: _Open, finished: StepEvent | None) -> RecordedStep:
    started = opened.started
    return RecordedStep(
        step=started.step,
        name=started.name,
        started=started,
        finished=finished,
        text_before=opened.text_before,
        approval_asked=opened.asked,
        approved=opened.approved,
    )


def current_step(entries: Iterable[LogEvent]) -> StepRecord | None:
    """A workflow job's latest step (the one running, or the last finished); None if its
    log holds no step."""
    latest: StepEvent | None = None
    summary = ""
    for ev in entries:
        if isinstance(ev, StepEvent):
            latest = ev
            if ev.phase == "started":
                summary = ev.summary
    if latest is None:
        return None
    if latest.phase == "started":
        return StepRecord(step=latest.step, name=latest.name, status="running", summary=summary)
    if latest.is_error:
        return StepRecord(step=latest.step, name=latest.name, status="failed", summary=latest.summary)
    return StepRecord(step=latest.step, name=latest.name, status="finished", summary=latest.summary)
