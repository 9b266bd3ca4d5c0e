"""The job log: a job's append-only buffer of events.

One job actor owns and appends to each log; watchers, the flusher and
``get_job`` read it through cursors and never change it. Reads never block
writers. Memory is bounded by ``max_output_chars`` twice over: the model's output
(text, reasoning, tool arguments) has one budget of that size and tool results another,
so a large tool result never ends the answer. Every entry holds at least one character
of output, except the few status and approval entries. A tool
call's argument fragments (``tool_call_delta``) and the assembled call count once
toward the output budget, so they hold at most twice its characters.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from backstream.protocol.events import (
    ApprovalEvent,
    ApprovalRequiredEvent,
    ErrorInfo,
    JobStatus,
    LogEvent,
    ReasoningEvent,
    RewindEvent,
    StatusEvent,
    StepEvent,
    TextEvent,
    ToolCallDeltaEvent,
    ToolCallEvent,
    ToolCallRecord,
    ToolResultEvent,
)
from backstream.protocol.lifecycle import INITIAL_STATUS, LogOrder, LogState

if TYPE_CHECKING:
    from backstream.actors.ports import LogStore

__all__ = [
    "JobLog",
    "LogClosedError",
    "OutputLimitExceeded",
    "content_of",
    "merge_events",
    "summarize_events",
]


class OutputLimitExceeded(Exception):
    """The job reached ``max_output_chars``; what fitted was appended."""


class LogClosedError(RuntimeError):
    """An append after the terminal status: a bug in the caller."""


class JobLog:
    """Append-only entries with ``seq`` 1, 2, 3, ... and no gaps, in an order the lifecycle
    table (``LOG_ORDER``) allows: an entry it does not allow raises ``IllegalOrder`` and
    changes nothing.

    The terminal status is always the last entry: appending after it raises
    ``LogClosedError``.
    """

    def __init__(self, job_id: str, epoch: int, *, max_output_chars: int) -> None:
        self.job_id = job_id
        self.epoch = epoch
        self._entries: list[LogEvent] = []
        self._order = LogOrder()
        self._max_output_chars = max_output_chars
        self._output_chars = 0
        self._tool_output_chars = 0
        self.content_length = 0
        self.terminal: StatusEvent | None = None
        self.status: JobStatus = INITIAL_STATUS
        self._delta_chars: dict[str, int] = {}  # call_id -> argument characters charged as fragments
        self._readers = trio.lowlevel.ParkingLot()
        # The last merged read, for the other watchers that read the same range next.
        self._last_read: tuple[tuple[int, int, int, int], tuple[LogEvent, ...]] | None = None

    @classmethod
    def from_entries(
        cls, job_id: str, epoch: int, entries: Iterable[LogEvent], *, max_output_chars: int
    ) -> JobLog:
        """A log holding stored ``entries`` (seq 1, 2, ...), that continues with the next seq.

        The entries are checked against the lifecycle table (``IllegalOrder``) and their
        seqs (``ValueError``); the output budgets are charged as appending them charged them.
        Nothing is cut: entries over a smaller ``max_output_chars`` are kept, and the next
        output raises ``OutputLimitExceeded``.
        """
        log = cls(job_id, epoch, max_output_chars=max_output_chars)
        for entry in entries:
            if entry.seq != log.last_seq + 1:
                raise ValueError(f"job {job_id}: entry {log.last_seq + 1} has seq {entry.seq}")
            log._restore(entry)
        return log

    def _restore(self, entry: LogEvent) -> None:
        """Append a stored entry, charging it as its ``append_*`` method did."""
        self._append(entry)
        if isinstance(entry, TextEvent):
            self._output_chars += len(entry.text)
            self.content_length += len(entry.text)
        elif isinstance(entry, ReasoningEvent):
            self._output_chars += len(entry.text)
        elif isinstance(entry, ToolCallDeltaEvent):
            self._output_chars += len(entry.arguments_delta)
            self._delta_chars[entry.call_id] = self._delta_chars.get(entry.call_id, 0) + len(
                entry.arguments_delta
            )
        elif isinstance(entry, ToolCallEvent):
            self._output_chars += max(0, len(entry.arguments) - self._delta_chars.pop(entry.call_id, 0))
        elif isinstance(entry, ToolResultEvent):
            room = max(self._max_output_chars - self._tool_output_chars, 0)
            self._tool_output_chars += min(len(entry.output), room)
        elif isinstance(entry, RewindEvent):
            self.content_length = entry.content_length
        elif isinstance(entry, StatusEvent):
            self.status = entry.status
            if entry.is_terminal:
                self.terminal = entry

    # -- appending (the owning job actor only) ----------------------------------

    @property
    def last_seq(self) -> int:
        return len(self._entries)

    @property
    def state(self) -> LogState:
        """Where the log is in the lifecycle table."""
        return self._order.state

    def append_text(self, text: str) -> None:
        """Append content. Raises ``OutputLimitExceeded`` after appending what fits."""
        text, over = self._fit(text)
        if text:
            self._append(TextEvent(seq=self.last_seq + 1, text=text))
            self._output_chars += len(text)
            self.content_length += len(text)
        if over:
            raise OutputLimitExceeded

    def append_reasoning(self, text: str) -> None:
        """Append reasoning. Raises ``OutputLimitExceeded`` after appending what fits."""
        text, over = self._fit(text)
        if text:
            self._append(ReasoningEvent(seq=self.last_seq + 1, text=text))
            self._output_chars += len(text)
        if over:
            raise OutputLimitExceeded

    def append_tool_call_delta(self, call_id: str, name: str, arguments_delta: str) -> None:
        """Append a fragment of a call's arguments; it counts toward the output limit."""
        if self._output_chars + len(arguments_delta) > self._max_output_chars:
            raise OutputLimitExceeded
        self._append(
            ToolCallDeltaEvent(
                seq=self.last_seq + 1, call_id=call_id, name=name, arguments_delta=arguments_delta
            )
        )
        self._output_chars += len(arguments_delta)
        self._delta_chars[call_id] = self._delta_chars.get(call_id, 0) + len(arguments_delta)

    def append_tool_call(self, call_id: str, name: str, arguments: str) -> None:
        """Append a complete tool call; the part of its arguments not already counted as
        fragments counts toward the output limit."""
        charge = max(0, len(arguments) - self._delta_chars.get(call_id, 0))
        if self._output_chars + charge > self._max_output_chars:
            raise OutputLimitExceeded
        self._append(ToolCallEvent(seq=self.last_seq + 1, call_id=call_id, name=name, arguments=arguments))
        self._delta_chars.pop(call_id, None)
        self._output_chars += charge

    def append_rewind(self, to_seq: int) -> RewindEvent:
        """Withdraw the current model turn's output after ``to_seq``: the turn runs again.
        What was withdrawn still counts toward the output budget (``max_output_chars``).
        Raises ``IllegalOrder`` unless the log is in the middle of a model turn."""
        length = len(content_of(self._entries[:to_seq]))
        event = RewindEvent(seq=self.last_seq + 1, to_seq=to_seq, content_length=length)
        self._append(event)
        self.content_length = length
        return event

    def append_approval_required(self, call_id: str, name: str, arguments: str) -> None:
        self._append(
            ApprovalRequiredEvent(seq=self.last_seq + 1, call_id=call_id, name=name, arguments=arguments)
        )

    def append_approval(self, call_id: str, approved: bool) -> None:
        self._append(ApprovalEvent(seq=self.last_seq + 1, call_id=call_id, approved=approved))

    def append_tool_result(self, call_id: str, name: str, output: str, is_error: bool) -> ToolResultEvent:
        """Append a tool's output, cut to what is left of the tools' own budget
        (``max_output_chars`` for all of the job's tool results); never raises
        ``OutputLimitExceeded``: the model reads the cut output and answers. Returns the
        entry as appended."""
        room = max(self._max_output_chars - self._tool_output_chars, 0)
        if len(output) > room:
            output = (
                output[:room]
                + f"\n[output cut: the job's tool results reached {self._max_output_chars} characters]"
            )
        event = ToolResultEvent(
            seq=self.last_seq + 1, call_id=call_id, name=name, output=output, is_error=is_error
        )
        self._append(event)
        self._tool_output_chars += min(len(output), room)
        return event

    def append_step(self, step: StepEvent) -> StepEvent:
        """Append a workflow's step entry (``step``'s seq is set here). Raises
        ``IllegalOrder`` where the lifecycle table does not allow it."""
        event = attrs.evolve(step, seq=self.last_seq + 1)
        self._append(event)
        return event

    def append_status(
        self,
        status: JobStatus,
        *,
        error: ErrorInfo | None = None,
        finish_reason: str | None = None,
        usage: dict[str, Any] | None = None,
    ) -> StatusEvent:
        """Append a status change. Raises ``IllegalOrder`` if the lifecycle table does not
        allow it where the log is (``LogClosedError`` after a terminal status)."""
        event = StatusEvent(
            seq=self.last_seq + 1, status=status, error=error, finish_reason=finish_reason, usage=usage
        )
        self._append(event)
        self.status = status
        if event.is_terminal:
            self.terminal = event
        return event

    def _fit(self, text: str) -> tuple[str, bool]:
        """What of ``text`` fits the output budget, and whether some did not."""
        room = self._max_output_chars - self._output_chars
        if len(text) > room:
            return text[: max(room, 0)], True
        return text, False

    def _append(self, event: LogEvent) -> None:
        if self.terminal is not None:
            raise LogClosedError(f"job {self.job_id}: append after the terminal status")
        self._order.advance(event)  # raises IllegalOrder, changing nothing
        self._entries.append(event)
        if self._readers:  # most appends have no reader waiting
            self._readers.unpark_all()

    # -- reading (anyone) -----------------------------------------------------------

    def read(self, after_seq: int, *, max_events: int, max_chars: int) -> tuple[LogEvent, ...]:
        """Entries after ``after_seq``, adjacent text merged, at most about the given bounds.

        Always returns at least one entry when there is one. The seq of the last
        returned event is the last entry covered.
        """
        key = (after_seq, len(self._entries), max_events, max_chars)
        if self._last_read is not None and self._last_read[0] == key:
            return self._last_read[1]
        events = merge_events(self._entries[after_seq:], max_events=max_events, max_chars=max_chars)
        self._last_read = (key, events)
        return events

    def entries(self, after_seq: int = 0, until_seq: int | None = None) -> Sequence[LogEvent]:
        """Raw entries ``after_seq + 1`` .. ``until_seq`` (a copy; for the flusher)."""
        return self._entries[after_seq:until_seq]

    def content(self, offset: int = 0) -> str:
        return content_of(self._entries)[offset:]

    def tool_calls(self) -> tuple[ToolCallRecord, ...]:
        return summarize_events(self._entries)[1]

    async def wait_beyond(self, seq: int) -> None:
        """Wait until the log holds an entry after ``seq``, or is closed (nothing more will
        come: the caller finds no entry after ``seq`` and stops).

        Cancellation: nothing is consumed; call again. Returns at once if it does.
        """
        while self.last_seq <= seq and self.terminal is None:
            await self._readers.park()


