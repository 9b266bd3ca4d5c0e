"""``job.get`` replies that fit in one frame: the content and the tool calls, in pages."""

from __future__ import annotations

import json
from collections.abc import Sequence

import attrs

from backstream.protocol.codec import converter, encode
from backstream.protocol.errors import TooLargeError
from backstream.protocol.events import JobInfo, ToolCallRecord
from backstream.protocol.messages import JobInfoMessage
from backstream.protocol.streams_wire import job_stream_path

__all__ = ["job_info_page"]

_RESERVE = 96  # bytes for "next_offset" and "next_tool_calls_offset" and their numbers


def job_info_page(
    request_id: str, info: JobInfo, *, offset: int, tool_calls_offset: int, max_bytes: int
) -> JobInfoMessage:
    """The reply to ``job.get``: the content from ``offset`` and the tool calls from
    ``tool_calls_offset``, as much of both as fits in ``max_bytes`` of UTF-8 JSON.

    Content comes first; a cut sets ``next_offset``, more tool calls ``next_tool_calls_offset``.
    Raises ``TooLargeError`` when not even the summary and one step forward fit (one tool
    call larger than the frame).
    """
    calls: Sequence[ToolCallRecord] = info.tool_calls[tool_calls_offset:]
    reply = JobInfoMessage(
        id=request_id,
        job=info.job,
        content=info.content,
        tool_calls=list(calls),
        step=info.step,
        stream=job_stream_path(info.job.job_id),
    )
    if _size(reply) <= max_bytes:
        return reply
    empty = attrs.evolve(reply, content="" if info.content is not None else None, tool_calls=[])
    room = max_bytes - _size(empty) - _RESERVE
    content, next_offset = info.content, None
    if content is not None and _text_size(content) > room:
        content = _fit_text(content, room)
        next_offset = offset + len(content)
    room -= _text_size(content or "")
    taken: list[ToolCallRecord] = []
    for call in calls:
        cost = len(json.dumps(converter.unstructure(call), ensure_ascii=False).encode()) + 1
        if cost > room:
            break
        taken.append(call)
        room -= cost
    more = len(taken) < len(calls)
    if not content and not taken:  # no step forward: the next call alone exceeds the frame
        raise TooLargeError(f"tool call {tool_calls_offset} of this job is larger than {max_bytes} bytes")
    return attrs.evolve(
        reply,
        content=content,
        tool_calls=taken,
        next_offset=next_offset,
        next_tool_calls_offset=tool_calls_offset + len(taken) if more else None,
    )


def _size(message: JobInfoMessage) -> int:
    return len(encode(message).encode())


def _text_size(text: str) -> int:
    """Bytes of ``text`` as a JSON string's contents."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return len(text)
    return len(json.dumps(text, ensure_ascii=False).encode()) - 2


def _fit_text(text: str, room: int) -> str:
    """The longest prefix of ``text`` whose JSON form fits in ``room`` bytes (a binary search)."""
    low, high = 0, min(len(text), max(room, 0))
    while low < high:
        middle = (low + high + 1) // 2
        if _text_size(text[:middle]) <= room:
            low = middle
        else:
            high = middle - 1
    return text[:low]
