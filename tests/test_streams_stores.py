"""Durable streams on each store, through the operations the HTTP API runs: forks and their
references, soft delete and its cascade, expiry and the sweep, per-user usage."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from backstream.protocol.streams_state import AppendRequest, CreateRequest, StreamRefusal
from backstream.runtime.server.streams_ops import StreamLimits, StreamOps
from backstream.runtime.stores.redis import RedisStore
from backstream.runtime.stores.sqlite import SqliteStore
from backstream.runtime.stores.streams import MemoryStreamStore, StreamStore, stream_key
from backstream.runtime.stores.streams_redis import RedisStreamStore
from backstream.runtime.stores.streams_sqlite import SqliteStreamStore
from tests.conftest import delete_prefix, redis_url, require_redis


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def streams(
    request: pytest.FixtureRequest, tmp_path: Path, nursery: trio.Nursery
) -> AsyncIterator[StreamStore]:
    if request.param == "memory":
        yield MemoryStreamStore()
        return
    if request.param == "sqlite":
        sqlite = SqliteStore(tmp_path / "streams.db")
        await sqlite.open()
        await nursery.start(sqlite.run)
        try:
            yield SqliteStreamStore(sqlite)
        finally:
            await sqlite.aclose()
        return
    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    redis = RedisStore(redis_url(), prefix=prefix)
    await redis.open()
    try:
        yield RedisStreamStore(redis)
    finally:
        await redis.aclose()
        await delete_prefix(prefix)


def text(body: bytes = b"", **fields: object) -> CreateRequest:
    return CreateRequest(content_type="text/plain", body=body, **fields)  # type: ignore[arg-type]


async def test_forks_soft_delete_and_expiry_sweep(streams: StreamStore) -> None:
    now = [1000.0]
    ops = StreamOps(streams, clock=lambda: now[0])
    key = lambda name: stream_key("alice", name)  # noqa: E731
    assert (await ops.create(key("a"), text(b"one", ttl_seconds=10)))[0] == 201
    await ops.create(key("b"), text(b"two"))
    await ops.create(key("c"), text(b"three", ttl_seconds=10))
    fork = CreateRequest(content_type=None, forked_from=key("c"), ttl_seconds=1000)
    assert (await ops.create(key("d"), fork))[0] == 201
    assert (await ops.create(key("d"), fork))[0] == 200  # idempotent: no second reference
    assert (await streams.get(key("c"))).ref_count == 1  # type: ignore[union-attr]
    usage = await streams.usage("alice")
    assert (usage.streams, usage.bytes) == (4, len(b"onetwothree"))

    now[0] = 1011.0
    assert await ops.sweep() >= 2
    assert await streams.get(key("a")) is None
    assert (await streams.get(key("b"))) is not None
    soft = await streams.get(key("c"))
    assert soft is not None and soft.soft_deleted  # its fork still reads it
    with pytest.raises(StreamRefusal) as gone:
        await ops.live(key("c"))
    assert gone.value.status == 410
    fork_state = await ops.live(key("d"))
    assert [data for _, data in await ops.read(key("d"), fork_state, 0)] == [b"three"]
    with pytest.raises(StreamRefusal) as blocked:
        await ops.create(key("c"), text())
    assert blocked.value.status == 409

    await ops.delete(key("d"))  # the last fork goes: its soft-deleted source with it
    assert await streams.get(key("c")) is None and await streams.get(key("d")) is None
    assert await ops.sweep() == 0
    assert (await streams.usage("alice")).streams == 1


async def test_limits_per_user(streams: StreamStore) -> None:
    ops = StreamOps(streams, StreamLimits(max_streams_per_user=2, max_bytes_per_user=10))
    await ops.create(stream_key("bob", "1"), text(b"12345"))
    await ops.create(stream_key("bob", "2"), text())
    with pytest.raises(StreamRefusal) as too_many:
        await ops.create(stream_key("bob", "3"), text())
    assert too_many.value.status == 429
    await ops.create(stream_key("carol", "1"), text())  # another user's count is their own
    await ops.append(stream_key("bob", "2"), AppendRequest(body=b"12345", content_type="text/plain"))
    with pytest.raises(StreamRefusal) as full:
        await ops.append(stream_key("bob", "2"), AppendRequest(body=b"1", content_type="text/plain"))
    assert full.value.status == 413
