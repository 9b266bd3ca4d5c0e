"""Every message of PROTOCOL.md version 1, as a frozen attrs class.

Client requests carry ``id``; server replies echo it; pushes (``job.events``,
``notification``) carry none. Each class's wire ``type`` is its ``TYPE``.
Constraints on values live in validators, so that decoding reports them as
``bad_request``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import attrs

from backstream.protocol.events import JobSummary, LogEvent, StepRecord, ToolCallRecord

__all__ = [
    "CLIENT_MESSAGES",
    "MAX_NAME_CHARS",
    "MAX_REQUEST_ID_CHARS",
    "PROTOCOL_VERSION",
    "SERVER_MESSAGES",
    "ClientMessage",
    "ErrorMessage",
    "Hello",
    "JobAbort",
    "JobAbortResult",
    "JobApprove",
    "JobApproveResult",
    "JobEvents",
    "JobGet",
    "JobInfoMessage",
    "JobList",
    "JobListResult",
    "JobStart",
    "JobStarted",
    "JobUnwatch",
    "JobUnwatched",
    "JobWatch",
    "JobWatching",
    "Notification",
    "NotificationPush",
    "NotificationsList",
    "NotificationsRead",
    "NotificationsReadResult",
    "NotificationsResult",
    "Ping",
    "Pong",
    "ServerInfo",
    "ServerMessage",
    "ThreadMute",
    "ThreadMuteResult",
    "Welcome",
    "watch_ended_message",
]

PROTOCOL_VERSION = 1
MAX_REQUEST_ID_CHARS = 64
"""A request's ``id``, chosen by the client."""
MAX_NAME_CHARS = 256
"""A ``thread_id`` or ``message_id``."""
MAX_NAME_CHARS = 256


def _request_id(_inst: Any, _attr: attrs.Attribute[Any], value: str) -> None:
    if not 1 <= len(value) <= MAX_REQUEST_ID_CHARS:
        raise ValueError(f"id must be 1 to {MAX_REQUEST_ID_CHARS} characters")


def _name(_inst: Any, attr: attrs.Attribute[Any], value: str) -> None:
    if not 1 <= len(value) <= MAX_NAME_CHARS:
        raise ValueError(f"{attr.name} must be 1 to {MAX_NAME_CHARS} characters")


def _optional_name(_inst: Any, attr: attrs.Attribute[Any], value: str) -> None:
    if len(value) > MAX_NAME_CHARS:
        raise ValueError(f"{attr.name} must be at most {MAX_NAME_CHARS} characters")


def _non_negative(_inst: Any, attr: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attr.name} must not be negative")


