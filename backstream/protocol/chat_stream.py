"""A sans-IO assembler for OpenAI-compatible chat-completion streams.

It takes the ``data`` of each SSE event (a JSON chunk, or ``[DONE]``) and
returns what the chunk means for a job: text, reasoning, tool-call argument
fragments as they come, complete tool calls, the finish reason and usage.
Tool-call fragments are assembled by ``index`` (by ``id`` for upstreams that
send none) and released, complete and in order, when the choice finishes; a
turn cut off by ``max_tokens`` (finish reason ``length``) releases none, since
its last call's arguments are cut off too. Text goes through ``protocol.text``:
surrogate pairs split across chunks are joined and lone surrogates become U+FFFD.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import orjson

from backstream.protocol.text import SurrogateJoiner, repair_surrogates

__all__ = [
    "ChatStreamAssembler",
    "ChatStreamError",
    "Finished",
    "ModelOutput",
    "ReasoningDelta",
    "TextDelta",
    "ToolCallDelta",
    "ToolCallDone",
    "UsageReport",
]


class ChatStreamError(Exception):
    """The stream reported an error, or broke the format. ``code`` is a job error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@attrs.frozen
class TextDelta:
    text: str


@attrs.frozen
class ReasoningDelta:
    text: str


@attrs.frozen
class ToolCallDelta:
    """Arguments of call ``index`` as they arrive: reported once its id and name are known
    (fragments before that come in the first delta), so every delta carries the
    ``call_id`` its ``ToolCallDone`` will have."""

    index: int
    call_id: str
    name: str
    arguments_delta: str


@attrs.frozen
class ToolCallDone:
    index: int
    call_id: str
    name: str
    arguments: str


@attrs.frozen
class Finished:
    finish_reason: str


@attrs.frozen
class UsageReport:
    usage: dict[str, Any]


ModelOutput = TextDelta | ReasoningDelta | ToolCallDelta | ToolCallDone | Finished | UsageReport


@attrs.define
class _PartialCall:
    call_id: str = ""
    name: str = ""
    arguments: list[str] = attrs.Factory(list)
    reported: int = 0  # fragments already reported as ToolCallDelta
    joiner: SurrogateJoiner = attrs.Factory(SurrogateJoiner)  # for the reported fragments


