"""Running a workflow in its job's actor, durable step by step (``docs/workflows.md``).

Every step is a ``step`` entry when it starts and another when it finishes, with its result
(``StepEvent``); each is written to the store before the workflow goes on. An actor given a
log that holds steps already (a job taken over, or a server restarted) runs the workflow
again from the top: a step the log holds finished returns its recorded result without
running, the step the log holds unfinished goes on (a wait for a person goes on waiting, a
sleep sleeps what is left, a tool that may have run is not run again unless it is
idempotent), and the steps after it run as new. A workflow that asks for another step
than the log holds next (its code changed) ends ``failed``/``workflow_diverged``.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, Protocol

import trio

from backstream.actors.clock import WallClock
from backstream.actors.config import Config
from backstream.actors.joblog import JobLog, OutputLimitExceeded
from backstream.actors.ports import ChatTurn, ModelFailure, Tools, TurnResult
from backstream.actors.workflow import ModelReply, StepFailed, ToolReply, WorkflowContext, WorkflowTarget
from backstream.protocol.chat_stream import ModelOutput, TextDelta
from backstream.protocol.conversation import (
    DECLINED_OUTPUT,
    INTERRUPTED_CALL_OUTPUT,
    assistant_message,
    tool_message,
)
from backstream.protocol.events import AWAITING_APPROVAL, RUNNING, ErrorInfo, StepEvent, step_call_id
from backstream.protocol.lifecycle import LogState
from backstream.protocol.records import JobRecord
from backstream.protocol.workflow import RecordedStep, short_summary, step_bytes, workflow_history

__all__ = ["StepHost", "WorkflowContext", "WorkflowRun"]

log = logging.getLogger("backstream.workflow")

_RESERVED = ("approve", "sleep")
_RESERVED_PREFIXES = ("model:", "tool:")
StepBody = Callable[[RecordedStep | None], Awaitable[tuple[Any, str]]]
"""A step's work: given the step as the log holds it unfinished (or None for a new step),
its JSON-ready result and a summary of it."""


class StepHost(Protocol):
    """What a workflow needs of its job's actor."""

    @property
    def log(self) -> JobLog: ...

    @property
    def record(self) -> JobRecord: ...

    def touch(self) -> None:
        """The job changed now (its ``updated_at``)."""

    def appended(self) -> None:
        """Entries were appended: write them with the next batch."""

    def add_usage(self, usage: dict[str, Any] | None) -> None: ...

    async def write_through(self) -> None:
        """Write every entry so far to the store. Raises ``ModelFailure`` (``unavailable``)."""

    async def ask_person(self, call_id: str, name: str, arguments: str, *, asked: bool) -> bool:
        """Wait for a person's decision on ``call_id`` (``approval_timeout``: declined)."""
        ...


class _Stopped(Exception):
    """The run has failed (diverged, a limit): raised again by every later call, so that a
    workflow that catches it cannot go on."""


