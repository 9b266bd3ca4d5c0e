"""The runtime: what a program embeds, and what the front door serves.

async with backstream.open_runtime(backstream.Config()) as rt:
    started = await rt.start_job(user=..., thread_id=..., message_id=..., model=..., messages=[...])
    async with rt.watch(started.job_id, user=..., after_seq=0) as batches:
        async for batch in batches:
            ...
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from typing import Any

import attrs
import trio

from backstream.actors.clock import WallClock
from backstream.actors.config import Config
from backstream.actors.dispatcher import Dispatcher, DispatcherStatistics
from backstream.actors.job import JobActor
from backstream.actors.joblog import summarize_events
from backstream.actors.keeper import Keeper, KeeperStatistics
from backstream.actors.metronome import Metronome
from backstream.actors.notifier import NotificationSink, Notifier
from backstream.actors.ports import Model, Store
from backstream.actors.presence import WatchPresence
from backstream.actors.registry import Registry, RegistryStatistics, StartRequest
from backstream.actors.remote_tail import RemoteTails, RemoteTailsStatistics
from backstream.actors.seats import HeldSeats
from backstream.actors.supervisor import Supervisor, SupervisorStatistics
from backstream.actors.watcher import Watcher
from backstream.actors.webhooks import WebhookDeliverer
from backstream.protocol.errors import (
    BadRequestError,
    ConflictError,
    GoneError,
    NotFoundError,
    UnavailableError,
)
from backstream.protocol.events import JobInfo, JobSummary, LogEvent
from backstream.protocol.offsets import stale_epoch_error
from backstream.protocol.records import JobRecord, JobRequest, NotificationRecord
from backstream.protocol.workflow import workflow_name_of
from backstream.runtime.handle import AbortResult, JobHandle, JobHandles
from backstream.runtime.models.http1 import HTTP1Pool, PoolStatistics
from backstream.runtime.models.router import ModelRouter
from backstream.runtime.models.upstream import UpstreamStatistics
from backstream.runtime.tools.registry import ToolRegistry
from backstream.runtime.validation import check_identifier, check_messages, check_params, workflow_input_of

__all__ = ["AbortResult", "Runtime", "RuntimeStatistics", "StartedJob"]

log = logging.getLogger("backstream.runtime")

MAX_LIST_LIMIT = 200


@attrs.frozen
class StartedJob:
    """What ``start_job`` returns: the job, and whether the ``message_id`` was already used."""

    job: JobSummary
    existing: bool

    @property
    def job_id(self) -> str:
        return self.job.job_id


@attrs.frozen
class RuntimeStatistics:
    jobs: RegistryStatistics
    job_tasks: SupervisorStatistics
    keeper: KeeperStatistics
    dispatcher: DispatcherStatistics
    watchers: int
    jobs_watched: int
    upstream_pool: PoolStatistics | None
    """The upstream's connections, or None without an upstream."""
    remote_tails: RemoteTailsStatistics
    """The jobs of other instances watched here, each read once for all its watchers."""