class ChatStreamAssembler:
    """State of one streamed completion. Bounded by ``max_tool_calls`` calls per turn."""

    def __init__(self, *, max_tool_calls: int = 128, max_argument_chars: int = 1_000_000) -> None:
        self._calls: dict[int, _PartialCall] = {}
        self._index_of_id: dict[str, int] = {}  # for fragments without an index
        self._last_index: int | None = None
        self._content = SurrogateJoiner()
        self._reasoning = SurrogateJoiner()
        self._max_tool_calls = max_tool_calls
        # Fragments wait here until the choice finishes; this bounds them.
        self._max_argument_chars = max_argument_chars
        self._argument_chars = 0
        self.done = False  # "[DONE]" seen
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def feed(self, data: str) -> list[ModelOutput]:
        """Interpret one SSE ``data`` payload. Raises ``ChatStreamError``."""
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            if data.strip() == "[DONE]":
                self.done = True
                return []
            # orjson refuses lone surrogates (and NaN); the standard library takes them, and
            # the text repair below makes them U+FFFD.
            try:
                chunk = json.loads(data)
            except ValueError as exc:
                raise ChatStreamError("upstream_protocol", f"malformed JSON in the stream: {exc}") from None
        if not isinstance(chunk, dict):
            raise ChatStreamError("upstream_protocol", "a stream chunk is not a JSON object")
        return self.feed_chunk(chunk)

    def feed_chunk(self, chunk: dict[str, Any]) -> list[ModelOutput]:
        """Interpret one decoded chunk (built-in models call this directly)."""
        error = chunk.get("error")
        if error:
            raise ChatStreamError("upstream_error", _error_message(error))
        out: list[ModelOutput] = []
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise ChatStreamError("upstream_protocol", "'choices' is not a list")
        for choice in choices:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._choice(choice, out)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
            out.append(UsageReport(usage))
        return out

    def _choice(self, choice: dict[str, Any], out: list[ModelOutput]) -> None:
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            raise ChatStreamError("upstream_protocol", "'delta' is not an object")
        # OpenRouter streams "reasoning"; vLLM and DeepSeek "reasoning_content".
        reasoning = delta.get("reasoning") or delta.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            reasoning = self._reasoning.take(reasoning)
            if reasoning:
                out.append(ReasoningDelta(reasoning))
        content = delta.get("content")
        if isinstance(content, str) and content:
            content = self._content.take(content)
            if content:
                out.append(TextDelta(content))
        tool_calls = delta.get("tool_calls")
        if tool_calls:
            if not isinstance(tool_calls, list):
                raise ChatStreamError("upstream_protocol", "'tool_calls' is not a list")
            for fragment in tool_calls:
                self._tool_fragment(fragment, out)
        reason = choice.get("finish_reason")
        if reason:
            if reason == "error":
                raise ChatStreamError("upstream_error", "the model stream ended with finish_reason 'error'")
            self.finish_reason = repair_surrogates(str(reason))
            if held := self._reasoning.flush():
                out.append(ReasoningDelta(held))
            if held := self._content.flush():
                out.append(TextDelta(held))
            if self.finish_reason == "length":
                self._drop_calls()  # cut off mid-call: never run, never sent back
            out.extend(self._release_calls())
            out.append(Finished(self.finish_reason))

    def _tool_fragment(self, fragment: Any, out: list[ModelOutput]) -> None:
        if not isinstance(fragment, dict):
            raise ChatStreamError("upstream_protocol", "a tool-call fragment is not an object")
        index = fragment.get("index")
        if index is None:
            index = self._index_without_index(fragment.get("id"))
        elif not isinstance(index, int):
            raise ChatStreamError("upstream_protocol", "a tool-call index is not an integer")
        self._last_index = index
        call = self._calls.get(index)
        if call is None:
            if len(self._calls) >= self._max_tool_calls:
                raise ChatStreamError(
                    "upstream_protocol", f"more than {self._max_tool_calls} tool calls in one turn"
                )
            call = self._calls[index] = _PartialCall()
        if fragment.get("id") and not call.call_id:
            call.call_id = str(fragment["id"])
        function = fragment.get("function") or {}
        if isinstance(function, dict):
            if function.get("name") and not call.name:
                call.name = str(function["name"])
            arguments = function.get("arguments")
            if isinstance(arguments, str) and arguments:
                self._argument_chars += len(arguments)
                if self._argument_chars > self._max_argument_chars:
                    raise ChatStreamError(
                        "output_limit",
                        f"tool-call arguments exceed {self._max_argument_chars} characters",
                    )
                call.arguments.append(arguments)
        if call.call_id and call.name and call.reported < len(call.arguments):
            delta = call.joiner.take("".join(call.arguments[call.reported :]))
            call.reported = len(call.arguments)
            if delta:
                call_id, name = repair_surrogates(call.call_id), repair_surrogates(call.name)
                out.append(ToolCallDelta(index, call_id, name, delta))

    def _index_without_index(self, call_id: Any) -> int:
        """Some upstreams send no ``index``: a new ``id`` starts a call, and a fragment
        with neither continues the last one."""
        if not call_id:
            return self._last_index if self._last_index is not None else 0
        call_id = str(call_id)
        index = self._index_of_id.get(call_id)
        if index is None:
            index = self._index_of_id[call_id] = max(self._calls, default=-1) + 1
        return index

    def _release_calls(self) -> list[ModelOutput]:
        done: list[ModelOutput] = []
        for index, call in sorted(self._calls.items()):
            if call.reported and (held := call.joiner.flush()):  # the reported fragments add up
                call_id, name = repair_surrogates(call.call_id), repair_surrogates(call.name)
                done.append(ToolCallDelta(index, call_id, name, held))
        done += [
            ToolCallDone(
                index=index,
                call_id=repair_surrogates(call.call_id) or f"call_{index}",
                name=repair_surrogates(call.name),
                arguments=repair_surrogates("".join(call.arguments)),
            )
            for index, call in sorted(self._calls.items())
        ]
        self._drop_calls()
        return done

    def _drop_calls(self) -> None:
        self._calls.clear()
        self._index_of_id.clear()
        self._last_index = None
        self._argument_chars = 0


def _error_message(error: Any) -> str:
    if isinstance(error, dict):
        message = error.get("message") or error.get("code") or "error"
        return repair_surrogates(str(message)[:500])
    return repair_surrogates(str(error)[:500])
