"""The ``Seats`` port on every store, and the runtime's ``HeldSeats`` over it: per-user caps
that hold across instances, and the seats of a dead instance lapsing with their lease."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import trio

from backstream import Config, Store, open_runtime
from backstream.actors.ports import Capability
from backstream.actors.seats import SeatsTakenError
from backstream.protocol.errors import RateLimitedError
from backstream.runtime.stores.redis import RedisStore
from tests.conftest import delete_prefix, redis_url, require_redis

LEASE = 1.0
"""Short leases, renewed well within them (a loaded machine must not miss one)."""


async def test_a_user_holds_at_most_limit_seats_of_a_kind(store: Store) -> None:
    assert await store.take_seat("alice", "streams", "s1", 2, 15)
    assert await store.take_seat("alice", "streams", "s2", 2, 15)
    assert not await store.take_seat("alice", "streams", "s3", 2, 15)
    assert await store.take_seat("alice", "streams", "s2", 2, 15)  # held already: renewed
    assert await store.take_seat("alice", "connections", "c1", 2, 15)  # kinds count apart
    assert await store.take_seat("bob", "streams", "s4", 2, 15)  # users count apart
    assert await store.take_seat("a:b", "streams", "s5", 1, 15)  # names cannot collide
    assert await store.take_seat("a", "b:streams", "s6", 1, 15)
    await store.release_seat("alice", "streams", "s1")
    await store.release_seat("alice", "streams", "s1")  # released twice: nothing
    assert await store.take_seat("alice", "streams", "s3", 2, 15)
    assert not await store.take_seat("alice", "streams", "s7", 2, 15)
    await store.renew_seats([("alice", "streams", "s2"), ("bob", "streams", "s4")], 15)
    assert not await store.take_seat("alice", "streams", "s7", 2, 15)


@pytest.mark.needs_capability(Capability.LEASES)  # one process's store keeps seats until released
async def test_shared_store_seats_lapse_with_their_lease_unless_renewed(store: Store) -> None:
    assert await store.take_seat("alice", "connections", "kept", 2, LEASE)
    assert await store.take_seat("alice", "connections", "dead", 2, LEASE)
    assert not await store.take_seat("alice", "connections", "third", 2, LEASE)
    for _ in range(6):
        await trio.sleep(LEASE / 4)
        await store.renew_seats([("alice", "connections", "kept")], LEASE)
    # "dead" was not renewed (its instance died): it lapsed, by Redis's clock.
    assert await store.take_seat("alice", "connections", "third", 2, LEASE)
    assert not await store.take_seat("alice", "connections", "fourth", 2, LEASE)
    await store.renew_seats([("alice", "connections", "dead")], 15)  # a lapsed seat stays gone
    assert not await store.take_seat("alice", "connections", "fourth", 2, LEASE)


async def test_held_seats_are_released_at_the_end_of_the_block(unopened_store: Store) -> None:
    async with open_runtime(Config(), store=unopened_store) as rt:
        async with rt.seats.hold("alice", "streams", 1):
            with pytest.raises(SeatsTakenError, match="at most 1 streams") as refused:
                async with rt.seats.hold("alice", "streams", 1):
                    pass
            assert isinstance(refused.value, RateLimitedError) and refused.value.code == "rate_limited"
            assert rt.seats.count("streams") == 1
        assert rt.seats.count("streams") == 0
        with trio.CancelScope() as scope:
            async with rt.seats.hold("alice", "streams", 1):
                scope.cancel()
                await trio.sleep(1)
        async with rt.seats.hold("alice", "streams", 1):  # the cancelled block let go of its seat
            pass


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    yield prefix
    await delete_prefix(prefix)


async def test_seats_hold_across_runtimes_and_a_dead_ones_lapse(redis_prefix: str) -> None:
    config = Config(lease_ttl=LEASE, lease_renew_interval=LEASE / 8)
    async with open_runtime(config, store=RedisStore(redis_url(), prefix=redis_prefix)) as one:
        async with open_runtime(config, store=RedisStore(redis_url(), prefix=redis_prefix)) as two:
            async with one.seats.hold("alice", "connections", 2), two.seats.hold("alice", "connections", 2):
                with pytest.raises(SeatsTakenError):
                    async with one.seats.hold("alice", "connections", 2):
                        pass
                await trio.sleep(LEASE * 1.5)  # beyond the lease: each runtime's keeper renewed its seat
                with pytest.raises(SeatsTakenError):
                    async with two.seats.hold("alice", "connections", 2):
                        pass
        # An instance that took a seat and died: nobody releases or renews it.
        dead = RedisStore(redis_url(), prefix=redis_prefix)
        await dead.open()
        try:
            assert await dead.take_seat("alice", "connections", "s_dead", 2, config.lease_ttl)
        finally:
            await dead.aclose()
        async with one.seats.hold("alice", "connections", 2):
            with pytest.raises(SeatsTakenError):
                async with one.seats.hold("alice", "connections", 2):
                    pass
            await trio.sleep(LEASE * 1.5)
            async with one.seats.hold("alice", "connections", 2):
                pass  # the dead instance's seat lapsed; this runtime's own is still held
            with pytest.raises(SeatsTakenError):
                async with one.seats.hold("alice", "connections", 1):
                    pass


async def test_a_users_seats_key_expires_with_its_last_seat(redis_prefix: str) -> None:
    store = RedisStore(redis_url(), prefix=redis_prefix)
    await store.open()
    try:
        key = store.keys.seats("alice", "connections")
        assert await store.take_seat("alice", "connections", "short", 2, LEASE / 2)
        assert 0 < await store.redis.pttl(key) <= LEASE / 2 * 1000  # a new key gets an end
        assert await store.take_seat("alice", "connections", "long", 2, LEASE)
        assert LEASE / 2 * 1000 < await store.redis.pttl(key) <= LEASE * 1000  # the later end
        assert await store.take_seat("alice", "connections", "short", 2, LEASE / 2)  # held: renewed
        assert await store.redis.pttl(key) > LEASE / 2 * 1000  # an earlier end never shortens it
        await trio.sleep(LEASE * 1.2)  # nothing renewed: the key goes with its last seat
        assert await store.redis.exists([key]) == 0
    finally:
        await store.aclose()
