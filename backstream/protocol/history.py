"""A conversation continued from a stored job: the messages of the next job.

Sans-IO. A job that continues another (the Responses API's ``previous_response_id``,
``job.start``'s ``previous_job_id``) is started with the whole conversation: the earlier
job's messages, its turns (text, tool calls and results) and its last answer, then what is
new. Each job so holds its conversation in its own request, and only the job it continues
must still be stored: older jobs of the chain may have expired.

The earlier job may have ended with calls of client-side tools open (``client_tools``):
the new messages must answer each of them with a ``tool`` message (OpenAI's
``function_call_output``), which go right after the calls whatever their place in the
new input. An earlier job's ``instructions`` (a Responses request's first system message)
are not carried over, as OpenAI does: a continued response gives its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import attrs

from backstream.protocol.conversation import assistant_message, conversation_from_log, tool_message
from backstream.protocol.errors import BadRequestError
from backstream.protocol.events import LogEvent, ToolCallRecord
from backstream.protocol.records import JobRequest

__all__ = ["CHAIN_DEPTH", "HISTORY_MESSAGES", "INPUT_MESSAGES", "History", "continue_conversation"]

CHAIN_DEPTH: Final = "chain_depth"
"""The annotation that counts the jobs a conversation chained before this one."""
HISTORY_MESSAGES: Final = "history_messages"
"""The annotation that counts the messages a continued job took from the one before."""
INPUT_MESSAGES: Final = "input_messages"
"""The annotation that counts the messages that are the job's own input (its last ones)."""


@attrs.frozen
class History:
    """The conversation of a stored job, ready to continue."""

    messages: tuple[dict[str, Any], ...]
    open_calls: tuple[ToolCallRecord, ...]
    """Calls of client-side tools the job ended with, still to be answered."""
    depth: int
    """Jobs in the chain up to and including this one."""

    @classmethod
    def of(cls, request: JobRequest, entries: Iterable[LogEvent]) -> History:
        so_far = conversation_from_log(request, entries)
        messages = list(so_far.messages)
        instructions = request.annotations.get("instructions")
        if instructions and messages and messages[0] == {"role": "system", "content": instructions}:
            messages = messages[1:]
        open_calls: tuple[ToolCallRecord, ...] = ()
        if so_far.calls:
            triples = [(c.call_id, c.name, c.arguments) for c in so_far.calls]
            messages.append(assistant_message(so_far.turn_text, triples))
            messages += [tool_message(c.call_id, c.output) for c in so_far.calls if c.output is not None]
            open_calls = tuple(c for c in so_far.calls if c.output is None)
        elif so_far.turn_text:
            messages.append({"role": "assistant", "content": so_far.turn_text})
        depth = request.annotations.get(CHAIN_DEPTH)
        return cls(tuple(messages), open_calls, (depth if isinstance(depth, int) else 0) + 1)


def continue_conversation(
    history: History,
    new: Sequence[dict[str, Any]],
    *,
    max_depth: int,
    max_bytes: int,
    param: str,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages of the job that continues ``history`` with the ``new`` messages, and
    the annotations that describe the chain (``CHAIN_DEPTH``, ``HISTORY_MESSAGES``,
    ``INPUT_MESSAGES``). Raises ``BadRequestError`` (with ``param``) for a chain past
    ``max_depth`` jobs or ``max_bytes`` of messages, an open call left unanswered, or an
    answer to no open call."""
    if history.depth >= max_depth:
        raise BadRequestError(
            f"this conversation already chains {history.depth} responses, the most this server "
            f"continues (max_chain_depth); start a new one with the messages you need",
            param=param,
        )
    answers, rest = _answers(history, new)
    messages = [*history.messages, *answers, *rest]
    size = len(json.dumps(messages, separators=(",", ":"), ensure_ascii=False).encode())
    if size > max_bytes:
        raise BadRequestError(
            f"the continued conversation would hold {size} bytes, more than this server keeps "
            f"({max_bytes}, max_chain_bytes); start a new one with the messages you need",
            param=param,
        )
    annotations = {
        CHAIN_DEPTH: history.depth,
        HISTORY_MESSAGES: len(history.messages),
        INPUT_MESSAGES: len(answers) + len(rest),
    }
    return messages, annotations


def _answers(
    history: History, new: Sequence[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ``tool`` messages of ``new`` that answer the open calls (in the calls' order),
    and the rest of ``new`` as sent, less results the history holds already (a client that
    sends back a whole response's output, server-side results included)."""
    open_calls = history.open_calls
    wanted = {call.call_id for call in open_calls}
    in_history = _call_ids(history.messages)
    earlier = in_history - wanted
    answered: dict[str, dict[str, Any]] = {}
    rest = []
    for message in new:
        if (
            message.get("role") == "assistant"
            and message.get("tool_calls")
            and _call_ids([message]) <= in_history
        ):
            continue  # the history's own calls, sent back with their answers
        call_id = message.get("tool_call_id") if message.get("role") == "tool" else None
        if call_id in wanted and call_id not in answered:
            answered[str(call_id)] = message
        elif call_id not in earlier:
            rest.append(message)
    missing = [call for call in open_calls if call.call_id not in answered]
    if missing:
        raise BadRequestError(f"No tool output found for function call {missing[0].call_id}.", param="input")
    known = _call_ids(rest)
    stray = next((m for m in rest if m.get("role") == "tool" and m.get("tool_call_id") not in known), None)
    if stray is not None:
        raise BadRequestError(
            f"No tool call found for function call output with call_id {stray.get('tool_call_id')}.",
            param="input",
        )
    return [answered[call.call_id] for call in open_calls], rest


def _call_ids(messages: Iterable[Mapping[str, Any]]) -> set[str]:
    """The ids of the tool calls that assistant messages among ``messages`` make."""
    return {
        str(call.get("id"))
        for message in messages
        if message.get("role") == "assistant"
        for call in message.get("tool_calls") or ()
        if isinstance(call, dict)
    }
