"""The one_for_one supervisor: isolation, restart policies and intensity."""

from __future__ import annotations

import pytest
import trio

from backstream.actors.supervisor import ChildSpec, Incarnation, Restart, Supervisor, SupervisorEscalation


def crasher(runs: list[int], *, crash_times: int, then_sleep: bool = True) -> ChildSpec:
    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        runs.append(1)
        await trio.sleep(1)
        if len(runs) <= crash_times:
            raise RuntimeError("boom")
        if then_sleep:
            await trio.sleep_forever()

    return ChildSpec("crasher", lambda: run)


async def test_a_crash_does_not_touch_siblings(autojump_clock: trio.testing.MockClock) -> None:
    sup = Supervisor("test")
    sibling_done = trio.Event()

    async def sibling(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep(5)
        sibling_done.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        runs: list[int] = []
        await sup.start_child(crasher(runs, crash_times=1))
        await sup.start_child(ChildSpec("sibling", lambda: sibling))
        await sibling_done.wait()
        stats = sup.statistics()
        assert stats.crashed_total == 1 and stats.restarted_total == 0 and runs == [1]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("policy", "expected_runs"), [(Restart.TRANSIENT, 3), (Restart.PERMANENT, 3)])
async def test_restarts_after_crashes(
    autojump_clock: trio.testing.MockClock, policy: Restart, expected_runs: int
) -> None:
    sup = Supervisor("test", max_restarts=5, period=60)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        runs: list[int] = []
        spec = crasher(runs, crash_times=2)
        await sup.start_child(ChildSpec("c", spec.factory, policy))
        await trio.sleep(10)
        assert len(runs) == expected_runs and sup.statistics().restarted_total == 2
        assert sup.statistics().children == 1
        nursery.cancel_scope.cancel()


async def test_transient_child_that_returns_is_not_restarted(autojump_clock: trio.testing.MockClock) -> None:
    sup = Supervisor("test")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        runs: list[int] = []
        spec = crasher(runs, crash_times=0, then_sleep=False)
        await sup.start_child(ChildSpec("c", spec.factory, Restart.TRANSIENT))
        await trio.sleep(10)
        assert runs == [1] and sup.statistics().children == 0
        nursery.cancel_scope.cancel()


async def test_intensity_exceeded_escalates(autojump_clock: trio.testing.MockClock) -> None:
    sup = Supervisor("test", max_restarts=2, period=10)
    runs: list[int] = []
    with pytest.raises(BaseExceptionGroup) as caught:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.start_child(ChildSpec("c", crasher(runs, crash_times=100).factory, Restart.PERMANENT))
    assert caught.group_contains(SupervisorEscalation)
    assert len(runs) == 3


