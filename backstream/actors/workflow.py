"""Workflows: multi-step jobs written in Python, durable step by step (``docs/workflows.md``).

A workflow is an async function ``(ctx, input) -> result`` made a ``Workflow`` by the
``workflow`` decorator and registered with the runtime. A job whose model is
``workflow/<name>`` runs it (``WorkflowTarget``, what the model router resolves that name
to); ``WorkflowRun`` (``actors/workflow_run.py``) records each of its steps in the job's log.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import attrs

from backstream.actors.ports import ChatTurn, Model, ModelFailure, OutputSink, TurnResult
from backstream.protocol.events import ErrorInfo

__all__ = [
    "ModelReply",
    "StepFailed",
    "ToolReply",
    "Workflow",
    "WorkflowContext",
    "WorkflowFunction",
    "WorkflowSteps",
    "WorkflowTarget",
    "workflow",
]

WorkflowFunction = Callable[["WorkflowContext", dict[str, Any]], Awaitable[Any]]
"""A workflow: ``(ctx, input) -> result``."""
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@attrs.frozen
class Workflow:
    """A registered workflow: its ``name`` (a job names it as the model ``workflow/<name>``)
    and its function."""

    name: str
    function: WorkflowFunction = attrs.field(eq=False)
    description: str = ""

    def __attrs_post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"workflow name {self.name!r}: use 1-64 letters, digits, '_' or '-'")


def workflow(
    name: str | None = None, *, description: str | None = None
) -> Callable[[WorkflowFunction], Workflow]:
    """Make an async function ``(ctx, input)`` a ``Workflow`` (named after the function
    unless ``name`` is given; described by its docstring's first line unless
    ``description`` is)."""

    def make(function: WorkflowFunction) -> Workflow:
        doc = (function.__doc__ or "").strip().splitlines()
        told = description if description is not None else (doc[0] if doc else "")
        return Workflow(name=name or function.__name__, function=function, description=told)

    return make


@attrs.frozen
class ModelReply:
    """What ``ctx.model`` returns: the last turn's ``text`` and the usage of all its turns."""

    text: str
    finish_reason: str = "stop"
    usage: dict[str, Any] | None = None

    def __str__(self) -> str:
        return self.text


@attrs.frozen
class ToolReply:
    """What ``ctx.tool`` returns: the tool's output text, or an error text (``is_error``:
    the tool failed, was declined, or may not have completed when its server died)."""

    output: str
    is_error: bool = False

    def __str__(self) -> str:
        return self.output


class StepFailed(Exception):
    """A step failed (its exception, a model's failure, its timeout): recorded in the log,
    so its replay raises the same again. ``type`` is the exception's type name (or the
    error code of a model's failure), ``message`` its message."""

    def __init__(self, step: int, type_: str, message: str) -> None:
        super().__init__(f"step {step} failed: {type_}: {message}")
        self.step = step
        self.type = type_
        self.message = message


class WorkflowSteps(Protocol):
    """The steps a run offers its context (``WorkflowRun``, ``actors/workflow_run.py``)."""

    @property
    def job_id(self) -> str: ...

    async def model(
        self, model: str, messages: list[dict[str, Any]], tools: tuple[str, ...], params: dict[str, Any]
    ) -> ModelReply: ...

    async def tool(self, name: str, arguments: str) -> ToolReply: ...

    async def approve(self, prompt: str) -> bool: ...

    async def sleep(self, seconds: float) -> None: ...

    async def custom_step(self, name: str, fn: Callable[[], Any]) -> Any: ...

    async def emit(self, text: str) -> None: ...


class WorkflowContext:
    """What a workflow function gets as ``ctx``: its steps, and ``emit`` for text."""

    def __init__(self, run: WorkflowSteps) -> None:
        self._run = run

    @property
    def job_id(self) -> str:
        return self._run.job_id

    async def model(
        self,
        model: str,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[str] | None = None,
        params: dict[str, Any] | None = None,
    ) -> ModelReply:
        """One model turn (a step), through the server's models and limits; with ``tools``
        (registered tools' names), the model's calls run as ``tool`` steps and the model goes
        on until it answers without calls (at most ``max_turns`` turns)."""
        return await self._run.model(model, list(messages), tuple(tools or ()), dict(params or {}))

    async def tool(self, name: str, args: dict[str, Any] | str | None = None) -> ToolReply:
        """Run the registered tool ``name`` (a step); a tool that needs approval waits for a
        person first."""
        arguments = args if isinstance(args, str) else json.dumps(args or {}, ensure_ascii=False)
        return await self._run.tool(name, arguments)

    async def approve(self, prompt: str) -> bool:
        """Wait for a person's decision (a step; ``job.approve``); ``approval_timeout``
        counts as declined."""
        return await self._run.approve(prompt)

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a step): after a restart, only what is left of them."""
        await self._run.sleep(seconds)

    async def step(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (sync or async, no arguments) as a step named ``name`` and record its
        JSON-ready result: a replay returns it without running ``fn``. A step cut short by a
        crash runs again."""
        return await self._run.custom_step(name, fn)

    async def emit(self, text: str) -> None:
        """Add ``text`` to the job's content: watchers see it at once."""
        await self._run.emit(text)


ModelsOf = Callable[[str], Model]
"""The model that serves a model name (the router's resolution, for ``ctx.model``).
Raises ``BadRequestError``."""


@attrs.frozen
class WorkflowTarget:
    """What a job's model ``workflow/<name>`` resolves to: the workflow, and the models its
    steps may use. The job actor runs the workflow instead of a conversation."""

    workflow: Workflow
    models: ModelsOf = attrs.field(eq=False)

    async def run_turn(self, turn: ChatTurn, sink: OutputSink) -> TurnResult:
        """A workflow is not a chat model: never called by the job actor."""
        raise ModelFailure(ErrorInfo("bad_request", f"{turn.model} is a workflow, not a model"))
