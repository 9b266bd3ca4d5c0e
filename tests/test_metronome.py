"""The metronome wakes each sleeper at its time, to within its resolution, and never early."""

from __future__ import annotations

import random

import trio
import trio.testing

from backstream.actors.metronome import Metronome


async def test_sleepers_wake_at_their_time_never_before_and_at_most_one_tick_late(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metronome = Metronome(resolution=0.001)
    rng = random.Random(7)
    lateness: list[float] = []

    async def sleeper(delay: float) -> None:
        when = trio.current_time() + delay
        await metronome.sleep_until(when)
        lateness.append(trio.current_time() - when)

    async with trio.open_nursery() as nursery:
        await nursery.start(metronome.run)
        async with trio.open_nursery() as sleepers:
            for _ in range(500):
                sleepers.start_soon(sleeper, rng.uniform(0, 0.2))
                if rng.random() < 0.1:
                    await trio.sleep(rng.uniform(0, 0.01))  # new sleepers while others wake
        nursery.cancel_scope.cancel()
    assert len(lateness) == 500
    assert min(lateness) >= 0
    assert max(lateness) <= 0.001 + 1e-9


async def test_an_earlier_sleeper_is_not_held_up_by_a_later_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metronome = Metronome()
    woke: dict[str, float] = {}

    async def sleeper(name: str, delay: float) -> None:
        await metronome.sleep_until(trio.current_time() + delay)
        woke[name] = trio.current_time()

    async with trio.open_nursery() as nursery:
        await nursery.start(metronome.run)
        t0 = trio.current_time()
        nursery.start_soon(sleeper, "late", 10.0)
        await trio.sleep(0.5)
        nursery.start_soon(sleeper, "early", 1.0)  # the metronome sleeps until 10 s when it comes
        await trio.sleep(11)
        nursery.cancel_scope.cancel()
    assert abs(woke["early"] - (t0 + 1.5)) <= 0.001
    assert abs(woke["late"] - (t0 + 10)) <= 0.001


async def test_sleepers_of_one_tick_share_it_and_a_cancelled_one_leaves_the_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metronome = Metronome()
    woke = 0

    async def sleeper(when: float) -> None:
        nonlocal woke
        await metronome.sleep_until(when)
        woke += 1

    async with trio.open_nursery() as nursery:
        await nursery.start(metronome.run)
        when = trio.current_time() + 1
        for _ in range(20):
            nursery.start_soon(sleeper, when)
        cancelled = trio.CancelScope()
        nursery.start_soon(cancelled_sleeper, metronome, when, cancelled)
        await trio.sleep(0.5)
        stats = metronome.statistics()
        assert (stats.ticks, stats.sleepers) == (1, 21)
        cancelled.cancel()
        await trio.sleep(1)
        assert woke == 20
        assert metronome.statistics().ticks == 0
        nursery.cancel_scope.cancel()


async def cancelled_sleeper(metronome: Metronome, when: float, scope: trio.CancelScope) -> None:
    with scope:
        await metronome.sleep_until(when)
        raise AssertionError("woke though cancelled")


async def test_a_stopped_metronome_wakes_its_sleepers_and_later_sleeps_still_sleep(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metronome = Metronome()
    woke: list[float] = []

    async def sleeper() -> None:
        await metronome.sleep_until(trio.current_time() + 5)
        woke.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        async with trio.open_nursery() as ticking:
            await ticking.start(metronome.run)
            nursery.start_soon(sleeper)
            await trio.sleep(1)
            ticking.cancel_scope.cancel()  # the sleeper wakes early, at the stop
    assert woke == [t0 + 1]
    await metronome.sleep_until(trio.current_time() + 2)  # no metronome: trio's own timer
    assert trio.current_time() == t0 + 3
