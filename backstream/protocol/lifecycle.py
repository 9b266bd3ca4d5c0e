"""A job's lifecycle: its statuses, the legal transitions, and the recovery step.

The single source of truth for what a job may go through. The job log refuses
an illegal transition; every store takes its terminal set from here (SQL
queries are built from it, Lua scripts get it as an argument), and the
"end an orphan ``interrupted``" step is defined once, as values every store
writes the same way.

    running ----------> awaiting_approval
       ^  \\                  |   \\
       |   \\                 |    \\
       +----\\----------------+     \\
             v                      v
       completed | failed | aborted | interrupted      (terminal: nothing follows)

``running`` is the first status of every job; ``awaiting_approval`` goes back
to ``running`` when a person decides (or the wait times out). A job ends in
exactly one terminal status, and its log ends with it.
"""

from __future__ import annotations

from typing import Final

import attrs

from backstream.protocol.events import TERMINAL_STATUSES, JobStatus, StatusEvent

__all__ = [
    "INITIAL_STATUS",
    "LIVE_STATUSES",
    "TERMINAL_STATUSES",
    "TRANSITIONS",
    "IllegalTransition",
    "Interruption",
    "check_transition",
    "interruption",
    "is_terminal",
    "sql_terminal_list",
]

INITIAL_STATUS: Final[JobStatus] = "running"

# TERMINAL_STATUSES (defined with the wire types): a job in one of these has ended, its log
# is closed and its slot is free.

_RUNNING: Final[JobStatus] = "running"
_AWAITING: Final[JobStatus] = "awaiting_approval"
LIVE_STATUSES: Final[frozenset[JobStatus]] = frozenset({_RUNNING, _AWAITING})
"""A job in one of these is owned by a runtime instance (and holds a lease)."""

TRANSITIONS: Final[dict[JobStatus, frozenset[JobStatus]]] = {
    "running": LIVE_STATUSES | TERMINAL_STATUSES,
    "awaiting_approval": LIVE_STATUSES | TERMINAL_STATUSES,
    "completed": frozenset(),
    "failed": frozenset(),
    "aborted": frozenset(),
    "interrupted": frozenset(),
}
"""For each status, the statuses that may follow it in a job's log. Repeating a live
status is allowed (a second tool call waiting for approval in the same turn)."""


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
