"""A job's lifecycle: the order of its log, its statuses, and the recovery step.

The single source of truth for what a job may go through, after h11's ``_state.py``:
``LOG_ORDER`` maps (where the log is, the kind of the next entry) to where the log is
then, and ``LogOrder`` walks a log through it. The job log refuses an entry the table
does not allow (in one place, as it appends); a log rebuilt from stored entries is
checked the same way. The status ``TRANSITIONS`` are derived from the table; every store
takes its live and terminal sets from here (SQL queries are built from them, Lua scripts
get them as arguments), and the "end an orphan ``interrupted``" step is defined once, as
values every store writes the same way.

Where the log is (``LogState``) and what may come next::

    NOT_STARTED --status running--> NEXT_TURN
    NEXT_TURN --text|reasoning|tool_call_delta--> MODEL_TURN --tool_call--> CALLS_ANNOUNCED
    MODEL_TURN --rewind--> NEXT_TURN  (the turn runs again from its start)
    NEXT_TURN --tool_call--> CALLS_ANNOUNCED
    CALLS_ANNOUNCED --approval_required--> APPROVAL_REQUESTED
        --status awaiting_approval--> AWAITING_APPROVAL --approval--> APPROVAL_DECIDED
        --status running--> CALLS_ANNOUNCED
    CALLS_ANNOUNCED --tool_result--> TOOLS_ANSWERING --(every call answered)--> NEXT_TURN
    NEXT_TURN | MODEL_TURN --status completed--> ENDED
    NEXT_TURN | MODEL_TURN --step started--> IN_STEP --step finished--> NEXT_TURN  (workflows)
    IN_STEP --approval_required--> STEP_APPROVAL_REQUESTED --status awaiting_approval-->
        STEP_AWAITING_APPROVAL --approval--> STEP_APPROVAL_DECIDED --status running--> IN_STEP
    CALLS_ANNOUNCED | TOOLS_ANSWERING --status completed--> ENDED  (client-side calls left open)
    any but ENDED --status failed|aborted|interrupted--> ENDED  (nothing follows)

A workflow's log holds steps instead of turns: its text (what it emits) comes between
steps, and a step that asks a person goes through the approval entries inside the step.

A turn's own output (text, reasoning, argument fragments, more calls) may also follow its
calls: the model's stream orders them, not the job. A turn ends ``completed`` if it
announced no calls, or once its server-side calls have their results when it also called
client-side tools (``client_tools``: their results come with the next job); the next turn
starts once every call of the last one has its result.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Final

import attrs

from backstream.protocol.events import (
    AWAITING_APPROVAL,
    LIVE_STATUSES,
    RUNNING,
    TERMINAL_STATUSES,
    ApprovalEvent,
    ApprovalRequiredEvent,
    JobStatus,
    LogEvent,
    StatusEvent,
    StepEvent,
    ToolCallEvent,
    step_call_id,
)

__all__ = [
    "INITIAL_STATUS",
    "LIVE_STATUSES",
    "LOG_ORDER",
    "STATE_TRIGGERED",
    "STATUS_OF_STATE",
    "TERMINAL_STATUSES",
    "TRANSITIONS",
    "IllegalOrder",
    "IllegalTransition",
    "Interruption",
    "LogOrder",
    "LogState",
    "check_transition",
    "entry_key",
    "interruption",
    "is_terminal",
    "sql_terminal_list",
]

INITIAL_STATUS: Final[JobStatus] = RUNNING


class LogState(enum.Enum):
    """Where a job's log is: what its entries so far say the job is doing."""

    NOT_STARTED = "not_started"  # no entry yet
    NEXT_TURN = "next_turn"  # running; a model turn is due (or under way, nothing streamed yet)
    MODEL_TURN = "model_turn"  # a model turn has streamed output and announced no call
    CALLS_ANNOUNCED = "calls_announced"  # the turn announced tool calls; none answered yet
    APPROVAL_REQUESTED = "approval_requested"  # a call needs approval; the wait is not logged yet
    AWAITING_APPROVAL = "awaiting_approval"  # the job waits for a person's decision
    APPROVAL_DECIDED = "approval_decided"  # decided; the job has not gone back to running yet
    TOOLS_ANSWERING = "tools_answering"  # some calls of the turn have results, not all
    IN_STEP = "in_step"  # a workflow's step has started, not finished
    STEP_APPROVAL_REQUESTED = "step_approval_requested"  # a step asks a person; not waiting yet
    STEP_AWAITING_APPROVAL = "step_awaiting_approval"  # a step waits for a person's decision
    STEP_APPROVAL_DECIDED = "step_approval_decided"  # decided; not running again yet
    ENDED = "ended"  # a terminal status: nothing follows


S = LogState
_OUTPUT: Final = ("text", "reasoning", "tool_call_delta")
_ENDINGS: Final = tuple(f"status:{status}" for status in sorted(TERMINAL_STATUSES - {"completed"}))


