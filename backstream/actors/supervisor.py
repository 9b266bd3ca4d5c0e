"""A one_for_one supervisor for trio tasks, after Erlang/OTP.

Each child runs in its own task and cancel scope; a child that crashes never
touches its siblings. What happens next depends on the child's restart policy:

- ``temporary``: never restarted (a job: a restart would pay the upstream twice);
- ``transient``: restarted only after a crash;
- ``permanent``: always restarted.

A child is given as a *factory*: a callable that builds a fresh child (its state,
its actor) and returns the function that runs it. Every (re)start calls it again, so
a restarted child begins from fresh state, never from what its crash left behind.

More than ``max_restarts`` restarts within ``period`` seconds means something
is wrong beyond one child: the supervisor gives up, stops the remaining children
as ``shutdown()`` does (reverse start order, each within its ``shutdown``
budget), and then raises ``SupervisorEscalation`` to its own parent.

Stopping follows OTP too. Each child names its ``shutdown``: how many seconds
it may take to end by itself once asked (0 is OTP's ``brutal_kill``: cancelled
at once). ``shutdown()`` stops the children in reverse start order, one at a
time, or all at once for a supervisor of many alike children
(``concurrent_shutdown``, OTP's ``simple_one_for_one``), then cancels what is
left of each after its own timeout.

A child may have an *address*: the object others use to talk to it (a job's
actor), returned by its factory with the run function (``Incarnation``); a
restart replaces it with the fresh one. ``lookup(name)`` finds it and
``which_children()`` lists frozen snapshots, so nobody keeps a second map of
the children.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

import attrs
import trio

__all__ = [
    "ChildFn",
    "ChildInfo",
    "ChildSpec",
    "Incarnation",
    "Restart",
    "Supervisor",
    "SupervisorEscalation",
    "SupervisorStatistics",
]

log = logging.getLogger("backstream.supervisor")

AddressT = TypeVar("AddressT")


class Restart(enum.Enum):
    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


class ChildFn(Protocol):
    def __call__(self, *, task_status: trio.TaskStatus[Any]) -> Awaitable[None]: ...


@attrs.frozen
class Incarnation(Generic[AddressT]):
    """One run of a child, as its factory builds it: the function that runs the fresh
    child and the address others reach it at (what ``lookup`` returns until it ends)."""

    run: ChildFn
    address: AddressT | None = None


ChildFactory = Callable[[], "Incarnation[AddressT] | ChildFn"]
"""Builds a fresh child and returns its run function, or an ``Incarnation`` with an address."""


@attrs.frozen
class ChildSpec(Generic[AddressT]):
    """How to run one child. ``factory`` is called at every (re)start and builds the child
    afresh. ``shutdown``: seconds it may take to end once asked to stop (then it is
    cancelled; 0 cancels at once)."""

    name: str
    factory: ChildFactory[AddressT]
    restart: Restart = Restart.TEMPORARY
    shutdown: float = 5.0


@attrs.frozen
class ChildInfo(Generic[AddressT]):
    """A snapshot of one child, as ``which_children`` returns it."""

    name: str
    restart: Restart
    address: AddressT | None
    started_at: float
    restarts: int


@attrs.frozen
class SupervisorStatistics:
    children: int
    started_total: int
    crashed_total: int
    restarted_total: int


class SupervisorEscalation(Exception):
    """A supervisor exceeded its restart intensity."""


@attrs.define(eq=False)
class _Child(Generic[AddressT]):
    spec: ChildSpec[AddressT]
    scope: trio.CancelScope
    started_at: float
    incarnation: Incarnation[AddressT] | None
    """Built at registration, taken by the first run; each restart builds its own."""
    address: AddressT | None
    exited: trio.Event = attrs.Factory(trio.Event)
    stopping: trio.Event = attrs.Factory(trio.Event)
    restarts: int = 0


class _StartedFlag:
    """Wraps a TaskStatus so the supervisor knows whether the child has started."""

    def __init__(self, inner: trio.TaskStatus[Any]) -> None:
        self.inner = inner
        self.started = False

    def started_with(self, value: Any = None) -> None:
        self.started = True
        self.inner.started(value)


class _ForwardingStatus:
    def __init__(self, flag: _StartedFlag) -> None:
        self._flag = flag

    def started(self, value: Any = None) -> None:
        self._flag.started_with(value)


def _incarnate(spec: ChildSpec[AddressT]) -> Incarnation[AddressT]:
    built = spec.factory()
    return built if isinstance(built, Incarnation) else Incarnation(built)


class Supervisor(Generic[AddressT]):
    """Start with ``await nursery.start(supervisor.run)``; then ``start_child``.

    Cancellation of ``run`` cancels every child; each child bounds its own
    cleanup. ``shutdown`` stops the children gracefully first.
    """

    def __init__(
        self, name: str, *, max_restarts: int = 3, period: float = 5.0, concurrent_shutdown: bool = False
    ) -> None:
        self.name = name
        self._max_restarts = max_restarts
        self._period = period
        self._concurrent_shutdown = concurrent_shutdown
        self._restarts: deque[float] = deque(maxlen=max_restarts + 1)
        self._nursery: trio.Nursery | None = None
        self._children: dict[str, _Child[AddressT]] = {}  # in start order (dicts keep it)
        self._idle = trio.Event()
        self._idle.set()
        self._accepting = True
        self._escalation: SupervisorEscalation | None = None
        self._escalated = trio.Event()
        self._started_total = 0
        self._crashed_total = 0
        self._restarted_total = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The supervisor's own task. Returns only when cancelled or shut down; raises
        ``SupervisorEscalation`` (bare) once its restart intensity is exceeded, after it
        has stopped the remaining children in reverse start order, each within its
        ``shutdown`` budget.

        Cancellation: every child is cancelled and ``run`` returns when they are gone.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await self._escalated.wait()
                await self._stop_children()
            finally:
                self._accepting = False
                self._nursery = None
        if self._escalation is not None:
            raise self._escalation

    async def start_child(self, spec: ChildSpec[AddressT]) -> Any:
        """Build the child with its factory, start it and wait until it calls
        ``task_status.started(value)``; return value.

        A child whose factory raises, or that fails before it has started, raises here and
        is not restarted. Raises ``RuntimeError`` once the supervisor is shutting down, and
        ``ValueError`` for a name already running. Cancellation: the child is cancelled too
        if it has not started yet; once started it runs on.
        """
        nursery = self._admit(spec)
        return await nursery.start(self._supervise, spec)  # task_status passed by start()

    def start_child_soon(self, spec: ChildSpec[AddressT]) -> None:
        """Build the child with its factory and start it without waiting for it to run
        (``nursery.start_soon`` semantics); it is registered (``lookup`` finds its address)
        at once.

        A factory that raises raises here; a failure before ``task_status.started()``
        counts as a crash. Raises ``RuntimeError`` once the supervisor is shutting down.
        """
        nursery = self._admit(spec)
        self._register(spec)
        nursery.start_soon(self._supervise, spec, None)

    def _admit(self, spec: ChildSpec[AddressT]) -> trio.Nursery:
        if self._nursery is None or not self._accepting:
            raise RuntimeError(f"supervisor {self.name} is not accepting children")
        if spec.name in self._children:
            raise ValueError(f"supervisor {self.name}: a child named {spec.name!r} runs already")
        return self._nursery

    def _register(self, spec: ChildSpec[AddressT]) -> _Child[AddressT]:
        incarnation = _incarnate(spec)  # may raise: nothing is registered then
        child = _Child(spec, trio.CancelScope(), trio.current_time(), incarnation, incarnation.address)
        self._children[spec.name] = child
        self._idle = trio.Event() if len(self._children) == 1 else self._idle
        self._started_total += 1
        return child

    async def _supervise(
        self, spec: ChildSpec[AddressT], task_status: trio.TaskStatus[Any] | None = None
    ) -> None:
        child = self._children.get(spec.name) if task_status is None else self._register(spec)
        assert child is not None
        flag = _StartedFlag(task_status or trio.TASK_STATUS_IGNORED)
        try:
            with child.scope:
                await self._run_with_restarts(child, flag, task_status is not None)
        finally:
            del self._children[spec.name]
            child.exited.set()
            if not self._children:
                self._idle.set()

    async def _run_with_restarts(self, child: _Child[AddressT], flag: _StartedFlag, reported: bool) -> None:
        spec = child.spec
        while True:
            crash: BaseException | None = None
            try:
                incarnation = child.incarnation or self._reincarnate(child)
                child.incarnation = None
                status = _ForwardingStatus(flag) if not flag.started else trio.TASK_STATUS_IGNORED
                flag.started = flag.started or not reported
                await incarnation.run(task_status=status)
            except Exception as exc:
                if not flag.started and reported:
                    raise  # start_child reports it; nothing to restart
                crash = exc
                self._crashed_total += 1
                log.error("%s: child %s crashed", self.name, spec.name, exc_info=exc)
            if child.stopping.is_set() or not self._should_restart(spec.restart, crash):
                return
            if not self._note_restart(spec.name):
                return
            child.restarts += 1

    def _reincarnate(self, child: _Child[AddressT]) -> Incarnation[AddressT]:
        """A fresh child for a restart; its address replaces the old one's at once."""
        child.address = None  # the crashed one's is gone, even if the factory fails
        incarnation = _incarnate(child.spec)
        child.address = incarnation.address
        return incarnation

    def _should_restart(self, policy: Restart, crash: BaseException | None) -> bool:
        if not self._accepting:
            return False
        if policy is Restart.PERMANENT:
            return True
        return policy is Restart.TRANSIENT and crash is not None

    def _note_restart(self, name: str) -> bool:
        """Count a restart; past the intensity, escalate (``run`` stops the others and
        raises) and return False: the child is not restarted."""
        now = trio.current_time()
        self._restarts.append(now)
        recent = [t for t in self._restarts if now - t <= self._period]
        if len(recent) > self._max_restarts:
            self._accepting = False  # no more starts nor restarts: the others are stopped
            self._escalation = SupervisorEscalation(
                f"supervisor {self.name}: more than {self._max_restarts} restarts in "
                f"{self._period:g} s (last: {name})"
            )
            log.error("%s", self._escalation)
            self._escalated.set()
            return False
        self._restarted_total += 1
        return True

    async def shutdown(self, *, grace: Callable[[AddressT | None], float] | None = None) -> None:
        """Stop accepting children, then stop each: it gets its spec's ``shutdown`` seconds
        (or what ``grace`` says for its address) to end by itself, then it is cancelled. In
        reverse start order, one at a time, or all at once with ``concurrent_shutdown``.
        Returns when every child is gone; then ``run`` returns too.

        Cancellation: the children still running are cancelled (their own cleanup is
        bounded), and ``Cancelled`` propagates.
        """
        self._accepting = False
        await self._stop_children(grace)
        await self._idle.wait()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _stop_children(self, grace: Callable[[AddressT | None], float] | None = None) -> None:
        children = list(reversed(self._children.values()))
        seconds = {id(c): c.spec.shutdown if grace is None else grace(c.address) for c in children}
        if self._concurrent_shutdown:
            async with trio.open_nursery() as nursery:
                for child in children:
                    nursery.start_soon(self._stop_child, child, seconds[id(child)])
        else:
            for child in children:
                await self._stop_child(child, seconds[id(child)])

    async def terminate_child(self, name: str) -> bool:
        """Stop one child as ``shutdown`` would, without restarting it. False if no such
        child runs. Cancellation: the child is cancelled at once."""
        child = self._children.get(name)
        if child is None:
            await trio.lowlevel.checkpoint()
            return False
        await self._stop_child(child, child.spec.shutdown)
        return True

    async def _stop_child(self, child: _Child[AddressT], seconds: float) -> None:
        child.stopping.set()
        try:
            with trio.move_on_after(seconds):
                await child.exited.wait()
        finally:
            child.scope.cancel()
        await child.exited.wait()

    # -- addresses and snapshots ------------------------------------------------------

    def lookup(self, name: str) -> AddressT | None:
        """The address of the running child ``name``, if any (a read; never blocks)."""
        child = self._children.get(name)
        return child.address if child is not None else None

    def which_children(self) -> tuple[ChildInfo[AddressT], ...]:
        """A frozen snapshot of the running children, in start order."""
        return tuple(
            ChildInfo(c.spec.name, c.spec.restart, c.address, c.started_at, c.restarts)
            for c in self._children.values()
        )

    def addresses(self) -> list[AddressT]:
        """The addresses of the running children that have one, in start order."""
        return [c.address for c in self._children.values() if c.address is not None]

    def count_children(self) -> int:
        return len(self._children)

    async def wait_idle(self) -> None:
        """Return once no child runs. Cancellation: safe."""
        await self._idle.wait()

    def statistics(self) -> SupervisorStatistics:
        return SupervisorStatistics(
            children=len(self._children),
            started_total=self._started_total,
            crashed_total=self._crashed_total,
            restarted_total=self._restarted_total,
        )
