"""The signal hub every store wakes its waiters through, and the one retry-through-outage loop."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from backstream.actors.signals import SignalHub, StoreClosedError, through_outage
from backstream.protocol.backoff import Backoff
from backstream.protocol.errors import UnavailableError


async def test_a_signal_between_the_read_and_the_wait_is_not_lost() -> None:
    hub = SignalHub()
    with hub.listen(("entries", "j")) as listener:
        hub.signal(("entries", "j"))  # as if a commit landed while the waiter read the store
        with trio.fail_after(1):
            await listener.wait()
    assert hub.statistics().listeners == 0 and hub.statistics().topics == 0


async def test_signals_reach_their_topic_only(autojump_clock: trio.testing.MockClock) -> None:
    hub = SignalHub()
    woken: list[str] = []

    async def wait(name: str) -> None:
        await hub.wait(("abort", name))
        woken.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, "a")
        nursery.start_soon(wait, "b")
        await trio.sleep(1)
        assert hub.waiting("abort") == 2
        hub.signal(("abort", "a"))
        hub.signal(("entries", "b"))  # another kind: nobody of it waits
        await trio.sleep(1)
        assert woken == ["a"]
        hub.signal_all()
    assert sorted(woken) == ["a", "b"]


async def test_close_wakes_every_waiter_with_store_closed(autojump_clock: trio.testing.MockClock) -> None:
    hub = SignalHub()
    errors: list[BaseException] = []

    async def wait() -> None:
        try:
            await hub.wait(("decision", "j c"))
        except StoreClosedError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        nursery.start_soon(wait)
        await trio.sleep(1)
        hub.close()
    assert len(errors) == 2
    with pytest.raises(StoreClosedError):
        await hub.wait(("decision", "j c"))  # and from now on
    with pytest.raises(StoreClosedError):
        await hub.wait_bell("outbox")


async def test_a_full_hub_degrades_to_polling(autojump_clock: trio.testing.MockClock) -> None:
    hub = SignalHub(max_listeners=1)
    with hub.listen(("entries", "a")):
        with hub.listen(("entries", "b")) as overflowed:
            start = trio.current_time()
            await overflowed.wait()  # not registered: returns after the poll interval
            assert trio.current_time() - start == pytest.approx(1.0)
    assert hub.statistics().overflowed_total == 1


async def test_a_ring_is_kept_until_the_next_wait(autojump_clock: trio.testing.MockClock) -> None:
    hub = SignalHub()
    hub.ring("outbox")
    start = trio.current_time()
    await hub.wait_bell("outbox", timeout=10)  # rang before: returns at once
    assert trio.current_time() == start
    await hub.wait_bell("outbox", timeout=10)  # consumed: waits out the timeout
    assert trio.current_time() - start == pytest.approx(10)


async def test_through_outage_retries_until_the_store_answers(autojump_clock: trio.testing.MockClock) -> None:
    calls: list[float] = []

    async def attempt() -> str:
        calls.append(trio.current_time())
        if len(calls) < 4:
            raise UnavailableError("away")
        return "ok"

    retries: list[UnavailableError] = []
    result = await through_outage(
        "test", attempt, backoff=Backoff(1, 10, jitter="none"), on_retry=retries.append
    )
    assert result == "ok" and len(retries) == 3
    assert [b - a for a, b in itertools.pairwise(calls)] == [1, 2, 4]


async def test_through_outage_never_retries_a_closed_store() -> None:
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise StoreClosedError("closed")

    with pytest.raises(StoreClosedError):
        await through_outage("test", attempt)
    assert calls == 1