def _row(*pairs: tuple[str | Iterable[str], LogState], ends: bool = True) -> dict[str, LogState]:
    row: dict[str, LogState] = {}
    for keys, state in pairs:
        for key in [keys] if isinstance(keys, str) else keys:
            row[key] = state
    if ends:  # a job may fail, be aborted or be interrupted wherever it is
        row.update(dict.fromkeys(_ENDINGS, S.ENDED))
    return row


LOG_ORDER: Final[dict[LogState, dict[str, LogState]]] = {
    S.NOT_STARTED: _row((f"status:{RUNNING}", S.NEXT_TURN)),
    S.NEXT_TURN: _row(
        (_OUTPUT, S.MODEL_TURN),
        ("tool_call", S.CALLS_ANNOUNCED),
        ("status:completed", S.ENDED),
        ("step:started", S.IN_STEP),
    ),
    S.MODEL_TURN: _row(
        (_OUTPUT, S.MODEL_TURN),
        ("tool_call", S.CALLS_ANNOUNCED),
        ("rewind", S.NEXT_TURN),
        ("status:completed", S.ENDED),
        ("step:started", S.IN_STEP),
    ),
    S.CALLS_ANNOUNCED: _row(
        ((*_OUTPUT, "tool_call"), S.CALLS_ANNOUNCED),
        ("approval_required", S.APPROVAL_REQUESTED),
        ("tool_result", S.TOOLS_ANSWERING),
        ("status:completed", S.ENDED),  # calls of client-side tools: the client answers them
    ),
    S.APPROVAL_REQUESTED: _row((f"status:{AWAITING_APPROVAL}", S.AWAITING_APPROVAL)),
    S.AWAITING_APPROVAL: _row(("approval", S.APPROVAL_DECIDED)),
    S.APPROVAL_DECIDED: _row((f"status:{RUNNING}", S.CALLS_ANNOUNCED)),
    S.TOOLS_ANSWERING: _row(("tool_result", S.TOOLS_ANSWERING), ("status:completed", S.ENDED)),
    S.IN_STEP: _row(("step:finished", S.NEXT_TURN), ("approval_required", S.STEP_APPROVAL_REQUESTED)),
    S.STEP_APPROVAL_REQUESTED: _row((f"status:{AWAITING_APPROVAL}", S.STEP_AWAITING_APPROVAL)),
    S.STEP_AWAITING_APPROVAL: _row(("approval", S.STEP_APPROVAL_DECIDED)),
    S.STEP_APPROVAL_DECIDED: _row((f"status:{RUNNING}", S.IN_STEP)),
    S.ENDED: _row(ends=False),
}
"""For each state, the entry keys (``entry_key``) that may come next and the state after
them."""

STATE_TRIGGERED: Final[dict[LogState, LogState]] = {S.TOOLS_ANSWERING: S.NEXT_TURN}
"""The transitions no entry triggers on its own: ``TOOLS_ANSWERING`` becomes ``NEXT_TURN``
as soon as every call of the turn has its result (``LogOrder`` counts them)."""

STATUS_OF_STATE: Final[dict[LogState, JobStatus]] = {
    S.NOT_STARTED: INITIAL_STATUS,
    S.NEXT_TURN: RUNNING,
    S.MODEL_TURN: RUNNING,
    S.CALLS_ANNOUNCED: RUNNING,
    S.APPROVAL_REQUESTED: RUNNING,
    S.AWAITING_APPROVAL: AWAITING_APPROVAL,
    S.APPROVAL_DECIDED: AWAITING_APPROVAL,
    S.TOOLS_ANSWERING: RUNNING,
    S.IN_STEP: RUNNING,
    S.STEP_APPROVAL_REQUESTED: RUNNING,
    S.STEP_AWAITING_APPROVAL: AWAITING_APPROVAL,
    S.STEP_APPROVAL_DECIDED: AWAITING_APPROVAL,
}
"""The job's status in each live state (an ended log's is its terminal status)."""


def entry_key(entry: LogEvent) -> str:
    """The key of ``entry`` in ``LOG_ORDER``: its kind, or ``status:<status>`` for a status."""
    if entry.kind == "status":
        return f"status:{entry.status}"
    if entry.kind == "step":
        return f"step:{entry.phase}"
    return entry.kind


class IllegalOrder(ValueError):
    """A log entry that may not follow where the log is (e.g. a result for no announced
    call, text while the job waits for approval, anything after a terminal status)."""

    def __init__(self, state: LogState, key: str, why: str = "") -> None:
        detail = f": {why}" if why else ""
        super().__init__(f"a {key!r} entry may not follow a log in state {state.value!r}{detail}")
        self.state = state
        self.key = key


