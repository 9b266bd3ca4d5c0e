"""The supervision tree of a runtime, started and stopped by ``open_runtime``.

    root nursery
    +-- "jobs" supervisor (one_for_one, stopped all at once; every job a temporary child
    |                      with ``drain_timeout`` to end by itself on shutdown)
    +-- "system" supervisor (one_for_one, at most 3 restarts in 10 s; stopped in reverse
                             start order)
        +-- store      (permanent): the store's background work (e.g. Redis pub/sub)
        +-- registry   (permanent): admission
        +-- ticker     (permanent): wakes the flushers of jobs with new entries
        +-- keeper     (permanent): retention sweep, lease renewal, orphan recovery
        +-- dispatcher (permanent): carries out the outbox (job-end notifications)

Orphans of a dead instance are recovered once before the registry admits anything.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import trio

from backstream.actors.clock import WallClock
from backstream.actors.config import Config
from backstream.actors.dispatcher import Dispatcher
from backstream.actors.job import JobActor
from backstream.actors.keeper import Keeper
from backstream.actors.metronome import Metronome
from backstream.actors.notifier import Notifier
from backstream.actors.ports import Model, Store
from backstream.actors.presence import WatchPresence
from backstream.actors.registry import Registry
from backstream.actors.supervisor import ChildSpec, Restart, Supervisor
from backstream.actors.ticker import FlushTicker
from backstream.protocol.ids import new_id
from backstream.protocol.records import JobRequest
from backstream.runtime.api import Runtime
from backstream.runtime.models.http1 import HTTP1Pool
from backstream.runtime.models.upstream import UpstreamClient, open_http_client
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
) -> AsyncIterator[Runtime]:
    """Run a runtime for the duration of the block.

    ``tools`` defaults to the built-in tools (``clock_now``, ``calculate``).
    ``store`` defaults to a new ``MemoryStore``. ``models`` maps model names to
    your own ``Model`` implementations (they take precedence over the built-ins
    and the upstream).

    On a normal exit, new starts are refused and running jobs get
    ``config.drain_timeout`` seconds to finish; the rest end ``interrupted``
    with their content kept. If the block raises or is cancelled, jobs end
    ``interrupted`` at once.
    """
    config = config or Config()
    store = store or MemoryStore()
    http: HTTP1Pool | None = open_http_client(config) if config.upstream_url else None
    clock = WallClock()
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
            runtime = await _start_system(
                config, store, clock, notifier, jobs, system, models or {}, upstream, tools
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


async def _start_system(
    config: Config,
    store: Store,
    clock: WallClock,
    notifier: Notifier,
    jobs: Supervisor[JobActor],
    system: Supervisor[None],
    models: Mapping[str, Model],
    upstream: UpstreamClient | None,
    tools: ToolRegistry,
) -> Runtime:
    """Build the actors, start the system children in order, and return the facade."""
    instance_id = new_id("i_", clock.now())
    presence = WatchPresence()
    runtime: Runtime | None = None

    def resolve(request: JobRequest) -> Model:
        assert runtime is not None, "no job is admitted before the runtime exists"
        return runtime.resolve_model(request)

    registry = Registry(
        config, store, clock, jobs, resolve, instance_id=instance_id, tools=tools, notifier=notifier
    )
    keeper = Keeper(config, store, clock, jobs, presence, instance_id=instance_id, notifier=notifier)
    metronome = Metronome()
    runtime = Runtime(
        config,
        store,
        clock,
        registry,
        jobs,
        keeper,
        presence,
        models,
        upstream,
        tools,
        notifier,
        instance_id=instance_id,
        metronome=metronome,
    )
    await system.start_child(ChildSpec("store", store.run, Restart.PERMANENT, shutdown=0))
    await system.start_child(ChildSpec("metronome", metronome.run, Restart.PERMANENT, shutdown=0))
    await keeper.recover_orphans()  # jobs of a dead instance end before new ones start
    await system.start_child(ChildSpec("registry", registry.run, Restart.PERMANENT, shutdown=0))
    ticker = FlushTicker(config, jobs)
    await system.start_child(ChildSpec("ticker", ticker.run, Restart.PERMANENT, shutdown=0))
    await system.start_child(ChildSpec("keeper", keeper.run, Restart.PERMANENT, shutdown=0))
    dispatcher = Dispatcher(store, store, notifier, clock, instance_id=instance_id)
    await system.start_child(ChildSpec("dispatcher", dispatcher.run, Restart.PERMANENT, shutdown=0))
    return runtime
