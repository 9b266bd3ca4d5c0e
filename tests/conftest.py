from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator

import pytest
import trio

from backstream import MemoryStore, Store
from backstream.runtime.redis_store import RedisStore
from backstream.runtime.sqlite_store import SqliteStore
from tests.upstream_server import FakeUpstream, open_fake_upstream

REDIS_HOST, REDIS_PORT = "127.0.0.1", int(os.environ.get("BACKSTREAM_TEST_REDIS_PORT", "6379"))


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> AsyncIterator[FakeUpstream]:
    yield await open_fake_upstream(nursery)


def redis_available() -> bool:
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=1):
            return True
    except OSError:
        return False


def require_redis() -> None:
    """Under CI the Redis tests must run: no Redis is a failure there, a skip elsewhere."""
    if redis_available():
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but no Redis answers on {REDIS_HOST}:{REDIS_PORT}")
    pytest.skip(f"no Redis on {REDIS_HOST}:{REDIS_PORT}")


def redis_url(port: int = REDIS_PORT) -> str:
    return f"redis://{REDIS_HOST}:{port}/0"


async def delete_prefix(prefix: str, port: int = REDIS_PORT) -> None:
    import coredis

    async with coredis.Redis(host=REDIS_HOST, port=port, decode_responses=True) as r:
        keys = [key async for key in r.scan_iter(match=f"{prefix}:*")]
        if keys:
            await r.delete(keys)


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def unopened_store(request: pytest.FixtureRequest, tmp_path: object) -> AsyncIterator[Store]:
    """Each store the runtime supports, not yet opened (``open_runtime`` opens what it is given)."""
    made: Store
    prefix = ""
    if request.param == "memory":
        made = MemoryStore()
    elif request.param == "sqlite":
        made = SqliteStore(f"{tmp_path}/store.db")
    else:
        require_redis()
        prefix = f"bstest:{uuid.uuid4().hex[:12]}"
        made = RedisStore(redis_url(), prefix=prefix)
    try:
        yield made
    finally:
        if prefix:
            await delete_prefix(prefix)


@pytest.fixture
async def store(unopened_store: Store, nursery: trio.Nursery) -> AsyncIterator[Store]:
    """Each store, opened, with its background task running."""
    made = unopened_store
    await made.open()
    await nursery.start(made.run)
    if isinstance(made, RedisStore):
        with trio.fail_after(5):
            await made.subscribed.wait()
    try:
        yield made
    finally:
        await made.aclose()