class LogOrder:
    """A log's place in ``LOG_ORDER``, moved forward entry by entry.

    Besides the table it checks what depends on the entries' contents: an approval is
    asked for a call the turn announced and decides the call that asked, and a new turn
    starts only after every call of the last one has a result.
    """

    __slots__ = ("_announced", "_approval_call", "_call_ids", "_results", "state")

    def __init__(self) -> None:
        self.state = S.NOT_STARTED
        self._call_ids: set[str] = set()  # the current turn's announced calls
        self._announced = 0  # its tool_call entries (a model may repeat an id)
        self._results = 0  # the results so far of its calls
        self._approval_call: str | None = None

    def advance(self, entry: LogEvent) -> LogState:
        """Move past ``entry``; raise ``IllegalOrder`` (and stay) if it may not come now."""
        state = self.state
        key = entry_key(entry)
        after = LOG_ORDER[state].get(key)
        if after is None:
            raise IllegalOrder(state, key)
        if isinstance(entry, ToolCallEvent):
            if state is not S.CALLS_ANNOUNCED:  # the turn's first call
                self._call_ids.clear()
                self._announced = self._results = 0
            self._call_ids.add(entry.call_id)
            self._announced += 1
        elif isinstance(entry, ApprovalRequiredEvent):
            if entry.call_id not in self._call_ids:
                raise IllegalOrder(state, key, f"the turn announced no call {entry.call_id!r}")
            self._approval_call = entry.call_id
        elif isinstance(entry, ApprovalEvent):
            if entry.call_id != self._approval_call:
                raise IllegalOrder(state, key, f"the call waiting is {self._approval_call!r}")
            self._approval_call = None
        elif isinstance(entry, StepEvent) and entry.phase == "started":
            self._call_ids = {step_call_id(entry.step)}  # the one call a step may ask about
        elif key == "tool_result":
            self._results += 1
            if self._results >= self._announced:  # every call has its result
                after = STATE_TRIGGERED[after]
        self.state = after
        return after

    def advance_all(self, entries: Iterable[LogEvent]) -> LogState:
        """``advance`` through ``entries`` in order."""
        for entry in entries:
            self.advance(entry)
        return self.state


def _later_statuses(status: JobStatus) -> frozenset[JobStatus]:
    """The statuses a job in ``status`` may have later, as ``LOG_ORDER`` allows."""
    starts = [state for state, live in STATUS_OF_STATE.items() if live == status]
    seen, todo, found = set(starts), list(starts), set[JobStatus]()
    while todo:
        for key, after in LOG_ORDER[todo.pop()].items():
            if key.startswith("status:"):
                found.add(key.removeprefix("status:"))  # type: ignore[arg-type]
            for then in (after, STATE_TRIGGERED.get(after)):
                if then is not None and then not in seen:
                    seen.add(then)
                    todo.append(then)
    return frozenset(found)


TRANSITIONS: Final[dict[JobStatus, frozenset[JobStatus]]] = {
    status: _later_statuses(status) if status in LIVE_STATUSES else frozenset()
    for status in sorted(LIVE_STATUSES | TERMINAL_STATUSES)
}
"""For each status, the statuses a job may have later (derived from ``LOG_ORDER``): from a
live status any status (a live one again after a tool call's approval), from a terminal
one none. Stores comparing two snapshots of a job use it."""


class IllegalTransition(ValueError):
    """A status that may not follow the current one (e.g. anything after a terminal one)."""

    def __init__(self, current: JobStatus, new: JobStatus) -> None:
        super().__init__(f"status {new!r} may not follow {current!r}")
        self.current = current
        self.new = new


def is_terminal(status: str) -> bool:
    return status in TERMINAL_STATUSES


def check_transition(current: JobStatus, new: JobStatus) -> None:
    """Raise ``IllegalTransition`` unless ``new`` may follow ``current``. A new job's
    current status is ``INITIAL_STATUS``."""
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(current, new)


def sql_terminal_list() -> str:
    """The terminal statuses as an SQL list literal, e.g. ``('aborted', 'completed', ...)``."""
    return "(" + ", ".join(f"'{status}'" for status in sorted(TERMINAL_STATUSES)) + ")"


@attrs.frozen
class Interruption:
    """What ending an orphan writes: one more log entry and a new epoch.

    The job's instance is gone, so entries it had not written durably are lost.
    The terminal status goes right after the last durable entry (``seq + 1``) and
    the epoch grows by one, so a cursor from before the crash gets ``gone``
    instead of reading different entries under the same numbers.
    """

    status_event: StatusEvent
    seq: int
    epoch: int


def interruption(durable_seq: int, epoch: int) -> Interruption:
    """The step that ends a job whose instance died, after ``durable_seq`` entries."""
    event = StatusEvent(seq=durable_seq + 1, status="interrupted")
    return Interruption(status_event=event, seq=durable_seq + 1, epoch=epoch + 1)
