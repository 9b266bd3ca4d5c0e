"""A job's conversation with its model, rebuilt from the job's request and its log.

The job log is the durable record of a job; everything the job says to its model next
follows from it and the request: the messages so far, the turn in progress, the calls
waiting for a result or a decision. ``conversation_from_log`` derives that, so a job can be
continued from its log (by this instance or, after a crash, another one). The job actor
builds its messages with the same ``assistant_message`` and ``tool_message`` as here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from backstream.protocol.events import (
    ApprovalEvent,
    ApprovalRequiredEvent,
    LogEvent,
    ReasoningEvent,
    RewindEvent,
    StatusEvent,
    TextEvent,
    ToolCallDeltaEvent,
    ToolCallEvent,
    ToolCallRecord,
    ToolResultEvent,
)
from backstream.protocol.lifecycle import LogOrder, LogState
from backstream.protocol.records import JobRequest

__all__ = [
    "DECLINED_OUTPUT",
    "INTERRUPTED_CALL_OUTPUT",
    "Conversation",
    "assistant_message",
    "conversation_from_log",
    "tool_message",
]

DECLINED_OUTPUT = "the user declined to run this tool"
"""The result a call gets when a person declines it (or does not decide in time)."""

INTERRUPTED_CALL_OUTPUT = (
    "the call was interrupted: the server running it stopped, and the tool is not marked "
    "idempotent, so it was not run again; it may or may not have taken effect"
)
"""The result of a call that was perhaps running when its instance died, of a tool that may
not run twice."""


def assistant_message(text: str, calls: Iterable[tuple[str, str, str]]) -> dict[str, Any]:
    """The assistant message of a turn that ended with tool ``calls`` (id, name, arguments)."""
    return {
        "role": "assistant",
        "content": text or None,
        "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            for call_id, name, arguments in calls
        ],
    }


def tool_message(call_id: str, output: str) -> dict[str, Any]:
    """The message that gives a call's result (as the log holds it) back to the model."""
    return {"role": "tool", "tool_call_id": call_id, "content": output}


@attrs.frozen
class Conversation:
    """Where a job's conversation is, as its request and log say.

    ``messages`` are what the model is sent next: the request's messages, then each turn
    whose calls all have results (its text and calls, then one ``tool`` message per call).
    The turn after them is described apart: its text so far and its calls with what is known
    of them (results, decisions), so a job can finish it.
    """

    state: LogState
    messages: tuple[dict[str, Any], ...]
    turn_text: str
    """The text of the turn after ``messages``: streamed so far, or said before its calls."""
    turn_output: bool
    """Whether that turn has streamed anything (text, reasoning, argument fragments, calls)."""
    calls: tuple[ToolCallRecord, ...]
    """That turn's calls in order, with results and decisions so far; () if it has none."""
    pending_approvals: tuple[str, ...]
    """Call ids that asked for approval and have no decision yet."""
    turn_from_seq: int
    """The seq of the last entry before that turn's first (0 before any turn): a ``rewind``
    of the turn goes back to it."""
    turns: int
    """Model turns the log shows: each turn with an entry of its own, and the empty last
    turn of a job that ended ``completed``."""
    usage: dict[str, Any] | None
    """Token usage as the log records it: the total on the terminal status; None before
    (the log does not record each turn's)."""

    @property
    def unanswered(self) -> tuple[ToolCallRecord, ...]:
        """The turn's calls announced that have no result yet."""
        return tuple(call for call in self.calls if call.output is None)


class _Builder:
    """Walks a log once, keeping the finished messages and the open turn apart."""

    def __init__(self, request: JobRequest) -> None:
        self.order = LogOrder()
        self.messages: list[dict[str, Any]] = list(request.messages)
        self.text: list[str] = []
        self.output = False
        self.calls: list[ToolCallRecord] = []  # the open turn's, in order
        self.results = 0  # results come in the calls' order
        self.pending: list[str] = []
        self.turns = 0
        self.turn_from_seq = 0
        self.usage: dict[str, Any] | None = None

    def feed(self, entry: LogEvent) -> None:
        before = self.order.state
        after = self.order.advance(entry)
        if before is LogState.NEXT_TURN and after in (LogState.MODEL_TURN, LogState.CALLS_ANNOUNCED):
            self.turns += 1  # the turn's first entry
            self.turn_from_seq = entry.seq - 1
        if isinstance(entry, TextEvent):
            self.text.append(entry.text)
        elif isinstance(entry, ToolCallEvent):
            self.calls.append(ToolCallRecord(entry.call_id, entry.name, entry.arguments))
        elif isinstance(entry, ApprovalRequiredEvent):
            self.pending.append(entry.call_id)
        elif isinstance(entry, ApprovalEvent):
            self.pending.remove(entry.call_id)
            i = next(i for i, c in enumerate(self.calls) if c.call_id == entry.call_id and c.approved is None)
            self.calls[i] = attrs.evolve(self.calls[i], approved=entry.approved)
        elif isinstance(entry, ToolResultEvent):
            # By call id: a turn that also called client-side tools logs results only for
            # its server-side calls (still in the calls' order).
            self.results += 1
            i = next(
                (i for i, c in enumerate(self.calls) if c.call_id == entry.call_id and c.output is None),
                self.results - 1,
            )
            self.calls[i] = attrs.evolve(self.calls[i], output=entry.output, is_error=entry.is_error)
        elif isinstance(entry, StatusEvent):
            self._status(entry, before)
        elif isinstance(entry, RewindEvent):
            self.text, self.output = [], False
            self.turns -= 1  # the turn runs again: it counts once
        if isinstance(entry, TextEvent | ReasoningEvent | ToolCallDeltaEvent | ToolCallEvent):
            self.output = True
        if after is LogState.NEXT_TURN and self.calls:
            self._close_turn()

    def _status(self, entry: StatusEvent, before: LogState) -> None:
        if entry.usage is not None:
            self.usage = entry.usage
        if entry.status == "completed" and before is LogState.NEXT_TURN:
            self.turns += 1  # a last turn that said nothing

    def _close_turn(self) -> None:
        """Every call of the turn has its result: the turn joins the messages."""
        calls = self.calls
        self.messages.append(assistant_message("".join(self.text), _triples(calls)))
        self.messages.extend(tool_message(c.call_id, c.output or "") for c in calls)
        self.text, self.output = [], False
        self.calls, self.results = [], 0

    def result(self) -> Conversation:
        return Conversation(
            state=self.order.state,
            messages=tuple(self.messages),
            turn_text="".join(self.text),
            turn_output=self.output,
            calls=tuple(self.calls),
            pending_approvals=tuple(self.pending),
            turn_from_seq=self.turn_from_seq,
            turns=self.turns,
            usage=self.usage,
        )


def _triples(calls: Sequence[ToolCallRecord]) -> list[tuple[str, str, str]]:
    return [(c.call_id, c.name, c.arguments) for c in calls]


def conversation_from_log(request: JobRequest, entries: Iterable[LogEvent]) -> Conversation:
    """The conversation of a job that was asked ``request`` and whose log holds ``entries``
    (from seq 1, in order). Raises ``IllegalOrder`` for entries out of the lifecycle's order.

    Pure: the same request and entries always give the same conversation.
    """
    builder = _Builder(request)
    for entry in entries:
        builder.feed(entry)
    return builder.result()