def merge_events(entries: Sequence[LogEvent], *, max_events: int, max_chars: int) -> tuple[LogEvent, ...]:
    """Merge adjacent text entries (keeping the last seq) within the bounds."""
    out: list[LogEvent] = []
    pending: list[str] = []
    pending_seq = 0
    chars = 0
    for entry in entries:
        if chars >= max_chars:
            break
        if isinstance(entry, TextEvent):
            if not pending and len(out) >= max_events:
                break
            pending.append(entry.text)
            pending_seq = entry.seq
            chars += len(entry.text)
            continue
        if len(out) + (1 if pending else 0) + 1 > max_events:
            break
        if pending:
            out.append(TextEvent(seq=pending_seq, text="".join(pending)))
            pending = []
        out.append(entry)
        if isinstance(entry, ReasoningEvent):
            chars += len(entry.text)
        elif isinstance(entry, ToolResultEvent):
            chars += len(entry.output)
        elif isinstance(entry, ToolCallDeltaEvent):
            chars += len(entry.arguments_delta)
    if pending:
        out.append(TextEvent(seq=pending_seq, text="".join(pending)))
    return tuple(out)


def content_of(entries: Iterable[LogEvent]) -> str:
    """The content text of a log's entries (from seq 1): its text, less what a ``rewind``
    withdrew."""
    return summarize_events(entries)[0]


