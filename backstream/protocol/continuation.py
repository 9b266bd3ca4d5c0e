"""Continuing a model turn that a crash cut short: the policies, and joining a prefill.

A job taken over by a new owner may stop in the middle of a model turn: some text of the
turn is durable, the rest was lost with its instance. The new owner continues the turn
under the policy of the job's model:

- ``prefill``: the conversation is sent with the partial text as a final assistant
  message; what comes back continues it. Upstreams differ in what they send back: the
  continuation alone (vLLM's ``continue_final_message``), the partial text again and then
  the continuation (llama.cpp's ``llama-server`` echoes it in its first delta), or a new
  answer from its start (an upstream that ignores a final assistant message).
  ``PrefixJoiner`` tells them apart, so nothing is sent twice or lost; a new answer makes
  the turn fall back to ``restart``.
- ``restart``: the turn runs again from its start; the partial text is withdrawn by a
  ``rewind`` entry in the log (watchers cut their text back to its ``content_length``).
- ``interrupt``: the job ends ``interrupted`` after its durable entries (nothing continues).

Sans-IO: no I/O, no trio.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Mapping
from typing import Final

import attrs

__all__ = [
    "START_OVER_MIN",
    "Continuation",
    "JoinedText",
    "PrefixJoiner",
    "continuation_for",
    "parse_continuation",
]


class Continuation(enum.Enum):
    """How a turn cut short by a crash is continued (see the module)."""

    PREFILL = "prefill"
    RESTART = "restart"
    INTERRUPT = "interrupt"

    @property
    def fallback(self) -> Continuation:
        """The policy to fall back to when this one cannot continue a turn."""
        return {
            Continuation.PREFILL: Continuation.RESTART,
            Continuation.RESTART: Continuation.INTERRUPT,
        }.get(self, Continuation.INTERRUPT)


BUILTIN_CONTINUATION: Final[dict[str, Continuation]] = {"backstream/*": Continuation.PREFILL}
"""The built-in models continue a prefill exactly (their answers are deterministic)."""


def parse_continuation(text: str) -> tuple[str, Continuation]:
    """``PATTERN=POLICY`` (split at the last ``=``) as a pattern and a policy; raises
    ``ValueError`` naming the policies for anything else."""
    pattern, sep, name = text.rpartition("=")
    names = ", ".join(policy.value for policy in Continuation)
    if not sep or not pattern.strip():
        raise ValueError(f"expected PATTERN=POLICY (a policy of {names}), not {text!r}")
    try:
        return pattern.strip(), Continuation(name.strip())
    except ValueError:
        raise ValueError(f"unknown continuation policy {name.strip()!r} (known: {names})") from None


def continuation_for(model: str, patterns: Mapping[str, Continuation]) -> Continuation:
    """The policy of ``model``: the first of ``patterns`` (glob, in order) that matches it,
    else a built-in model's own (``prefill``), else ``interrupt``."""
    for pattern, policy in (*patterns.items(), *BUILTIN_CONTINUATION.items()):
        if fnmatch.fnmatchcase(model, pattern):
            return policy
    return Continuation.INTERRUPT


START_OVER_MIN: Final = 8
"""Characters that a reply must share with the start of the prefill before it departs from
it to be taken for a new answer (an upstream that started over) rather than a continuation
that happens to begin like the prefill. A shorter prefill counts in full."""


@attrs.frozen
class JoinedText:
    """What ``PrefixJoiner`` lets through: ``text`` to append to the turn, and whether the
    upstream turned out to have started over (``text`` then begins the new answer: the
    partial text must be withdrawn before it)."""

    text: str
    started_over: bool = False


class PrefixJoiner:
    """Joins a prefilled turn's reply onto its ``prefix`` (the partial text sent as the final
    assistant message), exactly: an echoed prefix is stripped, a continuation is passed on,
    and a new answer is recognised.

    Text is held back while it could still be the prefix echoed. It is decided, once, when:

    - the reply holds the whole prefix: it was echoed, the rest is the continuation;
    - the reply departs from the prefix at its first character, or within the first
      ``START_OVER_MIN`` (a continuation that starts like the prefix): a continuation;
    - the reply departs from it later: the upstream started over (``started_over``);
    - ``settle`` is called (the reply ends, or sends something other than text): what is
      held is decided by the same rules, as if it departed from the prefix there.

    After the decision every text passes through unchanged.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._held: list[str] = []
        self._held_chars = 0
        self.decided = not prefix
        self.started_over = False

    def feed(self, text: str) -> JoinedText:
        """The part of ``text`` to append now (perhaps held text with it)."""
        if self.decided:
            return JoinedText(text)
        self._held.append(text)
        self._held_chars += len(text)
        held = "".join(self._held)
        self._held = [held]
        prefix = self.prefix
        if held.startswith(prefix):  # echoed in full: the rest continues it
            return self._decide(held[len(prefix) :], started_over=False)
        if prefix.startswith(held):
            return JoinedText("")  # may still be the echo
        return self._decide_departed(held)

    def settle(self) -> JoinedText:
        """Decide now on what is held (the reply ended, or moved on to other output)."""
        if self.decided:
            return JoinedText("")
        held = "".join(self._held)
        return self._decide_departed(held)

    def _decide_departed(self, held: str) -> JoinedText:
        shared = _common_prefix_length(held, self.prefix)
        started_over = shared >= min(len(self.prefix), START_OVER_MIN) and shared > 0
        return self._decide(held, started_over=started_over)

    def _decide(self, text: str, *, started_over: bool) -> JoinedText:
        self.decided = True
        self.started_over = started_over
        self._held = []
        return JoinedText(text, started_over)


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
