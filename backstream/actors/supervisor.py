"""A one_for_one supervisor for trio tasks, after Erlang/OTP.

Each child runs in its own task; a child that crashes never touches its
siblings. What happens next depends on the child's restart policy:

- ``temporary``: never restarted (a job: a restart would pay the upstream twice);
- ``transient``: restarted only after a crash;
- ``permanent``: always restarted.

More than ``max_restarts`` restarts within ``period`` seconds means something
is wrong beyond one child: the supervisor gives up and raises
``SupervisorEscalation`` to its own parent.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Awaitable
from typing import Any, Protocol

import attrs
import trio

__all__ = ["ChildSpec", "Restart", "Supervisor", "SupervisorEscalation", "SupervisorStatistics"]

log = logging.getLogger("backstream.supervisor")


class Restart(enum.Enum):
    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


class ChildFn(Protocol):
    def __call__(self, *, task_status: trio.TaskStatus[Any]) -> Awaitable[None]: ...


@attrs.frozen
class ChildSpec:
    name: str
    run: ChildFn
    restart: Restart = Restart.TEMPORARY


@attrs.frozen
class SupervisorStatistics:
    children: int
    started_total: int
    crashed_total: int
    restarted_total: int


class SupervisorEscalation(Exception):
    """A supervisor exceeded its restart intensity."""


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


class Supervisor:
    """Start with ``await nursery.start(supervisor.run)``; then ``start_child``.

    Cancellation of ``run`` cancels every child; each child bounds its own
    cleanup. ``shutdown`` first waits up to a grace period for the children to
    end by themselves.
    """

    def __init__(self, name: str, *, max_restarts: int = 3, period: float = 5.0) -> None:
        self.name = name
        self._max_restarts = max_restarts
        self._period = period
        self._restarts: deque[float] = deque(maxlen=max_restarts + 1)
        self._nursery: trio.Nursery | None = None
        self._children = 0
        self._idle = trio.Event()
        self._idle.set()
        self._accepting = True
        self._started_total = 0
        self._crashed_total = 0
        self._restarted_total = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The supervisor's own task. Returns only when cancelled; raises on escalation."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._accepting = False
                self._nursery = None

    async def start_child(self, spec: ChildSpec) -> Any:
        """Start a child and wait until it calls ``task_status.started(value)``; return value.

        A child that fails before it has started raises here and is not restarted.
        Raises ``RuntimeError`` once the supervisor is shutting down.
        """
        if self._nursery is None or not self._accepting:
            raise RuntimeError(f"supervisor {self.name} is not accepting children")
        return await self._nursery.start(self._supervise, spec)  # task_status passed by start()

    def start_child_soon(self, spec: ChildSpec) -> None:
        """Start a child without waiting for it to run (``nursery.start_soon`` semantics).

        A failure before ``task_status.started()`` counts as a crash. Raises
        ``RuntimeError`` once the supervisor is shutting down.
        """
        if self._nursery is None or not self._accepting:
            raise RuntimeError(f"supervisor {self.name} is not accepting children")
        self._nursery.start_soon(self._supervise, spec, None)

    async def _supervise(self, spec: ChildSpec, task_status: trio.TaskStatus[Any] | None = None) -> None:
        flag = _StartedFlag(task_status or trio.TASK_STATUS_IGNORED)
        self._children += 1
        self._idle = trio.Event() if self._children == 1 else self._idle
        self._started_total += 1
        crash: BaseException | None = None
        try:
            while True:
                crash = None
                try:
                    status = _ForwardingStatus(flag) if not flag.started else trio.TASK_STATUS_IGNORED
                    flag.started = flag.started or task_status is None
                    await spec.run(task_status=status)
                except Exception as exc:
                    if not flag.started and task_status is not None:
                        raise  # start_child reports it; nothing to restart
                    crash = exc
                    self._crashed_total += 1
                    log.error("%s: child %s crashed", self.name, spec.name, exc_info=exc)
                if not self._should_restart(spec.restart, crash):
                    return
                self._note_restart(spec.name)
        finally:
            self._children -= 1
            if self._children == 0:
                self._idle.set()

    def _should_restart(self, policy: Restart, crash: BaseException | None) -> bool:
        if not self._accepting:
            return False
        if policy is Restart.PERMANENT:
            return True
        return policy is Restart.TRANSIENT and crash is not None

    def _note_restart(self, name: str) -> None:
        now = trio.current_time()
        self._restarts.append(now)
        self._restarted_total += 1
        recent = [t for t in self._restarts if now - t <= self._period]
        if len(recent) > self._max_restarts:
            raise SupervisorEscalation(
                f"supervisor {self.name}: more than {self._max_restarts} restarts in "
                f"{self._period:g} s (last: {name})"
            )

    async def shutdown(self, grace: float) -> None:
        """Stop accepting children, wait up to ``grace`` seconds for them to end, then
        cancel the rest. Returns when all children are gone."""
        self._accepting = False
        with trio.move_on_after(grace):
            await self._idle.wait()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        await self._idle.wait()

    def statistics(self) -> SupervisorStatistics:
        return SupervisorStatistics(
            children=self._children,
            started_total=self._started_total,
            crashed_total=self._crashed_total,
            restarted_total=self._restarted_total,
        )
