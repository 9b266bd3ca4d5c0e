"""OpenAI's Responses API on the wire: server-sent event frames and the error shape.

Sans-IO. A frame's ``id:`` is the stream offset a client resumes from (``Last-Event-ID``);
the caller gives it (see ``protocol.offsets``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["error_body", "sse_frame"]


def sse_frame(event: Mapping[str, Any], *, event_id: str | None = None) -> bytes:
    """One server-sent event: ``id:`` (when given: the offset to resume after it), ``event:``
    and one ``data:`` line."""
    data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event['type']}\ndata: {data}\n\n".encode()


def error_body(message: str, *, kind: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
