"""Request params that the job keeps for itself instead of sending them to the model.

Sans-IO. A job's ``params`` are the model's (``temperature``, ``max_tokens``, ...) except
those named in ``JOB_PARAMS``, which steer the job's own loop:

- ``max_tool_calls``: at most this many of the model's tool calls run in the whole job
  (OpenAI's Responses parameter of that name). Calls past it are not run: each gets the
  result ``TOOL_CALL_LIMIT_OUTPUT`` (an error result), so the model is told, and the turns
  after it ask the model for ``tool_choice: "none"``, so it answers in text.

- ``client_tools``: function tools the client runs itself (OpenAI's chat ``tools`` entries,
  ``{"type": "function", "function": {"name", "description", "parameters"}}``). The model
  sees them with the server's tools; a turn that calls one runs its server-side calls, then
  the job ends ``completed`` with the client-side calls open (no result logged): the client
  answers them in the next job of the conversation (``check_client_tools``).

``ToolCallBudget`` counts calls from the log alone, so a job continued from its stored log
(recovery, hand-over) decides every call as the first run did.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

from backstream.protocol.events import LogEvent, ToolCallEvent

__all__ = [
    "JOB_PARAMS",
    "MAX_CLIENT_TOOLS",
    "TOOL_CALL_LIMIT_OUTPUT",
    "ToolCallBudget",
    "check_client_tools",
    "check_max_tool_calls",
    "client_tool_names",
]

JOB_PARAMS: Final = frozenset({"max_tool_calls", "client_tools"})
MAX_CLIENT_TOOLS: Final = 128
_TOOL_NAME: Final = re.compile(r"[A-Za-z0-9_\-]{1,64}")
TOOL_CALL_LIMIT_OUTPUT: Final = (
    "not run: this response reached its max_tool_calls limit; answer without calling tools"
)


def check_max_tool_calls(value: Any) -> int:
    """``value`` as a ``max_tool_calls``; ``ValueError`` unless a non-negative integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("max_tool_calls must be a non-negative integer")
    return value


def check_client_tools(value: Any) -> list[dict[str, Any]]:
    """``value`` as ``client_tools``; ``ValueError`` naming what is wrong."""
    if not isinstance(value, list) or len(value) > MAX_CLIENT_TOOLS:
        raise ValueError(f"client_tools must be a list of at most {MAX_CLIENT_TOOLS} function tools")
    names: set[str] = set()
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ValueError(f'client_tools[{i}] must be {{"type": "function", "function": {{...}}}}')
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise ValueError(f"client_tools[{i}].function.name must be 1 to 64 letters, digits, _ or -")
        if name in names:
            raise ValueError(f"client_tools names {name!r} twice")
        names.add(name)
        if not isinstance(function.get("parameters", {}), dict | None):
            raise ValueError(f"client_tools[{i}].function.parameters must be a JSON schema object")
    return value


def client_tool_names(params: Mapping[str, Any]) -> frozenset[str]:
    """The names of a job's client-side tools (none without ``client_tools``)."""
    return frozenset(tool["function"]["name"] for tool in params.get("client_tools") or ())


@attrs.define
class ToolCallBudget:
    """The tool calls one job may still run. ``limit`` None: no limit. ``spent``: the calls
    the model made before (each counts, run or not)."""

    limit: int | None
    spent: int = 0

    @classmethod
    def for_params(cls, params: Mapping[str, Any], *, spent: int = 0) -> ToolCallBudget:
        value = params.get("max_tool_calls")
        return cls(None if value is None else check_max_tool_calls(value), spent)

    @classmethod
    def from_log(
        cls, params: Mapping[str, Any], entries: Iterable[LogEvent], *, open_calls: int
    ) -> ToolCallBudget:
        """The budget of a job whose log holds ``entries``: every call logged counts, except
        the ``open_calls`` of the turn still to be finished (its calls are decided again)."""
        made = sum(1 for e in entries if isinstance(e, ToolCallEvent))
        return cls.for_params(params, spent=made - open_calls)

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.spent >= self.limit

    def take(self, count: int) -> int:
        """Spend ``count`` calls of one turn (in order); how many of them, from the first,
        may run."""
        allowed = count if self.limit is None else max(0, min(count, self.limit - self.spent))
        self.spent += count
        return allowed

    def model_params(self, params: Mapping[str, Any], *, has_tools: bool) -> dict[str, Any]:
        """The params of the next model turn: without ``JOB_PARAMS``; with ``tool_choice:
        "none"`` once the budget is spent (only with tools: a model API refuses a
        ``tool_choice`` without them)."""
        out = {k: v for k, v in params.items() if k not in JOB_PARAMS}
        if has_tools and self.exhausted:
            out["tool_choice"] = "none"
        return out
