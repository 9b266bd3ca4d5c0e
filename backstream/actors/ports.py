"""The interfaces the actors depend on: a store, a model and tools.

Actors never import the runtime that implements these. The runtime builds a
store (memory, SQLite, Redis), models (the upstream client, the built-ins) and
a tool registry, and hands them to the actors at construction.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
import trio

from backstream.protocol.chat_stream import ModelOutput, ToolCallDone
from backstream.protocol.events import ErrorInfo, LogEvent
from backstream.protocol.records import JobProgress, JobRecord, NotificationRecord, SharedCapacity

__all__ = [
    "ChatTurn",
    "Model",
    "ModelFailure",
    "NotificationListener",
    "OutputSink",
    "Store",
    "ToolOutcome",
    "ToolSpec",
    "Tools",
    "TurnResult",
]

# -- models ------------------------------------------------------------------------------

OutputSink = Callable[[ModelOutput], None]
"""Receives each output as it arrives; may raise to stop the turn (e.g. the output limit)."""


class ModelFailure(Exception):
    """The turn failed; ``error`` says why, with a job error code."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


@attrs.frozen
class ChatTurn:
    """One request to a model: the conversation so far and the options."""

    model: str
    messages: tuple[dict[str, Any], ...]
    params: dict[str, Any] = attrs.field(factory=dict)
    tools: tuple[dict[str, Any], ...] = ()  # OpenAI "tools" entries


@attrs.frozen
class TurnResult:
    finish_reason: str
    usage: dict[str, Any] | None
    tool_calls: tuple[ToolCallDone, ...]


class Model(Protocol):
    async def run_turn(self, turn: ChatTurn, sink: OutputSink) -> TurnResult:
        """Stream one turn into ``sink``. Raises ``ModelFailure``.

        Cancellation: the request is abandoned at once and its connection closed.
        """
        ...


# -- tools -------------------------------------------------------------------------------


@attrs.frozen
class ToolOutcome:
    """What a tool call gave back to the model: its output text, or an error text."""

    output: str
    is_error: bool


