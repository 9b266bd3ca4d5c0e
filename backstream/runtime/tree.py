"""The supervision tree of a runtime, started and stopped by ``open_runtime``.

    root nursery
    +-- "jobs" supervisor (one_for_one; every job a temporary child)
    +-- "system" supervisor (one_for_one, at most 3 restarts in 10 s)
        +-- store      (permanent): the store's background work
        +-- registry   (permanent): admission, the flush ticker and the retention sweep
        +-- leases     (permanent): lease renewal and orphan recovery
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import trio

from backstream.actors.clock import WallClock
from backstream.actors.config import Config
from backstream.actors.notifier import Notifier
from backstream.actors.ports import Model, Store
from backstream.actors.registry import Registry
from backstream.actors.supervisor import ChildSpec, Restart, Supervisor
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
    tools = tools if tools is not None else ToolRegistry.with_builtins()
    clock = WallClock()
    notifier = Notifier(store, clock, config.max_notifications_per_user)
    instance_id = new_id("i_", clock.now())
    http: HTTP1Pool | None = open_http_client(config) if config.upstream_url else None
    await store.open()
    failure: Exception | None = None
    try:
        async with trio.open_nursery() as root:
            job_supervisor = Supervisor("jobs")
            system = Supervisor("system", max_restarts=3, period=10.0)
            await root.start(job_supervisor.run)
            await root.start(system.run)
            runtime: Runtime | None = None

            def resolve(request: JobRequest) -> Model:
                assert runtime is not None
                return runtime.resolve_model(request)

            registry = Registry(
                config,
                store,
                clock,
                job_supervisor,
                resolve,
                instance_id=instance_id,
                tools=tools,
                notifier=notifier,
            )
            await system.start_child(ChildSpec("store", store.run, Restart.PERMANENT))
            await registry.recover_orphans()  # jobs of a dead instance end before new ones start
            await system.start_child(ChildSpec("registry", registry.run, Restart.PERMANENT))
            await system.start_child(ChildSpec("leases", registry.keep_leases, Restart.PERMANENT))
            upstream = UpstreamClient(config, http) if http is not None else None
            runtime = Runtime(
                config, store, clock, registry, job_supervisor, models or {}, upstream, tools, notifier
            )
            runtime.instance_id = instance_id
            try:
                yield runtime
            except Exception as exc:
                # Raised bare after the nursery, not wrapped in an ExceptionGroup.
                failure = exc
            except BaseException:
                registry.stop_accepting()
                root.cancel_scope.cancel()
                raise
            if failure is None:
                await runtime._drain(config.drain_timeout)
            else:
                registry.stop_accepting()
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
