"""Feeds a model's chat-completion chunks through the assembler into a job's sink."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from backstream.actors.ports import ModelFailure, OutputSink, TurnResult
from backstream.protocol.chat_stream import (
    ChatStreamAssembler,
    ChatStreamError,
    ModelOutput,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallDone,
)
from backstream.protocol.events import ErrorInfo

__all__ = ["TurnCollector", "continue_after"]


class TurnCollector:
    """Feeds chunks through an assembler into a sink and keeps the turn's result."""

    def __init__(self, sink: OutputSink, *, max_argument_chars: int) -> None:
        self.assembler = ChatStreamAssembler(max_argument_chars=max_argument_chars)
        self._sink = sink
        self._tool_calls: list[ToolCallDone] = []
        self.produced = False  # any token yet: after it, a failure is never retried

    def feed_data(self, data: str) -> None:
        """One SSE ``data`` payload. Raises ``ModelFailure``."""
        try:
            outputs = self.assembler.feed(data)
        except ChatStreamError as exc:
            raise ModelFailure(ErrorInfo(exc.code, exc.message)) from None
        self._deliver(outputs)

    def feed_chunk(self, chunk: dict[str, Any]) -> None:
        """One decoded chunk (built-in models). Raises ``ModelFailure``."""
        try:
            outputs = self.assembler.feed_chunk(chunk)
        except ChatStreamError as exc:
            raise ModelFailure(ErrorInfo(exc.code, exc.message)) from None
        self._deliver(outputs)

    def _deliver(self, outputs: list[ModelOutput]) -> None:
        sink = self._sink
        for out in outputs:
            kind = type(out)
            if kind is TextDelta or kind is ReasoningDelta or kind is ToolCallDelta:
                self.produced = True
            elif kind is ToolCallDone:
                self.produced = True
                self._tool_calls.append(out)  # type: ignore[arg-type]
            sink(out)

    def result(self) -> TurnResult:
        """The finished turn; ``upstream_protocol`` if the stream never finished."""
        reason = self.assembler.finish_reason
        if reason is None:
            raise ModelFailure(
                ErrorInfo("upstream_protocol", "the model stream ended without a finish_reason")
            )
        return TurnResult(reason, self.assembler.usage, tuple(self._tool_calls))


def continue_after(words: Sequence[str], prefill: str | None) -> Sequence[str]:
    """What a deterministic model streams of its answer ``words`` after ``prefill`` (the start
    of the answer, given to continue): the rest of the word the prefill ends in, then the
    words after it. A prefill that is not the start of the answer: the whole answer (the
    model starts over). Reads only as many words as the prefill covers."""
    if not prefill:
        return words
    at = 0
    for index, word in enumerate(words):
        end = at + len(word)
        if end >= len(prefill):
            if not word.startswith(prefill[at:]):
                return words
            rest = word[len(prefill) - at :]
            after = words[index + 1 :]
            return [rest, *after] if rest else after
        if prefill[at:end] != word:
            return words
        at = end
    return words  # the prefill is longer than the answer: start over