class ToolSpec(Protocol):
    """A tool as a job sees it."""

    @property
    def name(self) -> str: ...

    @property
    def requires_approval(self) -> bool: ...

    @property
    def max_output_chars(self) -> int:
        """Characters of output kept of one call; the rest is cut before the log."""
        ...

    def openai_spec(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry that describes it to a model."""
        ...


class Tools(Protocol):
    """The tools a job may call, by name."""

    def get(self, name: str) -> ToolSpec | None: ...

    async def run(self, name: str, arguments: str) -> ToolOutcome:
        """Validate ``arguments`` (JSON text) and run the tool under its own timeout.

        Never raises for the tool's faults: they become an error outcome.
        Cancellation: the call is abandoned (a subprocess is killed).
        """
        ...


# -- the store ---------------------------------------------------------------------------

NotificationListener = Callable[[NotificationRecord], None]


@attrs.define
class _Decision:
    event: trio.Event = attrs.Factory(trio.Event)
    approved: bool = False


class Store(abc.ABC):
    """Jobs, their logs and the signals between instances.

    Methods raise ``UnavailableError`` when the backing service cannot be
    reached. None of them takes a timeout: deadlines live with the caller.
    """

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and prepare (migrations, scripts). Called once before use."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections. Cancellation: resources are still released."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Return if the store answers; raise ``UnavailableError`` if not."""

    @abc.abstractmethod
    async def create_job(
        self, record: JobRecord, capacity: SharedCapacity | None = None
    ) -> tuple[JobRecord, bool]:
        """Insert ``record`` unless the user already has a job with its ``message_id``.

        Returns ``(record, True)`` when inserted, or ``(existing, False)``. Atomic: two
        racing creates never both insert. A store shared by many instances also takes a
        running-job slot in the same step, and raises ``CapacityError`` past
        ``capacity``'s limits (leases that ended before ``capacity.now``, a dead
        instance's, do not count); single-process stores ignore ``capacity``.
        """

    @abc.abstractmethod
    async def get_job(self, job_id: str) -> JobRecord | None:
        """The record, or None if there is none (never existed, or swept)."""

    @abc.abstractmethod
    async def find_job(self, user: str, message_id: str) -> JobRecord | None:
        """The user's job started with ``message_id``, if any."""

    @abc.abstractmethod
    async def commit(self, job_id: str, entries: Sequence[LogEvent], progress: JobProgress) -> None:
        """Append ``entries`` (which continue the stored log) and apply ``progress``, atomically.

        Entries the store already holds (a retried commit) are not appended twice. A commit
        for a job the store no longer holds does nothing. Wakes everyone in
        ``wait_for_entries`` on this job; a terminal commit frees the job's shared slot.
        """

    @abc.abstractmethod
    async def read(self, job_id: str, after_seq: int, limit: int) -> list[LogEvent]:
        """Up to ``limit`` stored entries after ``after_seq``, in order."""

    @abc.abstractmethod
    async def wait_for_entries(self, job_id: str, after_seq: int) -> None:
        """Return once the stored log goes past ``after_seq`` or the job is gone.

        May return early (callers re-read and wait again). Cancellation: safe.
        """

    @abc.abstractmethod
    async def list_jobs(
        self,
        user: str,
        *,
        thread_id: str | None = None,
        statuses: frozenset[str] | None = None,
        limit: int = 50,
    ) -> list[JobRecord]:
        """The user's jobs, newest first, filtered by thread and status."""

    @abc.abstractmethod
    async def delete_expired(self, now: float) -> list[str]:
        """Delete every finished job whose ``expires_at`` has passed; return their ids."""

    @abc.abstractmethod
    async def request_abort(self, job_id: str) -> None:
        """Mark the job to be aborted, and tell the instance that runs it, wherever it is."""

    @abc.abstractmethod
    async def wait_abort_requested(self, job_id: str) -> None:
        """Return when an abort of ``job_id`` has been requested (perhaps already).

        Cancellation: safe; nothing is consumed.
        """

    # -- watchers and notifications ----------------------------------------------------------
    # Single-process stores keep presence, mutes and notifications in memory-backed state of
    # their own; a shared store keeps them where every instance sees them.

    notification_listener: NotificationListener | None = None
    """Called with every notification created on any instance (for pushing to connections)."""

    @abc.abstractmethod
    async def watch_started(self, job_id: str, watch_id: str, until: float) -> None:
        """Someone watches ``job_id`` (until ``until`` unless renewed, for shared stores)."""

    @abc.abstractmethod
    async def watch_ended(self, job_id: str, watch_id: str, *, saw_end: bool) -> None:
        """That watch ended (unwatched, finished, or its connection dropped). ``saw_end``:
        it delivered the terminal status, so the job counts as watched when it ended, even
        if the watch is gone before the notification check runs."""

    async def renew_watches(self, watches: Sequence[tuple[str, str]], until: float) -> None:
        """Extend the presence of this instance's ``(job_id, watch_id)`` watches."""
        await trio.lowlevel.checkpoint()

    @abc.abstractmethod
    async def notify_unwatched(self, notification: NotificationRecord, now: float, max_per_user: int) -> bool:
        """Atomically: if nobody watches the job (on any instance), the thread is not muted
        and the job has no notification of this type yet, store ``notification`` (keeping
        the user's newest ``max_per_user``) and announce it to every instance. Returns
        whether it was created."""

    @abc.abstractmethod
    async def list_notifications(
        self, user: str, *, unread_only: bool, limit: int
    ) -> tuple[list[NotificationRecord], int]:
        """The user's notifications, newest first, and how many are unread."""

    @abc.abstractmethod
    async def mark_notifications_read(self, user: str, ids: Sequence[str], *, everything: bool) -> int:
        """Mark some (or all) of the user's notifications read; return how many stay unread."""

    @abc.abstractmethod
    async def set_thread_muted(self, user: str, thread_id: str, muted: bool) -> None:
        """Mute or unmute a thread's notifications for its user."""

    # -- approvals: a decision may come through another instance ------------------------

    def _decision_slot(self, job_id: str, call_id: str) -> _Decision:
        slots: dict[tuple[str, str], _Decision] = self.__dict__.setdefault("_decision_slots", {})
        return slots.setdefault((job_id, call_id), _Decision())

    def _forget_decision(self, job_id: str, call_id: str) -> None:
        self.__dict__.get("_decision_slots", {}).pop((job_id, call_id), None)

    async def send_decision(self, job_id: str, call_id: str, approved: bool) -> None:
        """Deliver a person's decision on a tool call to the instance that runs the job."""
        await trio.lowlevel.checkpoint()
        slot = self._decision_slot(job_id, call_id)
        slot.approved = approved
        slot.event.set()

    async def wait_decision(self, job_id: str, call_id: str) -> bool:
        """Wait for the decision on a tool call. Cancellation: safe."""
        slot = self._decision_slot(job_id, call_id)
        try:
            await slot.event.wait()
            return slot.approved
        finally:
            self._forget_decision(job_id, call_id)

    # -- many instances: leases, orphans, shared capacity -----------------------------
    # The defaults fit a store that one process owns (memory): nothing is shared.

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The store's background work (e.g. listening for other instances), until cancelled."""
        task_status.started()
        await trio.sleep_forever()

    async def renew_leases(self, owner: str, job_ids: Sequence[str], until: float) -> None:
        """Extend the leases of ``owner``'s running jobs to ``until``."""
        await trio.lowlevel.checkpoint()

    async def recover_orphans(self, owner: str, now: float, retention: float) -> list[JobRecord]:
        """End ``interrupted`` every running job whose instance is gone, keeping its durable
        log: the terminal status goes after the last durable entry and the epoch grows by
        one. Returns the jobs this call recovered (each exactly once across instances)."""
        await trio.lowlevel.checkpoint()
        return []
