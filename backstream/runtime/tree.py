"""The supervision tree of a runtime, started and stopped by ``open_runtime``.

    root nursery
    +-- "jobs" supervisor (one_for_one, stopped all at once; every job a temporary child
    |                      with ``drain_timeout`` to end by itself on shutdown)
    +-- "system" supervisor (one_for_one, at most 3 restarts in 10 s; stopped in reverse
                             start order, also when it gives up and escalates)
        +-- store      (permanent): the store's background work (e.g. Redis pub/sub)
        +-- metronome  (permanent): one timer for the watchers' batch slots
        +-- registry   (permanent): admission, and the running counts it alone owns
        +-- ticker     (permanent): wakes the flushers of jobs with new entries
        +-- keeper     (permanent): retention sweep, lease renewal, orphan recovery
        +-- dispatcher (permanent): carries out the outbox (job-end notifications, and
        |                           records the webhook events of jobs' ends)
        +-- webhooks   (permanent, with endpoints): sends the webhook deliveries

The keeper's recovery policy is ``ContinueOrphans``: a job taken over from a dead instance
runs on here, under its model's continuation policy (``Config.continuations``).

Every child is given by a factory, so a restart starts it afresh: the registry rebuilds
its counts from the jobs supervisor, the ticker is built anew; the store, the metronome,
the keeper and the dispatcher are objects others hold, whose ``run`` keeps no state of
its own between runs (the metronome clears its on exit; the keeper and the dispatcher
keep only their totals, which ``Runtime.statistics`` reports).

The model router is built first: the runtime resolves each start's model there, once,
and hands it to the registry with the start. Orphans of a dead instance are recovered
once (continued through the registry, which runs by then) before the runtime is handed out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from functools import partial

import trio

from backstream.actors.clock import WallClock
from backstream.actors.config import Config
from backstream.actors.dispatcher import Dispatcher
from backstream.actors.job import JobActor
from backstream.actors.keeper import Keeper
from backstream.actors.metronome import Metronome
from backstream.actors.notifier import Notifier
from backstream.actors.ports import Capability, Model, Store
from backstream.actors.presence import WatchPresence
from backstream.actors.recovery import ContinueOrphans
from backstream.actors.registry import Registry
from backstream.actors.seats import HeldSeats
from backstream.actors.supervisor import ChildSpec, Restart, Supervisor
from backstream.actors.ticker import FlushTicker
from backstream.actors.webhooks import WebhookDeliverer, WebhookEvents, WebhookSender, WebhookSettings
from backstream.actors.workflow import Workflow
from backstream.protocol.continuation import Continuation
from backstream.protocol.errors import BackstreamError
from backstream.protocol.ids import new_id
from backstream.protocol.records import JobRecord
from backstream.runtime.api import Runtime
from backstream.runtime.models.http1 import HTTP1Pool
from backstream.runtime.models.router import ModelRouter
from backstream.runtime.models.upstream import UpstreamClient, open_http_client
from backstream.runtime.models.workflows import WorkflowRegistry
from backstream.runtime.stores.memory import MemoryStore
from backstream.runtime.tools.registry import ToolRegistry

__all__ = ["open_runtime"]


@asynccontextmanager
async def open_runtime(
    config: Config | None = None,
    *,
    store: Store | None = None,
    models: Mapping[str, Model] | None = None,
    tools: ToolRegistry | None = None,
    clock: WallClock | None = None,
    webhooks: WebhookSettings | None = None,
    webhook_sender: WebhookSender | None = None,
    workflows: WorkflowRegistry | Iterable[Workflow] | None = None,
) -> AsyncIterator[Runtime]:
    """Run a runtime for the duration of the block.

    ``tools`` defaults to the built-in tools (``clock_now``, ``calculate``).
    ``store`` defaults to a new ``MemoryStore``. ``models`` maps model names to
    your own ``Model`` implementations (they take precedence over the built-ins
    and the upstream). ``clock`` is the runtime's wall clock (by default the
    machine's, moving with trio's clock).

    ``workflows``: the workflows jobs may run as ``workflow/<name>`` (docs/workflows.md);
    the built-in ``demo`` is always there.

    ``webhooks`` (with its ``webhook_sender``, e.g. ``HttpWebhookSender``): the events
    of jobs' ends go to these endpoints (see docs/webhooks.md).

    On a normal exit, new starts are refused and running jobs get
    ``config.drain_timeout`` seconds to finish; the rest end ``interrupted``
    with their content kept. If the block raises or is cancelled, jobs end
    ``interrupted`` at once.
    """
    config = config or Config()
    store = store or MemoryStore()
    http: HTTP1Pool | None = open_http_client(config) if config.upstream_url else None
    clock = clock or WallClock()
    notifier = Notifier(store, clock, config.max_notifications_per_user)
    await store.open(on_notification=notifier.deliver_local)  # pushes of every instance
    failure: Exception | None = None
    try:
        async with trio.open_nursery() as root:
            jobs: Supervisor[JobActor] = Supervisor("jobs", concurrent_shutdown=True)
            system: Supervisor[None] = Supervisor("system", max_restarts=3, period=10.0)
            await root.start(jobs.run)
            await root.start(system.run)
            upstream = UpstreamClient(config, http) if http is not None else None
            if tools is None:
                tools = ToolRegistry.with_builtins(max_threads=config.max_tool_threads)
            router = ModelRouter(config, models or {}, upstream, _workflow_registry(workflows))
            hooks = (webhooks, webhook_sender) if webhooks and webhooks.endpoints and webhook_sender else None
            runtime = await _start_system(
                config, store, clock, notifier, jobs, system, router, tools, http, hooks
            )
            try:
                yield runtime
            except Exception as exc:
                # Raised bare after the nursery, not wrapped in an ExceptionGroup.
                failure = exc
            except BaseException:
                runtime.stop_accepting()
                root.cancel_scope.cancel()
                raise
            if failure is None:
                await runtime._drain()
            else:
                runtime.stop_accepting()
            await system.shutdown()  # keeper, ticker, registry, store: reverse start order
            if failure is None:
                await runtime.hand_off()  # jobs left running: to a live instance, at once
            root.cancel_scope.cancel()
        if failure is not None:
            raise failure
    finally:
        with trio.CancelScope(shield=True) as cleanup:
            cleanup.deadline = trio.current_time() + config.finalize_timeout
            if http is not None:
                await http.aclose()
        # Not inside a scope of ours: a store may hold scopes it entered at open().
        await store.aclose()


def _workflow_registry(workflows: WorkflowRegistry | Iterable[Workflow] | None) -> WorkflowRegistry:
    if isinstance(workflows, WorkflowRegistry):
        return workflows
    registry = WorkflowRegistry.with_builtins()
    for item in workflows or ():
        registry.register(item)
    return registry


def _model_of(router: ModelRouter, record: JobRecord) -> tuple[Model, Continuation] | None:
    """The model that serves a job taken over, and its continuation policy; None if this
    instance cannot serve it."""
    try:
        model = router.resolve(record.request)
    except BackstreamError:
        return None
    return model, router.continuation(record.request.model)


async def _start_system(
    config: Config,
    store: Store,
    clock: WallClock,
    notifier: Notifier,
    jobs: Supervisor[JobActor],
    system: Supervisor[None],
    router: ModelRouter,
    tools: ToolRegistry,
    http: HTTP1Pool | None,
    hooks: tuple[WebhookSettings, WebhookSender] | None = None,
) -> Runtime:
    """Build the actors, start the system children in order, and return the facade."""
    instance_id = new_id("i_", clock.now())
    presence = WatchPresence(store, instance_id)
    seats = HeldSeats(store, lease=config.lease_ttl, release_timeout=config.finalize_timeout)
    registry = Registry(
        config,
        store,
        clock,
        jobs,
        instance_id=instance_id,
        tools=tools,
        notifier=notifier,
        hand_off=Capability.SURVIVES_RESTART in store.capabilities,
    )
    recovery = ContinueOrphans(config, store, clock, registry, partial(_model_of, router))
    keeper = Keeper(
        config, store, clock, jobs, presence, instance_id=instance_id, recovery=recovery, seats=seats
    )
    events, deliverer = None, None
    if hooks is not None:
        events = WebhookEvents(store, store, hooks[0], clock)
        deliverer = WebhookDeliverer(store, hooks[1], hooks[0], clock, instance_id=instance_id)
        events.on_recorded = deliverer.wake
        notifier.webhooks = events
    dispatcher = Dispatcher(store, store, notifier, clock, instance_id=instance_id, webhooks=events)
    metronome = Metronome()
    runtime = Runtime(
        config,
        store,
        clock,
        registry,
        jobs,
        keeper,
        presence,
        router,
        tools,
        notifier,
        instance_id=instance_id,
        metronome=metronome,
        dispatcher=dispatcher,
        upstream_pool=http,
        seats=seats,
    )
    runtime.webhook_deliverer = deliverer
    await system.start_child(ChildSpec("store", lambda: store.run, Restart.PERMANENT, shutdown=0))
    await system.start_child(ChildSpec("metronome", lambda: metronome.run, Restart.PERMANENT, shutdown=0))
    await system.start_child(ChildSpec("registry", registry.fresh_child, Restart.PERMANENT, shutdown=0))
    # Jobs of a dead instance are continued (or ended) before the runtime admits new ones.
    await keeper.recover_orphans()
    await system.start_child(
        ChildSpec("ticker", lambda: FlushTicker(config, jobs).run, Restart.PERMANENT, shutdown=0)
    )
    await system.start_child(ChildSpec("keeper", lambda: keeper.run, Restart.PERMANENT, shutdown=0))
    await system.start_child(ChildSpec("dispatcher", lambda: dispatcher.run, Restart.PERMANENT, shutdown=0))
    if deliverer is not None:
        await system.start_child(ChildSpec("webhooks", lambda: deliverer.run, Restart.PERMANENT, shutdown=0))
    return runtime
