"""The job log's entries, batches and job summaries: the types PROTOCOL.md defines.

These are frozen attrs classes shared by the runtime, the wire codec and the
clients. They hold plain JSON-ready values only.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import attrs

__all__ = [
    "AWAITING_APPROVAL",
    "LIVE_STATUSES",
    "RUNNING",
    "TERMINAL_STATUSES",
    "ApprovalEvent",
    "ApprovalRequiredEvent",
    "Batch",
    "ErrorInfo",
    "JobInfo",
    "JobStatus",
    "JobSummary",
    "LogEvent",
    "ReasoningEvent",
    "RewindEvent",
    "StatusEvent",
    "StepEvent",
    "StepRecord",
    "TextEvent",
    "ToolCallDeltaEvent",
    "ToolCallEvent",
    "ToolCallRecord",
    "ToolResultEvent",
    "step_call_id",
]

JobStatus = Literal["running", "awaiting_approval", "completed", "failed", "aborted", "interrupted"]
RUNNING: Final = "running"
"""The first status of every job, and the status while it works (not waiting for a person)."""
AWAITING_APPROVAL: Final = "awaiting_approval"
"""A tool call waits for a person's decision."""
LIVE_STATUSES: Final[frozenset[JobStatus]] = frozenset({RUNNING, AWAITING_APPROVAL})
"""A job in one of these has not ended: a runtime instance owns it (and holds a lease). The
one definition of the live statuses: protocol, actors and stores take them from here."""
TERMINAL_STATUSES: Final[frozenset[JobStatus]] = frozenset({"completed", "failed", "aborted", "interrupted"})
"""A job in one of these has ended, its log is closed and its slot is free."""


@attrs.frozen
class ErrorInfo:
    """Why a job failed: a code from PROTOCOL.md and a readable message."""

    code: str
    message: str
    http_status: int | None = None


@attrs.frozen
class TextEvent:
    seq: int
    text: str
    kind: Literal["text"] = "text"


@attrs.frozen
class ReasoningEvent:
    seq: int
    text: str
    kind: Literal["reasoning"] = "reasoning"


@attrs.frozen
class ToolCallEvent:
    seq: int
    call_id: str
    name: str
    arguments: str  # JSON text exactly as the model sent it
    kind: Literal["tool_call"] = "tool_call"


@attrs.frozen
class ToolCallDeltaEvent:
    """A fragment of a tool call's arguments as the model streams it (opt-in per watch).

    The fragments of one call join into the ``arguments`` of its ``tool_call`` entry,
    which always follows them.
    """

    seq: int
    call_id: str
    name: str
    arguments_delta: str
    kind: Literal["tool_call_delta"] = "tool_call_delta"


@attrs.frozen
class ApprovalRequiredEvent:
    seq: int
    call_id: str
    name: str
    arguments: str
    kind: Literal["approval_required"] = "approval_required"


@attrs.frozen
class ApprovalEvent:
    seq: int
    call_id: str
    approved: bool
    kind: Literal["approval"] = "approval"


@attrs.frozen
class ToolResultEvent:
    seq: int
    call_id: str
    name: str
    output: str
    is_error: bool
    kind: Literal["tool_result"] = "tool_result"


@attrs.frozen
class RewindEvent:
    """The output of the current model turn after ``to_seq`` is withdrawn: the turn runs
    again from its start (a job continued after a crash under the ``restart`` policy).

    The entries after ``to_seq`` up to this one (text, reasoning, argument fragments) stay in
    the log but no longer count: a reader cuts its text back to ``content_length`` (the
    content's length at ``to_seq``) and drops that reasoning and those fragments.
    """

    seq: int
    to_seq: int
    content_length: int
    kind: Literal["rewind"] = "rewind"


@attrs.frozen
class StepEvent:
    """A step of a workflow job (``docs/workflows.md``) started or finished.

    ``step`` numbers the workflow's steps from 1; ``name`` is what the workflow called it
    (``tool:calculate``, ``model:backstream/echo``, ``approve``, ``sleep``, or a name of its
    own); ``summary`` is a short line for people. ``data`` is JSON text: on ``started`` what
    the step was asked (its replay needs it: a sleep's end, a tool's arguments), on
    ``finished`` its recorded result, which a replay returns without running the step
    again (with ``is_error``, an exception's ``{"type", "message"}``).
    """

    seq: int
    step: int
    name: str
    phase: Literal["started", "finished"]
    summary: str = ""
    data: str | None = None
    is_error: bool = False
    kind: Literal["step"] = "step"


def step_call_id(step: int) -> str:
    """The ``call_id`` of a workflow step's approval (``approval_required``, ``job.approve``)."""
    return f"step_{step}"


@attrs.frozen
class StatusEvent:
    seq: int
    status: JobStatus
    error: ErrorInfo | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    kind: Literal["status"] = "status"

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


LogEvent = (
    TextEvent
    | ReasoningEvent
    | ToolCallEvent
    | ToolCallDeltaEvent
    | ApprovalRequiredEvent
    | ApprovalEvent
    | ToolResultEvent
    | RewindEvent
    | StepEvent
    | StatusEvent
)


@attrs.frozen
class Batch:
    """Log entries ``from_seq``..``to_seq`` of one job, adjacent text merged.

    A merged text event carries the ``seq`` of the last entry it covers.
    """

    job_id: str
    epoch: int
    from_seq: int
    to_seq: int
    events: tuple[LogEvent, ...]

    @property
    def text(self) -> str:
        """The content text this batch adds (a batch with a ``rewind`` adds what follows it)."""
        text: list[str] = []
        for ev in self.events:
            if isinstance(ev, TextEvent):
                text.append(ev.text)
            elif isinstance(ev, RewindEvent):
                text = []
        return "".join(text)

    @property
    def terminal(self) -> StatusEvent | None:
        last = self.events[-1] if self.events else None
        if isinstance(last, StatusEvent) and last.is_terminal:
            return last
        return None


@attrs.frozen
class JobSummary:
    """A frozen snapshot of a job, as ``job`` in every reply of PROTOCOL.md."""

    job_id: str
    thread_id: str
    message_id: str
    status: JobStatus
    model: str
    seq: int
    epoch: int
    content_length: int
    created_at: str
    updated_at: str
    finished_at: str | None
    error: ErrorInfo | None
    usage: dict[str, Any] | None
    watchers: int

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


@attrs.frozen
class ToolCallRecord:
    """One tool call of a job with its outcome, as listed by ``job.get``."""

    call_id: str
    name: str
    arguments: str
    output: str | None = None
    is_error: bool | None = None
    approved: bool | None = None


@attrs.frozen
class StepRecord:
    """A workflow job's step, as ``job.get`` reports the current one."""

    step: int
    name: str
    status: Literal["running", "finished", "failed"]
    summary: str = ""


@attrs.frozen
class JobInfo:
    """The answer to ``job.get``."""

    job: JobSummary
    content: str | None = None
    tool_calls: tuple[ToolCallRecord, ...] = ()
    step: StepRecord | None = None
    """A workflow job's latest step (running, or the last finished); None for other jobs."""