async def read_content(logs: LogStore, job_id: str, max_chars: int) -> str:
    """The first ``max_chars`` characters of a stored job's content (less what a ``rewind``
    withdrew), read page by page with only that much text held. Raises what the store's
    ``read`` raises. Cancellation: safe (reads only)."""
    prefix, length, after = "", 0, 0
    while True:
        page = await logs.read(job_id, after, 256)
        if not page:
            return prefix
        for ev in page:
            if isinstance(ev, TextEvent):
                if len(prefix) < max_chars:
                    prefix += ev.text[: max_chars - len(prefix)]
                length += len(ev.text)
            elif isinstance(ev, RewindEvent) and ev.content_length < length:
                length = ev.content_length
                prefix = prefix[:length]
        after = page[-1].seq


def summarize_events(entries: Iterable[LogEvent]) -> tuple[str, tuple[ToolCallRecord, ...]]:
    """The content text (less what a ``rewind`` withdrew) and the tool calls (with outcomes)
    of a log."""
    text: list[str] = []
    length = 0
    calls: dict[str, ToolCallRecord] = {}
    for ev in entries:
        if isinstance(ev, TextEvent):
            text.append(ev.text)
            length += len(ev.text)
        elif isinstance(ev, RewindEvent) and ev.content_length < length:
            joined = "".join(text)[: ev.content_length]
            text, length = [joined], len(joined)
        elif isinstance(ev, ToolCallEvent):
            calls[ev.call_id] = ToolCallRecord(call_id=ev.call_id, name=ev.name, arguments=ev.arguments)
        elif isinstance(ev, ApprovalEvent) and ev.call_id in calls:
            calls[ev.call_id] = attrs.evolve(calls[ev.call_id], approved=ev.approved)
        elif isinstance(ev, ToolResultEvent) and ev.call_id in calls:
            calls[ev.call_id] = attrs.evolve(calls[ev.call_id], output=ev.output, is_error=ev.is_error)
    return "".join(text), tuple(calls.values())
