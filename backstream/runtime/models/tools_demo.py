"""``backstream/tools-demo``: a built-in model that calls tools, offline.

The model reads the last user message and calls the enabled tools it has a use for:
``calculate`` on the first arithmetic expression in it, ``clock_now`` when it speaks of the
time or the date, ``send_note`` when it asks to send, note or remind; if none of these
applies, ``clock_now``. It streams a short sentence, ends the turn with the calls, and once
their results come back it answers with what they said. It never calls a tool that is not
enabled for the job, and with no usable tool enabled it says so.

``send_note`` is the demo tool of ``backstream.runtime.tools.demo`` (it needs approval);
``backstream demo --web`` registers it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import trio

from backstream.actors.ports import ChatTurn, OutputSink, TurnResult
from backstream.runtime.models.turns import TurnCollector, continue_after

__all__ = ["TOOLS_DEMO_MODEL", "ToolsDemoModel", "describe_results", "find_expression", "plan_calls"]

TOOLS_DEMO_MODEL = "backstream/tools-demo"

_TIME_WORDS = re.compile(r"\b(time|date|clock|today|now|day)\b", re.IGNORECASE)
_NOTE_WORDS = re.compile(r"\b(send|note|remind|message|tell)\b", re.IGNORECASE)
_ARITHMETIC_RUN = re.compile(r"[\d.(][\d\s.+\-*/%()]*[\d)]")
_OPERATOR_BETWEEN = re.compile(r"[\d)]\s*(\*\*|//|[-+*/%])\s*[\d(.]")
_RECIPIENT = re.compile(r"\b(?:to|for)\s+([A-Z][\w-]{0,40})")


def find_expression(text: str) -> str | None:
    """The first arithmetic expression in ``text`` (digits with an operator between them)."""
    for match in _ARITHMETIC_RUN.finditer(text):
        candidate = match.group().strip()
        if _OPERATOR_BETWEEN.search(candidate):
            return candidate
    return None


def plan_calls(user_text: str, enabled: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """The tool calls (name, arguments) the model makes for ``user_text``."""
    calls: list[tuple[str, dict[str, Any]]] = []
    expression = find_expression(user_text)
    if expression is not None and "calculate" in enabled:
        calls.append(("calculate", {"expression": expression}))
    if _TIME_WORDS.search(user_text) and "clock_now" in enabled:
        calls.append(("clock_now", {}))
    if _NOTE_WORDS.search(user_text) and "send_note" in enabled:
        recipient = _RECIPIENT.search(user_text)
        note = {"to": recipient.group(1) if recipient else "you", "text": user_text.strip()[:200]}
        calls.append(("send_note", note))
    if not calls and "clock_now" in enabled:
        calls.append(("clock_now", {}))
    return calls


def describe_results(messages: Sequence[dict[str, Any]]) -> str:
    """The answer after the tool results that follow the last assistant turn with calls."""
    asked: dict[str, tuple[str, dict[str, Any]]] = {}
    for message in messages:
        for call in message.get("tool_calls") or ():
            function = call.get("function", {})
            try:
                arguments = json.loads(function.get("arguments") or "{}")
            except ValueError:
                arguments = {}
            asked[call.get("id", "")] = (function.get("name", "?"), arguments)
    lines = []
    for message in messages:
        if message.get("role") != "tool":
            continue
        name, arguments = asked.get(message.get("tool_call_id", ""), ("?", {}))
        lines.append(_describe(name, arguments, str(message.get("content", ""))))
    return " ".join(lines) or "The tools returned nothing."


def _describe(name: str, arguments: dict[str, Any], output: str) -> str:
    if "declined" in output:
        return f"You declined {name}, so I did not run it."
    if output.startswith(("invalid arguments", "the tool", "tool ")) or "Error:" in output:
        return f"The {name} tool failed: {output}."
    if name == "calculate":
        return f"{arguments.get('expression', '?')} = {output}."
    if name == "clock_now":
        return f"The time on the server is {output} (UTC)."
    if name == "send_note":
        return f"With your approval, send_note took {output}."
    return f"{name} said: {output}."


def _last_user_index(messages: Sequence[dict[str, Any]]) -> int:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "user":
            return index
    return -1


def _user_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


class ToolsDemoModel:
    """Streams words at ``params.tokens_per_s`` (default ``default_rate``) and calls tools."""

    def __init__(self, *, default_rate: float, max_argument_chars: int) -> None:
        self._default_rate = default_rate
        self._max_argument_chars = max_argument_chars

    async def run_turn(self, turn: ChatTurn, sink: OutputSink) -> TurnResult:
        """One turn: calls, or the answer once results are in. Cancellation: stops at once."""
        collector = TurnCollector(sink, max_argument_chars=self._max_argument_chars)
        rate = float(turn.params.get("tokens_per_s") or self._default_rate)
        last_user = _last_user_index(turn.messages)
        since_user = turn.messages[last_user + 1 :]
        enabled = [spec.get("function", {}).get("name", "") for spec in turn.tools]
        if any(m.get("role") == "tool" for m in since_user):
            words = await _stream(collector, describe_results(since_user), rate, turn.prefill)
            return _finish(collector, "stop", turn, words)
        user_text = _user_text(turn.messages[last_user]) if last_user >= 0 else ""
        calls = plan_calls(user_text, enabled)
        if not calls:
            reply = "I can call calculate, clock_now and send_note, but none of them is enabled for this job."
            words = await _stream(collector, reply, rate, turn.prefill)
            return _finish(collector, "stop", turn, words)
        names = [name for name, _ in calls]
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        words = await _stream(collector, f"Let me use {listed} for that. ", rate, turn.prefill)
        for index, (name, arguments) in enumerate(calls):
            fragment = {
                "index": index,
                "id": f"call_{index + 1}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)},
            }
            collector.feed_chunk({"choices": [{"index": 0, "delta": {"tool_calls": [fragment]}}]})
        return _finish(collector, "tool_calls", turn, words)


async def _stream(collector: TurnCollector, text: str, rate: float, prefill: str | None) -> int:
    """Stream ``text`` word by word at ``rate`` words per second (after ``prefill``, the start
    of it already said, if it is); returns the word count."""
    words = continue_after(re.findall(r"\S+\s*", text), prefill)
    start = trio.current_time()
    for i, word in enumerate(words):
        await trio.sleep_until(start + i / rate)
        collector.feed_chunk({"choices": [{"index": 0, "delta": {"content": word}}]})
    return len(words)


def _finish(collector: TurnCollector, reason: str, turn: ChatTurn, completion: int) -> TurnResult:
    collector.feed_chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
    prompt = sum(len(_user_text(m).split()) for m in turn.messages)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    collector.feed_chunk({"choices": [], "usage": usage})
    return collector.result()
