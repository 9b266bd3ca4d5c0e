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