async def test_failure_before_started_is_raised_to_the_starter() -> None:
    sup = Supervisor("test")

    async def bad(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise ValueError("cannot start")

    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with pytest.raises(ValueError, match="cannot start"):
            await sup.start_child(ChildSpec("bad", lambda: bad, Restart.PERMANENT))
        assert sup.statistics().children == 0
        nursery.cancel_scope.cancel()


def child(name: str, seconds: float, ended: list[str], *, shutdown: float) -> ChildSpec[str]:
    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await trio.sleep(seconds)
            ended.append(f"{name} finished")
        except trio.Cancelled:
            ended.append(f"{name} cancelled")
            raise

    return ChildSpec(name, lambda: Incarnation(run, f"address of {name}"), shutdown=shutdown)


async def test_concurrent_shutdown_gives_each_child_its_own_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup: Supervisor[str] = Supervisor("test", concurrent_shutdown=True)
    ended: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.start_child(child("quick", 1, ended, shutdown=3))
        await sup.start_child(child("slow", 100, ended, shutdown=3))
        t0 = trio.current_time()
        await sup.shutdown()
        assert trio.current_time() - t0 == pytest.approx(3)
        assert ended == ["quick finished", "slow cancelled"]
        with pytest.raises(RuntimeError):
            await sup.start_child(child("late", 1, ended, shutdown=1))


async def test_shutdown_stops_children_in_reverse_start_order(autojump_clock: trio.testing.MockClock) -> None:
    sup: Supervisor[str] = Supervisor("test")
    ended: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.start_child(child("first", 100, ended, shutdown=0))
        await sup.start_child(child("second", 100, ended, shutdown=2))
        await sup.start_child(child("third", 1, ended, shutdown=5))
        t0 = trio.current_time()
        await sup.shutdown()
        # third ends by itself after 1 s, second is cancelled after its 2 s, first at once.
        assert trio.current_time() - t0 == pytest.approx(3)
        assert ended == ["third finished", "second cancelled", "first cancelled"]
        assert sup.which_children() == ()


async def test_lookup_and_which_children_are_snapshots(autojump_clock: trio.testing.MockClock) -> None:
    sup: Supervisor[str] = Supervisor("test", max_restarts=5, period=60)
    ended: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        sup.start_child_soon(child("a", 10, ended, shutdown=0))
        assert sup.lookup("a") == "address of a"  # registered before it runs
        await sup.start_child(child("b", 20, ended, shutdown=0))
        with pytest.raises(ValueError):
            await sup.start_child(child("b", 1, ended, shutdown=0))
        children = sup.which_children()
        assert [(c.name, c.address, c.restarts) for c in children] == [
            ("a", "address of a", 0),
            ("b", "address of b", 0),
        ]
        await trio.sleep(15)
        assert sup.lookup("a") is None and [c.name for c in sup.which_children()] == ["b"]
        assert [c.name for c in children] == ["a", "b"]  # the old snapshot did not change
        assert await sup.terminate_child("b") and ended == ["a finished", "b cancelled"]
        assert not await sup.terminate_child("b")
        nursery.cancel_scope.cancel()


class Tally:
    """A child's state: what a run has counted so far."""

    def __init__(self, built: list[Tally]) -> None:
        self.counted = 0
        built.append(self)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(1)
            self.counted += 1
            if self.counted == 3:
                raise RuntimeError("crash with state left behind")


async def test_a_restarted_child_starts_from_fresh_state(autojump_clock: trio.testing.MockClock) -> None:
    sup: Supervisor[Tally] = Supervisor("test", max_restarts=5, period=60)
    built: list[Tally] = []

    def fresh() -> Incarnation[Tally]:
        tally = Tally(built)
        return Incarnation(tally.run, tally)

    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.start_child(ChildSpec("tally", fresh, Restart.PERMANENT))
        assert sup.lookup("tally") is built[0]
        await trio.sleep(4.5)  # crashed at 3 s with counted == 3; the new one counted 1
        assert len(built) == 2 and built[0].counted == 3 and built[1].counted == 1
        assert sup.lookup("tally") is built[1]  # the address is the fresh child's
        assert [c.restarts for c in sup.which_children()] == [1]
        await trio.sleep(2)  # the fresh one crashes only after its own three counts
        assert len(built) == 3 and built[1].counted == 3 and built[2].counted == 0
        nursery.cancel_scope.cancel()


async def test_a_factory_that_fails_raises_to_the_starter_and_registers_nothing() -> None:
    sup: Supervisor[str] = Supervisor("test")

    def broken() -> Incarnation[str]:
        raise ValueError("cannot build")

    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with pytest.raises(ValueError, match="cannot build"):
            await sup.start_child(ChildSpec("a", broken))
        with pytest.raises(ValueError, match="cannot build"):
            sup.start_child_soon(ChildSpec("b", broken))
        assert sup.which_children() == () and sup.statistics().started_total == 0
        nursery.cancel_scope.cancel()


async def test_escalation_stops_the_others_in_reverse_order_within_budgets_then_raises(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup: Supervisor[str] = Supervisor("test", max_restarts=1, period=10)
    ended: list[str] = []
    raised: list[tuple[float, BaseException]] = []

    async def supervise(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await sup.run(task_status=task_status)
        except SupervisorEscalation as exc:  # bare, not in a group
            raised.append((trio.current_time(), exc))

    async with trio.open_nursery() as nursery:
        await nursery.start(supervise)
        t0 = trio.current_time()
        await sup.start_child(child("first", 100, ended, shutdown=0))
        await sup.start_child(child("second", 100, ended, shutdown=2))
        await sup.start_child(child("third", 3, ended, shutdown=5))
        runs: list[int] = []
        await sup.start_child(ChildSpec("c", crasher(runs, crash_times=100).factory, Restart.PERMANENT))
    # The crasher crashes at 1 s (restarted) and at 2 s (one restart too many): then third
    # ends by itself at 3 s, second is cancelled after its 2 s budget, first at once.
    assert len(runs) == 2
    assert ended == ["third finished", "second cancelled", "first cancelled"]
    [(at, exc)] = raised
    assert at - t0 == pytest.approx(5) and "more than 1 restarts" in str(exc)
    assert sup.which_children() == ()
    with pytest.raises(RuntimeError):
        await sup.start_child(child("late", 1, ended, shutdown=1))
