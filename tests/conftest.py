from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import trio

from backstream import MemoryStore, Store
from backstream.runtime.stores.redis import RedisStore
from backstream.runtime.stores.redis_client import Replication
from backstream.runtime.stores.sqlite import SqliteStore
from tests.redis_servers import SentinelGroup, redis_cluster_group, sentinel_group
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
        # The instance set's keys ({prefix}:...) and each job's and user's ({prefix:job:ID}...).
        keys = [key async for key in r.scan_iter(match="{" + prefix + "}:*")]
        keys += [key async for key in r.scan_iter(match="{" + prefix + ":*")]
        if keys:
            await r.delete(keys)


STORE_CLASSES: dict[str, type[Store]] = {
    "memory": MemoryStore,
    "sqlite": SqliteStore,
    "redis": RedisStore,
    "redis-cluster": RedisStore,
    "redis-sentinel": RedisStore,
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "needs_capability(capability): run only with the stores that declare it (others are deselected)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked ``needs_capability(c)`` is not collected for a store without ``c``: a
    store that cannot do a thing is not a skipped test, it is not a case at all."""
    kept, dropped = [], []
    for item in items:
        marker = item.get_closest_marker("needs_capability")
        callspec = getattr(item, "callspec", None)
        store_name = callspec.params.get("unopened_store") if callspec is not None else None
        if (
            marker is not None
            and store_name is not None
            and marker.args[0] not in STORE_CLASSES[store_name].capabilities
        ):
            dropped.append(item)
            continue
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    group_for_processes(items)


SERIAL_GROUPS = {
    "real-processes-a": ("test_durable_streams_conformance", "test_soak", "test_js_client"),
    "real-processes-b": ("test_model_stateful", "test_rolling_restart", "test_redis_failover"),
}
"""The longest modules (minutes each, real servers, Node and Redis processes): with
``pytest -n`` (``./dev test``) each group runs in one worker, one module after another, so
they never crowd each other; they are collected first, so they start first."""
_SERIAL = {module: group for group, modules in SERIAL_GROUPS.items() for module in modules}


def worker_share(nodeid: str) -> str:
    """The worker's share a test belongs to: its module's, or its module's serial group."""
    module = nodeid.split("::")[0].removeprefix("tests/").removesuffix(".py")
    return _SERIAL.get(module, module)


def group_for_processes(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: worker_share(item.nodeid) not in SERIAL_GROUPS)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Each ``worker_share`` to one worker at a time (a module's tests share its fixtures)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_share(nodeid)

    return GroupScheduling(config, log)


@pytest.fixture(params=list(STORE_CLASSES))
async def unopened_store(request: pytest.FixtureRequest, tmp_path: object) -> AsyncIterator[Store]:
    """Each store the runtime supports, not yet opened (``open_runtime`` opens what it is given)."""
    made: Store
    prefix = ""
    if request.param == "memory":
        made = MemoryStore()
    elif request.param == "sqlite":
        made = SqliteStore(f"{tmp_path}/store.db")
    elif request.param == "redis-cluster":
        # On the cluster, keys spread over its slots (a tag per job, user and shard).
        # A job's end waits for its node's replica (WAIT on that node's connection).
        made = RedisStore(
            request.getfixturevalue("redis_cluster"),
            prefix=f"bstest:{uuid.uuid4().hex[:12]}",
            replication=Replication(replicas=1, timeout=5.0),
        )
    elif request.param == "redis-sentinel":
        # Every commit waits for the replica.
        made = RedisStore(
            request.getfixturevalue("redis_sentinel"),
            prefix=f"bstest:{uuid.uuid4().hex[:12]}",
            replication=Replication(replicas=1, timeout=5.0, each_flush=True),
        )
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


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis Cluster of our own (three primaries with a replica each); yields its
    ``redis+cluster://`` URL. Tests that kill nodes start a cluster of their own."""
    with redis_cluster_group(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster.url


@pytest.fixture(scope="session")
def sentinel_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """A Sentinel group of our own: a primary, a replica, three sentinels. A test that
    fails it over gracefully leaves it healthy (``wait_healthy``); one that kills a server
    starts a group of its own."""
    with sentinel_group(tmp_path_factory.mktemp("sentinel")) as group:
        yield group


@pytest.fixture(scope="session")
def redis_sentinel(sentinel_servers: SentinelGroup) -> str:
    """The ``redis+sentinel://`` URL of ``sentinel_servers``."""
    return sentinel_servers.url