class Runtime:
    """Use through ``open_runtime``. Every method checks that the job belongs to ``user``:
    another user's job raises the same ``NotFoundError`` as a job that does not exist."""

    def __init__(
        self,
        config: Config,
        store: Store,
        clock: WallClock,
        registry: Registry,
        job_supervisor: Supervisor[JobActor],
        keeper: Keeper,
        presence: WatchPresence,
        router: ModelRouter,
        tools: ToolRegistry,
        notifier: Notifier,
        *,
        instance_id: str,
        metronome: Metronome | None = None,
        dispatcher: Dispatcher,
        upstream_pool: HTTP1Pool | None = None,
        seats: HeldSeats | None = None,
    ) -> None:
        self.config = config
        self.tools = tools
        self.notifier = notifier
        self.instance_id = instance_id
        """This runtime's identity among the instances that share a store."""
        self._presence = presence
        self._router = router
        self._store = store
        self._clock = clock
        self._registry = registry
        self._job_supervisor = job_supervisor
        self._keeper = keeper
        self._metronome = metronome or Metronome()
        self._dispatcher = dispatcher
        self._upstream_pool = upstream_pool
        self.seats = seats or HeldSeats(
            store, lease=config.lease_ttl, release_timeout=config.finalize_timeout
        )
        """Per-user seats counted across instances (the front doors' caps on open streams and
        connections); the keeper renews them."""
        self.webhook_deliverer: WebhookDeliverer | None = None
        """Sends webhook events (None without endpoints); ``statistics()`` for metrics."""
        self._tails = RemoteTails(store)
        self._handles = JobHandles(
            store, registry.live, presence.count, remote_wait=config.remote_abort_wait, tails=self._tails
        )

    @property
    def store(self) -> Store:
        """The store this runtime keeps its jobs in."""
        return self._store

    # -- jobs ------------------------------------------------------------------------

    async def start_job(
        self,
        *,
        user: str,
        thread_id: str,
        message_id: str,
        model: str,
        messages: Sequence[dict[str, Any]],
        params: dict[str, Any] | None = None,
        tools: Sequence[str] | None = None,
        annotations: dict[str, Any] | None = None,
        workflow_input: dict[str, Any] | None = None,
    ) -> StartedJob:
        """Start a job, or return the user's job already started with ``message_id``.

        A ``model`` named ``workflow/<name>`` runs that workflow (docs/workflows.md) with
        ``workflow_input`` (by default ``{"ask": <the last user message's text>, "messages":
        messages}``); its messages may be empty.

        ``annotations`` are kept with the job's request and given back as they were (JSON
        values; the caller bounds their size); the model never sees them.
        Messages with no ``system`` or ``developer`` message get the operator's system prompt
        for ``model`` first (``Config.system_prompts``), in the request the job keeps.

        Raises ``BadRequestError`` for a bad request, ``CapacityError`` at a limit
        (with ``retry_after_ms``), ``QuotaExceededError`` when the user's retained jobs
        hold ``max_stored_bytes_per_user`` already (this request's bytes included),
        ``UnavailableError`` while shutting down.
        Cancellation: the job may still have started (it runs on without its caller);
        a retry with the same ``message_id`` returns it with ``existing=True``.
        """
        check_identifier("user", user)
        check_identifier("thread_id", thread_id)
        check_identifier("message_id", message_id)
        check_identifier("model", model)
        checked_params = check_params(params, builtin=self._router.is_local(model))
        annotations = dict(annotations or {})
        if workflow_name_of(model) is not None:
            checked = check_messages(messages) if messages else ()
            annotations["workflow_input"] = workflow_input_of(workflow_input, checked)
        else:
            # Stored with the job, so a continuation and the job's log see the same conversation.
            checked = self._router.with_system_prompt(model, check_messages(messages))
        request = JobRequest(
            model=model,
            messages=checked,
            params=checked_params,
            tools=self._check_tools(tools),
            annotations=annotations,
        )
        model_to_run = self._router.resolve(request)  # an unknown model never reaches admission
        record, existing = await self._registry.start_job(
            StartRequest(
                user=user,
                thread_id=thread_id,
                message_id=message_id,
                request=request,
                model=model_to_run,
                continuation=self._router.continuation(model),
            )
        )
        if existing:
            found = await self._lookup(record.job_id, user)
            return StartedJob(job=found.summary(), existing=True)
        return StartedJob(job=self._handles.of(record).summary(), existing=False)

    def _check_tools(self, tools: Sequence[str] | None) -> tuple[str, ...]:
        if not tools:
            return ()
        if isinstance(tools, str) or not all(isinstance(t, str) for t in tools):
            raise BadRequestError("tools must be a list of tool names")
        unknown = [name for name in tools if self.tools.get(name) is None]
        if unknown:
            known = ", ".join(self.tools.names()) or "none"
            raise BadRequestError(f"unknown tool: {unknown[0]!r} (registered: {known})")
        return tuple(dict.fromkeys(tools))

    async def approve(self, job_id: str, call_id: str, approved: bool, *, user: str) -> JobSummary:
        """Decide on a tool call waiting for approval and wait until the job has logged it.
        Raises ``ConflictError`` when that call is not waiting, ``NotFoundError`` for another
        user's job. Cancellation: the decision, once handed to the job (or the store), stands;
        only the wait for it to be logged is abandoned."""
        found = await self._lookup(job_id, user)
        return await found.approve(call_id, approved)

    def model_allowed(self, model: str) -> bool:
        """Whether ``config.allowed_models`` lets a job name ``model`` (see ``ModelRouter``)."""
        return self._router.model_allowed(model)

    def allowed_models(self) -> list[str]:
        """What a client may name, as glob patterns (see ``ModelRouter``)."""
        return self._router.allowed_models()

    def resolve_model(self, request: JobRequest) -> Model:
        """The model that serves ``request``: one given to ``open_runtime``, a built-in,
        or the upstream. Raises ``BadRequestError``, also for a model that
        ``config.allowed_models`` does not allow."""
        return self._router.resolve(request)

    @asynccontextmanager
    async def watch(
        self,
        job_id: str,
        *,
        user: str,
        after_seq: int = 0,
        epoch: int | None = None,
        max_batch_chars: int | None = None,
        tool_call_deltas: bool = True,
        merge_text: bool = True,
    ) -> AsyncIterator[Watcher]:
        """Watch a job from ``after_seq``: an async iterator of batches that ends after the
        terminal status. ``tool_call_deltas=False`` leaves out the ``tool_call_delta``
        entries (as the wire protocol does for watches that do not ask for them). With
        ``merge_text=False`` every log entry comes as stored (one text event per ``seq``), so
        what a batch holds does not depend on how reads were grouped.

        Raises ``NotFoundError``; ``GoneError`` when ``epoch`` differs from the log's;
        ``BadRequestError`` for a cursor beyond the end of a finished job.
        Cancellation: the watch closes and its presence is withdrawn (a shielded, bounded
        write); the job goes on.
        """
        watcher, finished = await self._open_watcher(
            job_id,
            user,
            after_seq,
            epoch,
            max_batch_chars=max_batch_chars,
            tool_call_deltas=tool_call_deltas,
            merge_text=merge_text,
        )
        try:
            await self._presence.open(job_id, self._clock.now() + self.config.lease_ttl)
        except BaseException:
            watcher.close()
            raise
        try:
            yield watcher
        finally:
            watcher.close()
            with trio.CancelScope(shield=True) as cleanup:
                cleanup.deadline = trio.current_time() + self.config.finalize_timeout
                try:
                    # A watch that delivered the end counts as watching when the job ended.
                    await self._presence.close(job_id, saw_end=watcher.ended and not finished)
                except Exception:
                    log.warning("job %s: could not record the end of a watch", job_id)

    async def _open_watcher(
        self,
        job_id: str,
        user: str,
        after_seq: int,
        epoch: int | None,
        *,
        max_batch_chars: int | None,
        tool_call_deltas: bool,
        merge_text: bool,
    ) -> tuple[Watcher, bool]:
        """A watcher over the job's live log or its stored one, and whether the job had ended."""
        if isinstance(after_seq, bool) or not isinstance(after_seq, int) or after_seq < 0:
            raise BadRequestError("after_seq must be a non-negative integer")
        view = (await self._lookup(job_id, user)).log_view()
        current_epoch, last_seq, finished = view.epoch, view.last_seq, view.finished
        kept_through = None
        if epoch is not None and epoch != current_epoch:
            kept_through = view.record.kept_through(epoch)
            if kept_through is None or after_seq > kept_through:
                view.source.close()
                raise await self._stale_epoch(job_id, user, current_epoch, kept_through)
        # A cursor ahead of a running job waits for the log to reach it (another instance
        # may lag by one flush); if the job ends first, the watch ends with bad_request; if
        # it is taken over first, the source checks the cursor against what was kept.
        if finished and after_seq > last_seq:
            view.source.close()
            raise BadRequestError(f"after_seq {after_seq} is beyond the job's last seq {last_seq}")
        watcher = Watcher(
            job_id,
            current_epoch,
            view.source,
            after_seq=after_seq,
            batch_seconds=self.config.batch_seconds,
            max_batch_events=self.config.max_batch_events,
            max_batch_chars=min(self.config.max_batch_chars, max_batch_chars or self.config.max_batch_chars),
            ended=finished and after_seq == last_seq,
            tool_call_deltas=tool_call_deltas,
            merge_text=merge_text,
            sleep_until=self._metronome.sleep_until,
            kept_through=kept_through,
        )
        return watcher, finished

    async def _stale_epoch(self, job_id: str, user: str, epoch: int, kept_through: int | None) -> GoneError:
        """``gone`` for a cursor of an earlier epoch past what the log kept of it, with the
        content's length at the last ``seq`` that stands (so a reader can cut its text)."""
        if kept_through is None:
            return stale_epoch_error(epoch, None)
        _, entries = await (await self._lookup(job_id, user)).log()
        content, _ = summarize_events(ev for ev in entries if ev.seq <= kept_through)
        return stale_epoch_error(epoch, kept_through, content_length=len(content))

    async def get_job(
        self, job_id: str, *, user: str, include_content: bool = False, offset: int = 0
    ) -> JobInfo:
        """The job's summary; with ``include_content``, its text from character ``offset``
        and its tool calls.

        Cancellation: safe; nothing changes.
        """
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise BadRequestError("offset must be a non-negative integer")
        # The live actor first: a record read before the job ended would be stale once its
        # actor is gone; a record read after the actor left is final (it leaves after its
        # last write).
        found = await self._lookup(job_id, user)
        return await found.info(include_content=include_content, offset=offset)

    async def job_log(self, job_id: str, *, user: str) -> tuple[JobRecord, tuple[LogEvent, ...]]:
        """The job's record and every entry of its log so far, as stored (no text merged).

        The record's summary fields may lag the entries of a job running here; read
        ``get_job`` for the freshest summary. Raises ``NotFoundError``.

        Cancellation: nothing changes; call again."""
        return await (await self._lookup(job_id, user)).log()

    async def abort(self, job_id: str, *, user: str) -> AbortResult:
        """Abort a running job: its upstream request and tools stop at once, it ends
        ``aborted`` with its content kept. ``aborted`` is False if it had already ended.
        Cancellation: the abort, once requested, still happens; only the wait for the job's
        end is abandoned."""
        return await (await self._lookup(job_id, user)).abort()

    async def delete_job(self, job_id: str, *, user: str) -> None:
        """Delete the user's job now, with its log (a running one is aborted first, and
        deleted once it has ended). Raises ``NotFoundError``. Cancellation: the job may or
        may not be deleted (aborted, if it was running); deleting again is safe."""
        found = await self._lookup(job_id, user)
        await found.abort()
        if not await self._store.delete_job(job_id):
            # Gone meanwhile (another delete, or the sweep), or still running elsewhere
            # past remote_abort_wait: either way nothing more to do here but say so.
            if await self._store.get_job(job_id) is not None:
                raise ConflictError("the job is still ending on another instance; delete it again shortly")
            raise NotFoundError()

    async def list_jobs(
        self,
        *,
        user: str,
        thread_id: str | None = None,
        statuses: Sequence[str] | None = None,
        limit: int = 50,
    ) -> list[JobSummary]:
        """The user's jobs, newest first.

        Cancellation: safe; nothing changes.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise BadRequestError(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}")
        wanted = frozenset(statuses) if statuses is not None else None
        records = await self.store.list_jobs(user, thread_id=thread_id, statuses=wanted, limit=limit)
        return [self._handles.of(record).summary() for record in records]

    def statistics(self) -> RuntimeStatistics:
        presence = self._presence.statistics()
        return RuntimeStatistics(
            jobs=self._registry.statistics(),
            job_tasks=self._job_supervisor.statistics(),
            keeper=self._keeper.statistics(),
            dispatcher=self._dispatcher.statistics(),
            watchers=presence.watches,
            jobs_watched=presence.jobs_watched,
            upstream_pool=self._upstream_pool.statistics() if self._upstream_pool is not None else None,
            remote_tails=self._tails.statistics(),
        )

    def upstream_statistics(self) -> UpstreamStatistics | None:
        """The upstream client's counters, or None without an upstream."""
        upstream = self._router.upstream
        return upstream.statistics() if upstream is not None else None

    def stop_accepting(self) -> None:
        """Refuse new jobs from now on (``UnavailableError``); running jobs go on."""
        self._registry.stop_accepting()

    # -- notifications -----------------------------------------------------------------------

    async def notifications_list(
        self, *, user: str, unread_only: bool = False, limit: int = 50
    ) -> tuple[list[NotificationRecord], int]:
        """The user's notifications, newest first, and how many are unread.

        Cancellation: safe; nothing changes.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise BadRequestError(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}")
        return await self.store.list_notifications(user, unread_only=unread_only, limit=limit)

    async def notifications_read(
        self, *, user: str, ids: Sequence[str] = (), everything: bool = False
    ) -> int:
        """Mark notifications read; return how many stay unread.

        Cancellation: the marks may or may not have been written.
        """
        return await self.store.mark_notifications_read(user, ids, everything=everything)

    async def mute_thread(self, *, user: str, thread_id: str, muted: bool = True) -> None:
        """No notifications for this thread of the user's while muted.

        Cancellation: the change may or may not have been written.
        """
        check_identifier("thread_id", thread_id)
        await self.store.set_thread_muted(user, thread_id, muted)

    def subscribe_notifications(
        self, user: str
    ) -> AbstractContextManager[trio.MemoryReceiveChannel[NotificationRecord]]:
        """New notifications of ``user``, created on any instance, while the block runs."""
        return self.notifier.subscribe(user)

    def follow_notifications(self, user: str, sink: NotificationSink) -> AbstractContextManager[None]:
        """Hand new notifications of ``user``, created on any instance, to ``sink`` as they
        come while the block runs (``Notifier.follow``: no channel, no task)."""
        return self.notifier.follow(user, sink)

    async def wait_idle(self) -> None:
        """Wait until no job runs in this runtime (each has written its end to the store).
        Cancellation: safe."""
        await self._job_supervisor.wait_idle()

    def watcher_count(self, job_id: str) -> int:
        return self._presence.count(job_id)

    # -- internals ---------------------------------------------------------------------

    async def _lookup(self, job_id: str, user: str) -> JobHandle:
        """The user's job, once per call: its live actor's handle if it runs here, else its
        record's. Another user's job answers exactly as a missing one (see
        ``JobHandles.lookup``)."""
        return await self._handles.lookup(job_id, user)

    async def _drain(self) -> None:
        """Refuse new jobs, give running ones ``drain_timeout`` to end, interrupt the rest
        (or leave them running in the store, for another owner: ``hand_off``). When another
        instance is alive, the jobs it can continue are left to it at once, without the
        drain: a rolling restart costs them a hand-off, not ``drain_timeout``."""
        self._registry.stop_accepting()
        handing_off = False
        try:
            with trio.move_on_after(self.config.finalize_timeout):
                handing_off = await self._store.others_alive(self.instance_id, self._clock.now())
        except UnavailableError:
            handing_off = False
        drain = self.config.drain_timeout

        def grace(actor: JobActor | None) -> float:
            return 0.0 if actor is not None and actor.leaves_running_on_stop else drain

        await self._job_supervisor.shutdown(grace=grace if handing_off else None)

    async def hand_off(self) -> None:
        """End the leases of the jobs left running at shutdown now, so that a live instance
        takes them over at its next round instead of after ``lease_ttl``. Call it once this
        runtime's keeper has stopped (it would take them back). Best effort: an outage (or
        ``finalize_timeout``) leaves the leases to lapse by themselves. Cancellation: the
        same."""
        left = self._registry.left_running()
        with trio.move_on_after(self.config.finalize_timeout), contextlib.suppress(UnavailableError):
            await self._store.withdraw(self.instance_id)
        if not left:
            return
        with trio.move_on_after(self.config.finalize_timeout):
            try:
                await self._store.hand_off(self.instance_id, left, self._clock.now())
            except UnavailableError as exc:
                log.warning("could not hand off %d jobs at once (%s); their leases lapse", len(left), exc)