def _list_limit(_inst: Any, attr: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and not 1 <= value <= 200:
        raise ValueError(f"{attr.name} must be from 1 to 200")


# -- client to server ---------------------------------------------------------------


@attrs.frozen
class Hello:
    TYPE: ClassVar[str] = "hello"
    id: str = attrs.field(validator=_request_id)
    protocol: int
    token: str | None = None
    client: str | None = None


@attrs.frozen
class JobStart:
    TYPE: ClassVar[str] = "job.start"
    id: str = attrs.field(validator=_request_id)
    thread_id: str = attrs.field(validator=_name)
    message_id: str = attrs.field(validator=_name)
    model: str = attrs.field(default="", validator=_optional_name)
    """Required unless ``workflow`` is given."""
    messages: list[dict[str, Any]] = attrs.field(factory=list)
    """Required (non-empty) unless ``workflow`` is given."""
    tools: list[str] = attrs.field(factory=list)
    params: dict[str, Any] = attrs.field(factory=dict)
    watch: bool = False
    tool_call_deltas: bool = False
    """With ``watch``: also send ``tool_call_delta`` events."""
    previous_job_id: str | None = attrs.field(default=None, validator=attrs.validators.optional(_name))
    """The job of the same thread (and user) this one continues: the server puts that job's
    conversation before ``messages``, which hold only what is new."""
    workflow: str | None = attrs.field(default=None, validator=attrs.validators.optional(_name))
    """Run this workflow (the model ``workflow/<name>``) instead of a model."""
    input: dict[str, Any] | None = None
    """The workflow's input (a JSON object)."""

    @property
    def model_name(self) -> str:
        """The model the job runs: ``workflow/<workflow>`` for a workflow."""
        return f"workflow/{self.workflow}" if self.workflow is not None else self.model


@attrs.frozen
class JobWatch:
    TYPE: ClassVar[str] = "job.watch"
    id: str = attrs.field(validator=_request_id)
    job_id: str
    after_seq: int = attrs.field(default=0, validator=_non_negative)
    epoch: int | None = None
    tool_call_deltas: bool = False
    """Also send ``tool_call_delta`` events (argument fragments as the model streams them)."""


@attrs.frozen
class JobUnwatch:
    TYPE: ClassVar[str] = "job.unwatch"
    id: str = attrs.field(validator=_request_id)
    job_id: str


@attrs.frozen
class JobAbort:
    TYPE: ClassVar[str] = "job.abort"
    id: str = attrs.field(validator=_request_id)
    job_id: str


@attrs.frozen
class JobGet:
    TYPE: ClassVar[str] = "job.get"
    id: str = attrs.field(validator=_request_id)
    job_id: str
    include_content: bool = False
    offset: int = attrs.field(default=0, validator=_non_negative)
    tool_calls_offset: int = attrs.field(default=0, validator=_non_negative)


@attrs.frozen
class JobList:
    TYPE: ClassVar[str] = "job.list"
    id: str = attrs.field(validator=_request_id)
    thread_id: str | None = None
    status: list[str] | None = None
    limit: int = attrs.field(default=50, validator=_list_limit)


@attrs.frozen
class JobApprove:
    TYPE: ClassVar[str] = "job.approve"
    id: str = attrs.field(validator=_request_id)
    job_id: str
    call_id: str
    approved: bool


@attrs.frozen
class NotificationsList:
    TYPE: ClassVar[str] = "notifications.list"
    id: str = attrs.field(validator=_request_id)
    unread_only: bool = False
    limit: int = attrs.field(default=50, validator=_list_limit)


@attrs.frozen
class NotificationsRead:
    TYPE: ClassVar[str] = "notifications.read"
    id: str = attrs.field(validator=_request_id)
    ids: list[str] = attrs.field(factory=list)
    all: bool = False


@attrs.frozen
class ThreadMute:
    TYPE: ClassVar[str] = "thread.mute"
    id: str = attrs.field(validator=_request_id)
    thread_id: str = attrs.field(validator=_name)
    muted: bool


@attrs.frozen
class Ping:
    TYPE: ClassVar[str] = "ping"
    id: str = attrs.field(validator=_request_id)


ClientMessage = (
    Hello
    | JobStart
    | JobWatch
    | JobUnwatch
    | JobAbort
    | JobGet
    | JobList
    | JobApprove
    | NotificationsList
    | NotificationsRead
    | ThreadMute
    | Ping
)
CLIENT_MESSAGES: dict[str, type[Any]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        JobStart,
        JobWatch,
        JobUnwatch,
        JobAbort,
        JobGet,
        JobList,
        JobApprove,
        NotificationsList,
        NotificationsRead,
        ThreadMute,
        Ping,
    )
}


# -- server to client ---------------------------------------------------------------


@attrs.frozen
class ServerInfo:
    name: str
    version: str


@attrs.frozen
class Welcome:
    TYPE: ClassVar[str] = "welcome"
    id: str
    protocol: int
    user: str
    session_id: str
    server: ServerInfo
    features: dict[str, Any]
    limits: dict[str, Any]
    models: list[str] | None = None
    """Glob patterns of the models ``job.start`` may name on this server."""


@attrs.frozen
class JobStarted:
    TYPE: ClassVar[str] = "job.started"
    id: str
    job: JobSummary
    existing: bool
    stream: str | None = None
    """The path of the job's durable stream on the HTTP port (``/v1/streams/jobs/ID``)."""


@attrs.frozen
class JobWatching:
    TYPE: ClassVar[str] = "job.watching"
    id: str
    job: JobSummary


@attrs.frozen
class JobUnwatched:
    TYPE: ClassVar[str] = "job.unwatched"
    id: str
    job_id: str


