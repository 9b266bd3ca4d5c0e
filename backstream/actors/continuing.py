"""Continuing a model turn that a crash cut short, inside the job actor.

A job actor given a log that stops in the middle of a model turn (``LogState.MODEL_TURN``)
continues that turn under its model's policy (``protocol/continuation.py``):

- ``prefill``: the turn's text so far is sent as the start of the answer; the reply goes
  through a ``PrefixJoiner`` (an echo stripped, a new answer recognised). A new answer falls
  back to ``restart`` at once: the partial text is withdrawn and the new answer kept.
- ``restart`` (also for a partial turn that holds more than text, e.g. half a tool call's
  arguments): a ``rewind`` entry withdraws the partial turn, which runs again.

What is withdrawn still counts toward ``max_output_chars``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from backstream.actors.joblog import JobLog
from backstream.actors.ports import ToolSpec
from backstream.protocol.continuation import Continuation, JoinedText, PrefixJoiner
from backstream.protocol.conversation import Conversation
from backstream.protocol.events import ToolCallDeltaEvent
from backstream.protocol.lifecycle import LogState
from backstream.protocol.records import JobRecord

__all__ = ["TurnContinuation", "add_usage", "calls_may_have_run", "check_continuable"]


class TurnContinuation:
    """The continuation of one cut-short turn: ``begin`` decides how, before the turn runs;
    ``text`` joins the reply's text; ``settle`` decides on what is held (the reply ended, or
    sent other output). ``used`` is the policy that continued it; ``regenerated`` counts the
    characters withdrawn (produced a second time)."""

    def __init__(self, policy: Continuation, log: JobLog) -> None:
        self._policy = policy
        self._log = log
        self._joiner: PrefixJoiner | None = None
        self._turn_from_seq = 0
        self.used: Continuation | None = None
        self.regenerated = 0

    def begin(self, so_far: Conversation) -> str | None:
        """Before the cut-short turn runs again: the prefill to send (``prefill``), or None
        after withdrawing the partial turn (``restart``). Nothing to do for a log that is not
        in a model turn (returns None, ``used`` stays None)."""
        if self._log.state is not LogState.MODEL_TURN:
            return None
        self._turn_from_seq = so_far.turn_from_seq
        only_text = not any(
            isinstance(e, ToolCallDeltaEvent) for e in self._log.entries(so_far.turn_from_seq)
        )
        if self._policy is Continuation.PREFILL and so_far.turn_text and only_text:
            self.used = Continuation.PREFILL
            self._joiner = PrefixJoiner(so_far.turn_text)
            return so_far.turn_text
        self._rewind(len(so_far.turn_text))
        return None

    @property
    def joining(self) -> bool:
        """Whether the reply's text still goes through the joiner undecided."""
        return self._joiner is not None and not self._joiner.decided

    def text(self, text: str, append: Callable[[str], None], restarted: Callable[[], None]) -> None:
        """Join ``text`` of the reply: ``append`` what goes into the turn; ``restarted`` is
        called first if the reply turns out to be a new answer (the partial text is gone)."""
        assert self._joiner is not None
        self._apply(self._joiner.feed(text), append, restarted)

    def settle(self, append: Callable[[str], None], restarted: Callable[[], None]) -> None:
        """Decide on the text held, as if the reply departed from the prefill there."""
        if self._joiner is not None:
            self._apply(self._joiner.settle(), append, restarted)

    def _apply(
        self, joined: JoinedText, append: Callable[[str], None], restarted: Callable[[], None]
    ) -> None:
        if joined.started_over:
            assert self._joiner is not None
            self.used = Continuation.RESTART
            self._rewind(len(self._joiner.prefix))
            restarted()
        if joined.text:
            append(joined.text)

    def _rewind(self, chars: int) -> None:
        self._log.append_rewind(self._turn_from_seq)
        self.used = Continuation.RESTART
        self.regenerated += chars


def calls_may_have_run(so_far: Conversation, enabled: dict[str, ToolSpec | None]) -> bool:
    """Whether the calls of a rebuilt turn may have started running: a turn's calls run once
    every approval it needs is decided (none waits, none is still to ask)."""
    if so_far.pending_approvals:
        return False
    return all(
        call.approved is not None
        for call in so_far.calls
        if (spec := enabled.get(call.name)) is not None and spec.requires_approval
    )


def check_continuable(record: JobRecord, log: JobLog, continuation: Continuation) -> None:
    """Raise ``ValueError`` unless an actor can continue ``record``'s job from ``log``."""
    if log.job_id != record.job_id:
        raise ValueError(f"the log is job {log.job_id}'s, not {record.job_id}'s")
    if log.terminal is not None:
        raise ValueError(f"job {record.job_id}: the log has ended ({log.terminal.status})")
    if log.state is LogState.MODEL_TURN and continuation is Continuation.INTERRUPT:
        raise ValueError(f"job {record.job_id}: the log stops in the middle of a model turn")


def add_usage(total: dict[str, int] | None, more: dict[str, object] | None) -> dict[str, int] | None:
    """Sum token counts over the turns of a job (a continued job's start from its record's)."""
    if more is None:
        return total
    out = dict(total or {})
    for key, value in more.items():
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = out.get(key, 0) + int(value)
    return out
