"""The job actor: one supervised task tree per job.

It owns the job's upstream request, its log and its cancel scope. Its tasks:
the conversation with the model, the flusher (writes the log to the store in
batches) and the abort listener (an abort may come from another process).
Whatever ends the job (completion, failure, abort, timeout, shutdown, a bug),
the content so far is kept and the terminal status is the log's last entry.

The conversation's state lives in the log: the actor derives its messages, turns and open
tool calls from it (``conversation_from_log``), so an actor given a log rebuilt from stored
entries continues the job where the log stops.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import trio

from backstream.actors.clock import WallClock
from backstream.actors.config import Config
from backstream.actors.continuing import TurnContinuation, add_usage, calls_may_have_run, check_continuable
from backstream.actors.job_lines import log_job_ended, log_job_started
from backstream.actors.job_tools import ClientTools
from backstream.actors.job_writes import STORE_FAILED, JobWrites
from backstream.actors.joblog import JobLog, OutputLimitExceeded
from backstream.actors.notifier import Notifier
from backstream.actors.ports import (
    ChatTurn,
    JobWriter,
    Model,
    ModelFailure,
    ToolOutcome,
    Tools,
    ToolSpec,
    TurnResult,
)
from backstream.actors.signals import through_outage
from backstream.actors.workflow import WorkflowTarget
from backstream.actors.workflow_run import WorkflowRun
from backstream.protocol.chat_stream import (
    ModelOutput,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallDone,
)
from backstream.protocol.continuation import Continuation
from backstream.protocol.conversation import (
    DECLINED_OUTPUT,
    INTERRUPTED_CALL_OUTPUT,
    Conversation,
    assistant_message,
    conversation_from_log,
    tool_message,
)
from backstream.protocol.events import AWAITING_APPROVAL, RUNNING, ErrorInfo, JobStatus, JobSummary
from backstream.protocol.job_params import TOOL_CALL_LIMIT_OUTPUT, ToolCallBudget
from backstream.protocol.lifecycle import LogState
from backstream.protocol.records import PREVIEW_CHARS, JobProgress, JobRecord, job_summary

__all__ = ["JobActor"]

log = logging.getLogger("backstream.job")

T = TypeVar("T")
Message = dict[str, Any]  # an OpenAI chat message


class JobActor:
    """Start with ``await supervisor.start_child(...)`` running ``actor.run``.

    ``log``: a log rebuilt from the job's stored entries (``JobLog.from_entries``) to
    continue from instead of an empty one; its entries are durable already, and
    ``record.usage`` is taken as the usage of the turns before it (the log records a job's
    usage only at its end). Raises ``ValueError`` for a log that has ended, or that stops
    in the middle of a model turn (continuing that needs a choice: prefill, restart, or end).
    """

    def __init__(
        self,
        record: JobRecord,
        *,
        config: Config,
        store: JobWriter,
        model: Model,
        clock: WallClock,
        tools: Tools,
        notifier: Notifier | None = None,
        log: JobLog | None = None,
        continuation: Continuation = Continuation.INTERRUPT,
        job_timeout: float | None = None,
        leave_running_on_stop: bool = False,
        taken_over: bool = False,
    ) -> None:
        self.record = record
        continuing = log is not None
        if log is not None:
            check_continuable(record, log, continuation)
        else:
            log = JobLog(record.job_id, record.epoch, max_output_chars=config.max_output_chars)
        self.log = log
        self.continuation = TurnContinuation(continuation, log)
        self._job_timeout = config.job_timeout if job_timeout is None else job_timeout
        self._leave_running_on_stop = leave_running_on_stop
        self._taken_over = taken_over  # calls without a result may have been running
        self.left_running = False
        """Set once a stop left the job running in the store, for another owner."""
        """The runtime stopped and left the job running in the store (durable up to its last
        write) for the next owner to continue, instead of ending it ``interrupted``."""
        self.finished = trio.Event()
        self._config = config
        self._store = store
        self._model = model
        self._clock = clock
        # Created now so that an abort that comes before the job runs still counts.
        self._abort_scope = trio.CancelScope()
        self._stop: tuple[JobStatus, ErrorInfo | None] | None = None
        self._finished_at: float | None = None
        self._writes = JobWrites(
            record.job_id,
            log,
            store=store,
            config=config,
            clock=clock,
            progress=self._progress,
            ended_elsewhere=lambda: self._stop_with("interrupted", None),
            give_up=lambda: self._stop_with("failed", STORE_FAILED),
        )
        self._updated_at = record.updated_at if continuing else record.created_at
        self._usage = add_usage(None, record.usage) if continuing else None
        self._tools = tools
        self._notifier = notifier
        self._deadline: trio.CancelScope | None = None
        self._turn_text: list[str] = []
        self._pending: dict[str, _PendingApproval] = {}

    @property
    def leaves_running_on_stop(self) -> bool:
        """Whether a stop leaves the job running in the store for another owner (a store
        that outlives the process, a model that continues) rather than ending it."""
        return self._leave_running_on_stop

    @property
    def job_id(self) -> str:
        return self.record.job_id

    def abort(self) -> None:
        """Stop the job now: it ends ``aborted``, content kept. No effect once it has ended."""
        self._stop_with("aborted", None)

    def _stop_with(self, status: JobStatus, error: ErrorInfo | None) -> None:
        if self.log.terminal is None and self._stop is None:
            self._stop = (status, error)
            self._abort_scope.cancel()

    def snapshot(self) -> JobRecord:
        """The live job as a record (ahead of the store by at most one flush)."""
        return self.record.advanced(self._progress(self.log.last_seq))

    def summary(self, watchers: int) -> JobSummary:
        """The live job's wire summary, built as a stored job's is."""
        return job_summary(self.snapshot(), watchers)

    # -- the actor ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the job to its end. Cancellation (runtime shutdown) ends it ``interrupted``
        and re-raises; the last write to the store is shielded and bounded.

        With ``leave_running_on_stop`` (a store that outlives the process, a model that
        continues), that cancellation writes what is new and leaves the job running in the
        store instead: the next owner continues it (``ContinueOrphans``).

        The actor is the only writer of its job's terminal record: if even the final
        write fails (a crash outside its own guards), it records ``failed``/``internal``
        at the last durable seq, so the store never keeps a dead job ``running``. The
        terminal commit carries its effects (the outbox entry of its notification)."""
        log_job_started(self.record, continued=self._writes.flushed_seq > 0)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writes.loop)
                nursery.start_soon(self._listen_for_abort)
                task_status.started()
                try:
                    with self._expecting_end() as delivered:
                        await self._run_to_end()
                        await self._writes.write_end()
                        await self._notify_end(delivered)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True) as cleanup:
                cleanup.deadline = trio.current_time() + self._config.finalize_timeout
                leave = self._leave_running_on_stop and self.log.terminal is None and self._stop is None
                if self.log.terminal is None and not leave:
                    self._close("interrupted", None)
                try:
                    await self._writes.flush()
                    self.left_running = leave
                except Exception:
                    log.exception("job %s: the final write to the store failed", self.job_id)
                if not self._writes.closed_in_store and not self.left_running:
                    await self._writes.record_crash()
            if self.log.terminal is not None:
                log_job_ended(
                    self.record,
                    self.log.terminal,
                    ended_at=self._finished_at or self._clock.now(),
                    output_chars=self.log.content_length,
                )
            self.finished.set()

    @contextmanager
    def _expecting_end(self) -> Iterator[trio.Event | None]:
        if self._notifier is None:
            yield None
        else:
            with self._notifier.expecting_end(self.job_id) as delivered:
                yield delivered

    async def _notify_end(self, delivered: trio.Event | None) -> None:
        """Wait until the dispatcher has carried out the outbox entry of the job's end (its
        notification), so that it exists once the job has finished; at most
        ``finalize_timeout`` (the entry is durable: a late one is carried out all the same).
        A job ended elsewhere (fenced off: ``_stop_with("interrupted")``) has no entry of
        its own to wait for."""
        terminal = self.log.terminal
        if delivered is None or terminal is None or not self._writes.closed_in_store:
            return
        if self._stop == ("interrupted", None) or not Notifier.notifies_end(terminal.status):
            return
        with trio.move_on_after(self._config.finalize_timeout):
            await delivered.wait()

    async def _run_to_end(self) -> None:
        if self.log.state is LogState.NOT_STARTED:
            self.log.append_status(RUNNING)
        status: JobStatus = "failed"
        error: ErrorInfo | None = None
        finish_reason: str | None = None
        with self._abort_scope:
            with trio.move_on_after(self._job_timeout) as deadline:
                self._deadline = deadline
                try:
                    result = await self._work()
                except OutputLimitExceeded:
                    error = ErrorInfo(
                        "output_limit", f"the job reached max_output_chars ({self._config.max_output_chars})"
                    )
                except ModelFailure as exc:
                    error = exc.error
                except Exception:
                    log.exception("job %s crashed", self.job_id)
                    error = ErrorInfo("internal", "the job failed on an internal error")
                else:
                    status, finish_reason = "completed", result.finish_reason
            if deadline.cancelled_caught:
                status = "failed"
                error = ErrorInfo("timeout", f"the job outlived job_timeout ({self._config.job_timeout:g} s)")
        if self._abort_scope.cancelled_caught and self._stop is not None:
            status, error = self._stop
            finish_reason = None
        self._close(status, error, finish_reason)

    async def _work(self) -> TurnResult:
        """The job's work: a workflow's steps (``workflow_run.py``), or the conversation."""
        if isinstance(self._model, WorkflowTarget):
            run = WorkflowRun(self, self._model, config=self._config, clock=self._clock, tools=self._tools)
            return await run.run()
        return await self._converse()

    async def _converse(self) -> TurnResult:
        """Model, tools, model, ...: until a turn ends without tool calls, or ``max_turns``.
        It starts where the log is: a turn whose calls are not all answered is finished
        first, and the turns the log shows count toward ``max_turns``."""
        request = self.record.request
        enabled = {name: self._tools.get(name) for name in request.tools}
        client = ClientTools.of(request.params)
        specs = (*(t.openai_spec() for t in enabled.values() if t is not None), *client.specs)
        entries = self.log.entries()
        so_far = conversation_from_log(request, entries)
        messages = list(so_far.messages)
        turns = so_far.turns
        budget = ToolCallBudget.from_log(request.params, entries, open_calls=len(so_far.calls))
        if so_far.calls:
            messages += await self._finish_turn(client.server_side(so_far), enabled, budget)
            if client.calls_left(so_far.calls):
                return client.ended_for_client(None)
        elif self.log.state is LogState.MODEL_TURN:
            turns -= 1  # the turn cut short runs again below, and counts then
        prefill = self.continuation.begin(so_far)
        while turns < self._config.max_turns:
            turns += 1
            self._turn_text = [prefill] if prefill else []
            params = budget.model_params(request.params, has_tools=bool(specs))
            turn = ChatTurn(
                model=request.model, messages=tuple(messages), params=params, tools=specs, prefill=prefill
            )
            result = await self._model.run_turn(turn, self._on_output)
            if prefill:
                self.continuation.settle(self._append_text, self._restarted)
                prefill = None
            self._usage = add_usage(self._usage, result.usage)
            if not result.tool_calls:
                return result
            calls = [(c.call_id, c.name, c.arguments) for c in result.tool_calls]
            messages.append(assistant_message("".join(self._turn_text), calls))
            server_calls, client_calls = client.split(result.tool_calls)
            messages += await self._run_calls(server_calls, enabled, budget)
            if client_calls:  # the client runs these: the job ends, its calls open
                return client.ended_for_client(result)
        raise ModelFailure(
            ErrorInfo("tool_loop_limit", f"the model still called tools after {self._config.max_turns} turns")
        )

    async def _finish_turn(
        self, so_far: Conversation, enabled: dict[str, ToolSpec | None], budget: ToolCallBudget
    ) -> list[Message]:
        """Finish the turn a rebuilt log left with calls unanswered: results logged stand,
        decisions logged stand, a wait for approval goes on; the rest run as usual."""
        if self.log.state is LogState.APPROVAL_REQUESTED:
            self.log.append_status(AWAITING_APPROVAL)
        elif self.log.state is LogState.APPROVAL_DECIDED:
            self.log.append_status(RUNNING)
        calls = tuple(
            ToolCallDone(index=i, call_id=c.call_id, name=c.name, arguments=c.arguments)
            for i, c in enumerate(so_far.calls)
        )
        triples = [(c.call_id, c.name, c.arguments) for c in so_far.calls]
        ran = await self._run_calls(calls, enabled, budget, so_far)
        return [assistant_message(so_far.turn_text, triples), *ran]

    async def _run_calls(
        self,
        calls: tuple[ToolCallDone, ...],
        enabled: dict[str, ToolSpec | None],
        budget: ToolCallBudget,
        so_far: Conversation | None = None,
    ) -> list[Message]:
        """Run one turn's calls: approvals first, one at a time, then the rest concurrently
        (at most ``max_parallel_tools``); calls past the ``budget`` (``max_tool_calls``) do
        not run. Results go into the log in the calls' order; the tool messages returned
        hold them as logged. ``so_far``: what a rebuilt log knows of these calls already."""
        known = so_far.calls if so_far is not None else ()
        logged = sum(1 for c in known if c.output is not None)  # results come in order
        outcomes = await self._decide_calls(calls, enabled, so_far, budget.take(len(calls)))
        limiter = trio.CapacityLimiter(self._config.max_parallel_tools)

        async def run_one(i: int, call: ToolCallDone, item: ToolSpec) -> None:
            async with limiter:
                outcome = await self._tools.run(item.name, call.arguments)
            if len(outcome.output) > item.max_output_chars:  # a Tools port that did not cut it
                cut = outcome.output[: item.max_output_chars]
                outcome = ToolOutcome(
                    f"{cut}\n[output cut at {item.max_output_chars} characters]", outcome.is_error
                )
            outcomes[i] = outcome

        async with trio.open_nursery() as nursery:
            for i, call in enumerate(calls):
                item = enabled.get(call.name)
                if outcomes[i] is None and item is not None:
                    nursery.start_soon(run_one, i, call, item)
        done = [o if o is not None else ToolOutcome("the tool did not run", True) for o in outcomes]
        messages = [tool_message(c.call_id, c.output or "") for c in known[:logged]]
        for call, outcome in list(zip(calls, done, strict=True))[logged:]:
            entry = self.log.append_tool_result(call.call_id, call.name, outcome.output, outcome.is_error)
            messages.append(tool_message(call.call_id, entry.output))
        self._updated_at = self._clock.now()
        return messages

    async def _decide_calls(
        self,
        calls: tuple[ToolCallDone, ...],
        enabled: dict[str, ToolSpec | None],
        so_far: Conversation | None,
        allowed: int,
    ) -> list[ToolOutcome | None]:
        """The outcomes known before anything runs: results a rebuilt log holds, calls past
        the first ``allowed`` (``max_tool_calls``), tools that are not enabled, calls a person
        declined (asked here one at a time, in order)."""
        known = so_far.calls if so_far is not None else ()
        asked = so_far.pending_approvals if so_far is not None else ()
        maybe_ran = self._taken_over and so_far is not None and calls_may_have_run(so_far, enabled)
        outcomes: list[ToolOutcome | None] = [None] * len(calls)
        for i, call in enumerate(calls):
            earlier = known[i] if i < len(known) else None
            found = enabled.get(call.name)
            if earlier is not None and earlier.output is not None:
                outcomes[i] = ToolOutcome(earlier.output, bool(earlier.is_error))
                continue
            rerun = found is None or found.idempotent or earlier is None or earlier.approved is False
            if maybe_ran and not rerun:  # perhaps running when its instance died: not twice
                outcomes[i] = ToolOutcome(INTERRUPTED_CALL_OUTPUT, True)
                continue
            if i >= allowed:
                outcomes[i] = ToolOutcome(TOOL_CALL_LIMIT_OUTPUT, True)
                continue
            # A wait the log shows goes on even if the tool has gone since: the log says so.
            if call.call_id in asked or (found is not None and found.requires_approval):
                approved = earlier.approved if earlier is not None else None
                if approved is None:
                    approved = await self._await_approval(call, asked=call.call_id in asked)
                if not approved:
                    outcomes[i] = ToolOutcome(DECLINED_OUTPUT, True)
                    continue
            if found is None:
                why = "is not enabled for this job" if self._tools.get(call.name) else "does not exist"
                outcomes[i] = ToolOutcome(f"tool {call.name!r} {why}", True)
        return outcomes

    async def _ask_approval(self, call: ToolCallDone) -> None:
        """Log that ``call`` waits for a person, write it, and tell the person."""
        self.log.append_approval_required(call.call_id, call.name, call.arguments)
        self.log.append_status(AWAITING_APPROVAL)
        self._updated_at = self._clock.now()
        try:
            await self._writes.flush()  # other instances see the wait before anyone is told of it
        except Exception as exc:
            log.warning("job %s: could not write the approval wait yet (%s)", self.job_id, exc)
            self._writes.request()  # the flusher retries it
        if self._notifier is not None:
            await self._notifier.approval_needed(
                job_id=self.job_id,
                user=self.record.user,
                thread_id=self.record.thread_id,
                tool=call.name,
                call_id=call.call_id,
            )

    async def _await_approval(self, call: ToolCallDone, *, asked: bool = False) -> bool:
        """Wait for a person's decision; ``approval_timeout`` counts as declined. The job
        timeout does not count the wait, and no upstream connection is held meanwhile.
        ``asked``: the log shows the wait already (a rebuilt log): it is not logged again,
        but its webhook event is recorded (again: once per call), in case the process
        that logged it died first."""
        pending = self._pending[call.call_id] = _PendingApproval()
        if not asked:
            await self._ask_approval(call)
        elif self._notifier is not None:
            record = self.record
            await self._notifier.approval_webhook(
                job_id=self.job_id,
                user=record.user,
                thread_id=record.thread_id,
                tool=call.name,
                call_id=call.call_id,
            )
        started = trio.current_time()
        paused_deadline = math.inf
        if self._deadline is not None:  # the job timeout does not run while a person decides
            paused_deadline, self._deadline.deadline = self._deadline.deadline, math.inf
        try:
            async with trio.open_nursery() as nursery:

                async def from_store() -> None:  # a decision made through another instance
                    approved = await self._retrying(
                        "waiting for a decision", lambda: self._store.wait_decision(self.job_id, call.call_id)
                    )
                    pending.resolve(approved)

                nursery.start_soon(from_store)
                with trio.move_on_after(self._config.approval_timeout):
                    await pending.decided.wait()
                nursery.cancel_scope.cancel()
        finally:
            del self._pending[call.call_id]
            if self._deadline is not None:
                self._deadline.deadline = paused_deadline + (trio.current_time() - started)
        approved = bool(pending.approved)
        self.log.append_approval(call.call_id, approved)
        self.log.append_status(RUNNING)
        self._updated_at = self._clock.now()
        pending.applied.set()
        return approved

    def decide(self, call_id: str, approved: bool) -> _PendingApproval | None:
        """Record a decision on a call waiting for approval; None if no such call waits."""
        pending = self._pending.get(call_id)
        if pending is None or pending.decided.is_set():
            return None
        pending.resolve(approved)
        return pending

    # -- what a workflow's steps use (``StepHost``) ---------------------------------------

    def touch(self) -> None:
        self._updated_at = self._clock.now()

    def appended(self) -> None:
        self._writes.appended()

    def add_usage(self, usage: dict[str, Any] | None) -> None:
        self._usage = add_usage(self._usage, usage)

    async def write_through(self) -> None:
        if not await self._writes.write_through():
            raise ModelFailure(STORE_FAILED)

    async def ask_person(self, call_id: str, name: str, arguments: str, *, asked: bool) -> bool:
        call = ToolCallDone(index=0, call_id=call_id, name=name, arguments=arguments)
        return await self._await_approval(call, asked=asked)

    def _append_text(self, text: str) -> None:
        self.log.append_text(text)
        self._turn_text.append(text)

    def _restarted(self) -> None:
        self._turn_text = []  # the prefill was withdrawn: the reply is a new answer

    def _on_output(self, out: ModelOutput) -> None:
        # Called synchronously per token: keep it to appends.
        kind = type(out)
        joining = self.continuation.joining  # a prefilled turn's reply, not yet joined
        if joining and kind is not TextDelta:
            self.continuation.settle(self._append_text, self._restarted)
        if kind is TextDelta:
            if joining:
                self.continuation.text(out.text, self._append_text, self._restarted)  # type: ignore[union-attr]
            else:
                self._append_text(out.text)  # type: ignore[union-attr]
        elif kind is ReasoningDelta:
            self.log.append_reasoning(out.text)  # type: ignore[union-attr]
        elif kind is ToolCallDone:
            self.log.append_tool_call(out.call_id, out.name, out.arguments)  # type: ignore[union-attr]
        elif kind is ToolCallDelta:
            self.log.append_tool_call_delta(out.call_id, out.name, out.arguments_delta)  # type: ignore[union-attr]
        else:
            return
        self._updated_at = self._clock.now()
        self._writes.appended()

    @property
    def has_unflushed(self) -> bool:
        return self._writes.has_unflushed

    def request_flush(self) -> None:
        """Ask the flusher to write what is new (the registry's ticker calls this)."""
        self._writes.request()

    def _close(self, status: JobStatus, error: ErrorInfo | None, finish_reason: str | None = None) -> None:
        self._updated_at = self._finished_at = self._clock.now()
        self.log.append_status(status, error=error, finish_reason=finish_reason, usage=self._usage)

    # -- writes to the store (``JobWrites``) --------------------------------------------

    def _progress(self, seq: int) -> JobProgress:
        terminal = self.log.terminal
        finished_at = self._finished_at if terminal else None
        return JobProgress(
            status=self.log.status,
            seq=seq,
            content_length=self.log.content_length,
            updated_at=self._updated_at,
            finished_at=finished_at,
            error=terminal.error if terminal else None,
            usage=terminal.usage if terminal else None,
            expires_at=None if finished_at is None else finished_at + self._config.retention,
            preview=self.log.content()[:PREVIEW_CHARS] if terminal else None,
        )

    async def _listen_for_abort(self) -> None:
        await self._retrying("waiting for an abort", lambda: self._store.wait_abort_requested(self.job_id))
        self.abort()

    async def _retrying(self, what: str, wait: Callable[[], Awaitable[T]]) -> T:
        """A store wait, asked again (with backoff) if the store says it is unavailable: an
        outage is never taken for the thing waited for, nor crashes the job."""
        return await through_outage(f"job {self.job_id}: {what}", wait, level=logging.WARNING)


class _PendingApproval:
    """A tool call waiting for a person: ``decided`` when a decision arrives, ``applied``
    once the job has logged it."""

    def __init__(self) -> None:
        self.decided = trio.Event()
        self.applied = trio.Event()
        self.approved: bool | None = None

    def resolve(self, approved: bool) -> None:
        if not self.decided.is_set():
            self.approved = approved
            self.decided.set()