@attrs.frozen
class JobAbortResult:
    TYPE: ClassVar[str] = "job.abort.result"
    id: str
    aborted: bool
    job: JobSummary


@attrs.frozen
class JobInfoMessage:
    TYPE: ClassVar[str] = "job.info"
    id: str
    job: JobSummary
    content: str | None = None
    tool_calls: list[ToolCallRecord] = attrs.field(factory=list)
    next_offset: int | None = None
    """Present when ``content`` was cut to fit the frame: ask again from this offset."""
    next_tool_calls_offset: int | None = None
    """Present when more tool calls follow: ask again with this ``tool_calls_offset``."""
    step: StepRecord | None = None
    """A workflow job's latest step (running, or the last finished)."""
    stream: str | None = None
    """The path of the job's durable stream on the HTTP port (``/v1/streams/jobs/ID``)."""


@attrs.frozen
class JobListResult:
    TYPE: ClassVar[str] = "job.list.result"
    id: str
    jobs: list[JobSummary]


@attrs.frozen
class JobApproveResult:
    TYPE: ClassVar[str] = "job.approve.result"
    id: str
    job: JobSummary


@attrs.frozen
class Notification:
    notification_id: str
    type: Literal["ai.message.received", "system.warning", "ai.tool.approval_required"]
    job_id: str
    thread_id: str
    title: str
    body: str
    created_at: str
    read: bool


@attrs.frozen
class NotificationsResult:
    TYPE: ClassVar[str] = "notifications.result"
    id: str
    notifications: list[Notification]
    unread: int


@attrs.frozen
class NotificationsReadResult:
    TYPE: ClassVar[str] = "notifications.read.result"
    id: str
    unread: int


@attrs.frozen
class ThreadMuteResult:
    TYPE: ClassVar[str] = "thread.mute.result"
    id: str
    thread_id: str
    muted: bool


@attrs.frozen
class Pong:
    TYPE: ClassVar[str] = "pong"
    id: str


@attrs.frozen
class ErrorMessage:
    """A request failed (``id`` is the request's), or the server ended a watch (``id`` null)."""

    TYPE: ClassVar[str] = "error"
    id: str | None
    code: str
    message: str
    retry_after_ms: int | None = None
    job_id: str | None = None
    """The job the error concerns: the one the request named, or the one whose watch ended."""
    valid_through: int | None = None
    """With ``gone`` for a cursor of an epoch before a takeover: the last ``seq`` of the
    reader's view that the log kept (it drops what it has beyond and watches again from
    here at ``epoch``)."""
    content_length: int | None = None
    """With ``valid_through``: the content's length at that ``seq``."""
    epoch: int | None = None
    """With ``valid_through``: the log's epoch now."""


@attrs.frozen
class JobEvents:
    """Push: a batch of a watched job's log."""

    TYPE: ClassVar[str] = "job.events"
    job_id: str
    epoch: int
    from_seq: int
    to_seq: int
    events: list[LogEvent]


@attrs.frozen
class NotificationPush:
    TYPE: ClassVar[str] = "notification"
    notification: Notification


ServerMessage = (
    Welcome
    | JobStarted
    | JobWatching
    | JobUnwatched
    | JobAbortResult
    | JobInfoMessage
    | JobListResult
    | JobApproveResult
    | NotificationsResult
    | NotificationsReadResult
    | ThreadMuteResult
    | Pong
    | ErrorMessage
    | JobEvents
    | NotificationPush
)
SERVER_MESSAGES: dict[str, type[Any]] = {
    cls.TYPE: cls
    for cls in (
        Welcome,
        JobStarted,
        JobWatching,
        JobUnwatched,
        JobAbortResult,
        JobInfoMessage,
        JobListResult,
        JobApproveResult,
        NotificationsResult,
        NotificationsReadResult,
        ThreadMuteResult,
        Pong,
        ErrorMessage,
        JobEvents,
        NotificationPush,
    )
}


# -- a watch the server ends: an ``error`` without ``id``, with ``job_id`` ---------------------


def watch_ended_message(job_id: str, why: str) -> str:
    """The (human) text of the ``error`` that ends a watch on the server's side; clients tell
    which watch ended by the error's ``job_id``."""
    return f"watch of {job_id} ended: {why}"
