"""Models a job can stream from: the OpenAI-compatible upstream and the built-ins.

Every model runs one turn of a conversation and reports what it produces to a
sink, synchronously, as it arrives. Built-in models produce chat-completion
chunks and go through the same assembler as the upstream, so they exercise
the same machinery offline.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any, overload

import trio

from backstream.actors.ports import ChatTurn, Model, OutputSink, TurnResult
from backstream.protocol.errors import BadRequestError
from backstream.runtime.models.tools_demo import ToolsDemoModel
from backstream.runtime.models.turns import TurnCollector, continue_after

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_PARAMS",
    "EchoModel",
    "LoremModel",
    "builtin_model",
    "validate_builtin_params",
]


# -- built-in offline models ------------------------------------------------------

BUILTIN_PARAMS = frozenset({"tokens_per_s", "timestamps"})
_MAX_BUILTIN_TOKENS = 1_000_000

_LOREM = [
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
    "dolore",
    "magna",
    "aliqua",
    "ut",
    "enim",
    "ad",
    "minim",
    "veniam",
    "quis",
    "nostrud",
    "exercitation",
    "ullamco",
    "laboris",
    "nisi",
    "ut",
    "aliquip",
    "ex",
    "ea",
    "commodo",
    "consequat",
    "duis",
    "aute",
    "irure",
    "dolor",
    "in",
    "reprehenderit",
    "in",
    "voluptate",
    "velit",
    "esse",
    "cillum",
    "dolore",
    "eu",
    "fugiat",
    "nulla",
    "pariatur",
    "excepteur",
    "sint",
    "occaecat",
    "cupidatat",
    "non",
    "proident",
    "sunt",
    "in",
    "culpa",
    "qui",
    "officia",
    "deserunt",
    "mollit",
    "anim",
    "id",
    "est",
    "laborum",
]
_LOREM_WORDS = [word + " " for word in _LOREM]


def validate_builtin_params(model: str, params: dict[str, Any]) -> None:
    """Raise ``BadRequestError`` unless ``model`` is a built-in and its params make sense."""
    if model not in BUILTIN_MODELS:
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise BadRequestError(f"unknown built-in model {model!r} (known: {known})")
    rate = params.get("tokens_per_s")
    if rate is not None and (
        isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1_000_000
    ):
        raise BadRequestError("params.tokens_per_s must be a number in (0, 1000000]")
    max_tokens = params.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool)
        or not isinstance(max_tokens, int)
        or not 0 <= max_tokens <= _MAX_BUILTIN_TOKENS
    ):
        raise BadRequestError(f"params.max_tokens must be an integer in [0, {_MAX_BUILTIN_TOKENS}]")
    if "timestamps" in params and not isinstance(params["timestamps"], bool):
        raise BadRequestError("params.timestamps must be a boolean")


class _BuiltinModel:
    """Streams words at a steady rate, as chunks through the shared assembler."""

    def __init__(self, *, default_rate: float, max_argument_chars: int = 1_000_000) -> None:
        self._default_rate = default_rate
        self._max_argument_chars = max_argument_chars

    def words(self, turn: ChatTurn) -> Sequence[str]:
        raise NotImplementedError

    async def run_turn(self, turn: ChatTurn, sink: OutputSink) -> TurnResult:
        """Stream the built-in model's words into ``sink``. Cancellation: the turn stops at once."""
        collector = TurnCollector(sink, max_argument_chars=self._max_argument_chars)
        rate = float(turn.params.get("tokens_per_s") or self._default_rate)
        stamped = bool(turn.params.get("timestamps"))
        answer = self.words(turn)
        words = continue_after(answer, turn.prefill)
        if turn.prefill and words is not answer:
            # Continuing: echo the prefill first, as llama.cpp does. A reply that merely
            # continued would be ambiguous here: a lorem answer repeats itself, so its rest
            # can begin exactly like the prefill and pass for an echo of it.
            collector.feed_chunk({"choices": [{"index": 0, "delta": {"content": turn.prefill}}]})
        start = trio.current_time()
        for i, word in enumerate(words):
            # Sleeping until an absolute time keeps the rate exact however long a step took.
            await trio.sleep_until(start + i / rate)
            text = f"{time.time():.6f} " if stamped else word
            collector.feed_chunk({"choices": [{"index": 0, "delta": {"content": text}}]})
        await trio.sleep_until(start + len(words) / rate)
        collector.feed_chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        prompt_tokens = sum(len(_message_text(m).split()) for m in turn.messages)
        collector.feed_chunk(
            {
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": len(words),
                    "total_tokens": prompt_tokens + len(words),
                },
            }
        )
        return collector.result()


class EchoModel(_BuiltinModel):
    """``backstream/echo``: the last user message, word by word."""

    def words(self, turn: ChatTurn) -> Sequence[str]:
        text = next((_message_text(m) for m in reversed(turn.messages) if m.get("role") == "user"), "")
        words = re.findall(r"\S+\s*", text)
        limit = turn.params.get("max_tokens")
        return words[:limit] if isinstance(limit, int) else words


class LoremModel(_BuiltinModel):
    """``backstream/lorem``: ``params.max_tokens`` words (default 200) of lorem ipsum."""

    def words(self, turn: ChatTurn) -> Sequence[str]:
        count = turn.params.get("max_tokens")
        return _LoremWords(200 if not isinstance(count, int) else count)


class _LoremWords(Sequence[str]):
    """The words of a lorem answer, made on demand: memory does not grow with length."""

    def __init__(self, count: int) -> None:
        self._count = count

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if not -self._count <= index < self._count:
            raise IndexError(index)
        return _LOREM_WORDS[index % len(_LOREM_WORDS)]


BUILTIN_MODELS: dict[str, Callable[..., Model]] = {
    "backstream/echo": EchoModel,
    "backstream/lorem": LoremModel,
    "backstream/tools-demo": ToolsDemoModel,
}


def builtin_model(name: str, *, echo_rate: float, max_argument_chars: int) -> Model:
    factory = BUILTIN_MODELS[name]
    rate = echo_rate if factory is EchoModel else 30.0
    return factory(default_rate=rate, max_argument_chars=max_argument_chars)


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""