class WorkflowRun:
    """One run of a workflow in its job's actor (``run`` once)."""

    def __init__(
        self, host: StepHost, target: WorkflowTarget, *, config: Config, clock: WallClock, tools: Tools
    ) -> None:
        self.host = host
        self._target = target
        self._config = config
        self._clock = clock
        self._tools = tools
        history = workflow_history(host.log.entries())
        self._recorded = history.steps
        self._trailing = history.trailing_text
        self._replayed = 0  # recorded steps the run has come past
        self._gap = self._recorded[0].text_before if self._recorded else self._trailing
        self._bytes = history.recorded_bytes
        self._count = 0  # steps the workflow has asked for
        self._failure: ErrorInfo | None = None

    @property
    def job_id(self) -> str:
        return self.host.record.job_id

    async def run(self) -> TurnResult:
        """Run the workflow to its end; its result is the job's last text. Raises
        ``ModelFailure`` for a workflow that failed, ``OutputLimitExceeded``."""
        try:
            value = await self._target.workflow.function(WorkflowContext(self), self._input())
            if self._failure is None:
                await self.emit(_as_text(value))
                if self._replayed < len(self._recorded):
                    nxt = self._recorded[self._replayed]
                    self._diverged(nxt.step, f"the workflow ended; the log holds step {nxt.name!r} next")
        except _Stopped:
            pass
        except OutputLimitExceeded:
            raise
        except StepFailed as exc:
            self._failure = self._failure or ErrorInfo(
                "workflow_error", f"StepFailed: step {exc.step}: {exc.type}: {exc.message}"
            )
        except Exception as exc:
            # The client gets the type and the message; the traceback goes to the server's log.
            log.warning("job %s: the workflow raised", self.host.record.job_id, exc_info=True)
            self._failure = self._failure or ErrorInfo("workflow_error", f"{type(exc).__name__}: {exc}")
        if self._failure is not None:
            raise ModelFailure(self._failure)
        return TurnResult(finish_reason="stop", usage=None, tool_calls=())

    def _input(self) -> dict[str, Any]:
        value = self.host.record.request.annotations.get("workflow_input")
        return dict(value) if isinstance(value, dict) else {}

    # -- the steps ----------------------------------------------------------------------

    async def model(
        self, model: str, messages: list[dict[str, Any]], tools: tuple[str, ...], params: dict[str, Any]
    ) -> ModelReply:
        unknown = [name for name in tools if self._tools.get(name) is None]
        if unknown:
            raise ValueError(f"unknown tool: {unknown[0]!r}")
        specs = tuple(spec.openai_spec() for name in tools if (spec := self._tools.get(name)) is not None)
        usage: dict[str, int] = {}
        for _ in range(self._config.max_turns):
            reply = await self._model_turn(model, messages, specs, params)
            for key, value in (reply.get("usage") or {}).items():
                if isinstance(value, int) and not isinstance(value, bool):
                    usage[key] = usage.get(key, 0) + value
            calls = [(str(c[0]), str(c[1]), str(c[2])) for c in reply["tool_calls"]]
            if not calls:
                return ModelReply(
                    text=reply["text"], finish_reason=reply["finish_reason"], usage=usage or None
                )
            messages.append(assistant_message(reply["text"], calls))
            for call_id, name, arguments in calls:
                outcome = await self.tool(name, arguments)
                messages.append(tool_message(call_id, outcome.output))
        raise StepFailed(
            self._count,
            "tool_loop_limit",
            f"the model still called tools after {self._config.max_turns} turns",
        )

    async def _model_turn(
        self,
        model: str,
        messages: list[dict[str, Any]],
        specs: tuple[dict[str, Any], ...],
        params: dict[str, Any],
    ) -> dict[str, Any]:
        limit = self._config.max_output_chars

        async def body(_recorded: RecordedStep | None) -> tuple[Any, str]:
            found = self._target.models(model)
            texts: list[str] = []
            size = 0

            def sink(out: ModelOutput) -> None:
                nonlocal size
                if isinstance(out, TextDelta) and size < limit:
                    texts.append(out.text[: limit - size])
                    size += len(texts[-1])

            turn = ChatTurn(model=model, messages=tuple(messages), params=params, tools=specs)
            result = await found.run_turn(turn, sink)
            text = "".join(texts)
            calls = [[c.call_id, c.name, c.arguments] for c in result.tool_calls]
            value = {
                "text": text,
                "tool_calls": calls,
                "finish_reason": result.finish_reason,
                "usage": result.usage,
            }
            called = ", ".join(c.name for c in result.tool_calls)
            return value, f"calls {called}" if called else text

        asked = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
        reply: dict[str, Any] = await self._run_step(f"model:{model}", asked, {"model": model}, body)
        self.host.add_usage(reply.get("usage"))
        return reply

    async def tool(self, name: str, arguments: str) -> ToolReply:
        spec = self._tools.get(name)

        async def body(recorded: RecordedStep | None) -> tuple[Any, str]:
            if spec is None:
                return _reply(f"tool {name!r} does not exist", True)
            if spec.requires_approval and not await self._decision(recorded, f"tool:{name}", arguments):
                return _reply(DECLINED_OUTPUT, True)
            ran_before = recorded is not None and (
                not spec.requires_approval or recorded.approved is not None
            )
            if ran_before and not spec.idempotent:  # perhaps running when its server died: not twice
                return _reply(INTERRUPTED_CALL_OUTPUT, True)
            with trio.fail_after(self._config.workflow_step_timeout):
                outcome = await self._tools.run(name, arguments)
            output = outcome.output
            if len(output) > spec.max_output_chars:
                output = (
                    f"{output[: spec.max_output_chars]}\n[output cut at {spec.max_output_chars} characters]"
                )
            return _reply(output, outcome.is_error)

        value = await self._run_step(f"tool:{name}", arguments, {"arguments": arguments}, body, timed=False)
        return ToolReply(output=str(value["output"]), is_error=bool(value["is_error"]))

    async def approve(self, prompt: str) -> bool:
        arguments = json.dumps({"prompt": prompt}, ensure_ascii=False)

        async def body(recorded: RecordedStep | None) -> tuple[Any, str]:
            approved = await self._decision(recorded, "approve", arguments)
            return approved, "approved" if approved else "declined"

        return bool(await self._run_step("approve", prompt, {"prompt": prompt}, body, timed=False))

    async def sleep(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError("ctx.sleep: seconds must be a number, at least 0")
        until = self._clock.now() + seconds

        async def body(recorded: RecordedStep | None) -> tuple[Any, str]:
            end = json.loads(recorded.started.data or "{}").get("until", until) if recorded else until
            await trio.sleep(max(0.0, end - self._clock.now()))
            return None, f"slept {seconds:g} s"

        await self._run_step(
            "sleep", f"{seconds:g} s", {"seconds": seconds, "until": until}, body, timed=False
        )

    async def custom_step(self, name: str, fn: Callable[[], Any]) -> Any:
        if not name or name in _RESERVED or name.startswith(_RESERVED_PREFIXES) or len(name) > 200:
            raise ValueError(f"ctx.step: {name!r} is not a step name of its own")

        async def body(_recorded: RecordedStep | None) -> tuple[Any, str]:
            value = fn()
            if inspect.isawaitable(value):
                value = await value
            return value, short_summary(value)

        return await self._run_step(name, "", None, body)

    async def emit(self, text: str) -> None:
        self._check_live()
        if not text:
            return
        if self._gap:  # replaying: this text is in the log already
            if self._gap.startswith(text):
                self._gap = self._gap[len(text) :]
                return
            self._diverged(
                self._count + 1, f"it emitted {text[:60]!r} where the log holds {self._gap[:60]!r}"
            )
        if self._replayed < len(self._recorded):
            nxt = self._recorded[self._replayed]
            self._diverged(nxt.step, f"it emitted {text[:60]!r} where the log holds step {nxt.name!r}")
        self.host.log.append_text(text)
        self.host.touch()
        self.host.appended()

    # -- recording --------------------------------------------------------------------

    async def _run_step(
        self, name: str, summary: Any, data: Any, body: StepBody, *, timed: bool = True
    ) -> Any:
        recorded = await self._begin(name, summary, data)
        number = self._count
        if recorded is not None and recorded.finished is not None:
            return _result_of(recorded.finished)
        try:
            if timed:
                with trio.fail_after(self._config.workflow_step_timeout):
                    value, done = await body(recorded)
            else:
                value, done = await body(recorded)
            data_text = json.dumps(value, ensure_ascii=False)
        except trio.TooSlowError:
            failed = (
                "StepTimeout",
                f"the step outlived workflow_step_timeout ({self._config.workflow_step_timeout:g} s)",
            )
        except ModelFailure as exc:
            failed = (exc.error.code, exc.error.message)
        except (_Stopped, OutputLimitExceeded):
            raise
        except Exception as exc:
            failed = (type(exc).__name__, str(exc))
        else:
            await self._finish(StepEvent(0, number, name, "finished", short_summary(done), data_text))
            return json.loads(data_text)
        error = json.dumps({"type": failed[0], "message": failed[1]}, ensure_ascii=False)
        await self._finish(
            StepEvent(0, number, name, "finished", short_summary(failed[1]), error, is_error=True)
        )
        raise StepFailed(number, *failed)

    async def _begin(self, name: str, summary: Any, data: Any) -> RecordedStep | None:
        """Step ``count + 1``, named ``name``: the step the log holds to replay, or None
        after logging it started (durably)."""
        self._check_live()
        number = self._count + 1
        if self._gap:
            self._diverged(
                number,
                f"the log holds the text {self._gap[:60]!r} before it, the workflow asked for {name!r}",
            )
        if self._replayed < len(self._recorded):
            recorded = self._recorded[self._replayed]
            if recorded.name != name:
                self._diverged(number, f"the log holds {recorded.name!r}, the workflow asked for {name!r}")
            self._replayed += 1
            ahead = self._replayed < len(self._recorded)
            self._gap = self._recorded[self._replayed].text_before if ahead else self._trailing
            self._count = number
            return recorded
        if number > self._config.max_workflow_steps:
            self._stop(
                ErrorInfo(
                    "workflow_limit",
                    f"the workflow took more than max_workflow_steps ({self._config.max_workflow_steps})",
                )
            )
        encoded = None if data is None else json.dumps(data, ensure_ascii=False)
        event = StepEvent(0, number, name, "started", short_summary(summary), encoded)
        self._charge(event)
        self.host.log.append_step(event)
        self._count = number
        self.host.touch()
        await self.host.write_through()  # durable before the step runs: a tool never runs twice
        return None

    async def _finish(self, event: StepEvent) -> None:
        self._charge(event)
        self.host.log.append_step(event)
        self.host.touch()
        await self.host.write_through()  # the result is durable before the next step starts

    async def _decision(self, recorded: RecordedStep | None, name: str, arguments: str) -> bool:
        """The person's decision for the current step: as the log holds it, or waited for."""
        log = self.host.log
        if recorded is not None and recorded.approved is not None:
            if log.state is LogState.STEP_APPROVAL_DECIDED:
                log.append_status(RUNNING)
            return recorded.approved
        if recorded is not None and log.state is LogState.STEP_APPROVAL_REQUESTED:
            log.append_status(AWAITING_APPROVAL)
        asked = recorded is not None and recorded.approval_asked
        return await self.host.ask_person(step_call_id(self._count), name, arguments, asked=asked)

    def _charge(self, event: StepEvent) -> None:
        self._bytes += step_bytes(event)
        limit = self._config.max_workflow_recorded_bytes
        if self._bytes > limit:
            self._stop(
                ErrorInfo(
                    "workflow_limit", f"the workflow recorded more than max_workflow_recorded_bytes ({limit})"
                )
            )

    def _check_live(self) -> None:
        if self._failure is not None:
            raise _Stopped(self._failure.message)

    def _diverged(self, step: int, why: str) -> NoReturn:
        self._stop(ErrorInfo("workflow_diverged", f"step {step}: the replay diverged from the log: {why}"))

    def _stop(self, error: ErrorInfo) -> NoReturn:
        self._failure = self._failure or error
        raise _Stopped(error.message)


def _reply(output: str, is_error: bool) -> tuple[Any, str]:
    return {"output": output, "is_error": is_error}, ("error: " if is_error else "") + output


def _result_of(finished: StepEvent) -> Any:
    value = json.loads(finished.data) if finished.data else None
    if finished.is_error:
        info = value if isinstance(value, dict) else {}
        raise StepFailed(finished.step, str(info.get("type", "error")), str(info.get("message", "")))
    return value


def _as_text(value: Any) -> str:
    """A workflow's result as the end of the job's content."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)
