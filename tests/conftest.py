from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import trio

from backstream import MemoryStore, Store
from backstream.runtime.stores.redis import RedisStore
from backstream.runtime.stores.sqlite import SqliteStore
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
        made = RedisStore(request.getfixturevalue("redis_cluster"), prefix=f"bstest:{uuid.uuid4().hex[:12]}")
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
    """A three-node Redis Cluster of our own on spare ports; yields its ``redis+cluster://`` URL."""
    import shutil
    import subprocess
    import time

    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.fail("redis-server and redis-cli are needed for the Redis Cluster tests")
    directory = tmp_path_factory.mktemp("cluster")
    import random

    def free(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    ports: list[int] = []
    while len(ports) < 3:  # the cluster bus listens on port + 10000, which must exist too
        port = random.randint(20000, 45000)
        if port not in ports and free(port) and free(port + 10000):
            ports.append(port)
    nodes = [
        subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
            ],
            stdout=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        for port in ports:
            deadline = time.monotonic() + 10
            while (
                subprocess.run(
                    ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True
                ).stdout.strip()
                != "PONG"
            ):
                if time.monotonic() > deadline:
                    pytest.fail(f"cluster node on {port} did not start")
                time.sleep(0.05)
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
        )
        deadline = time.monotonic() + 20
        while (
            "cluster_state:ok"
            not in subprocess.run(
                ["redis-cli", "-p", str(ports[0]), "cluster", "info"], capture_output=True, text=True
            ).stdout
        ):
            if time.monotonic() > deadline:
                pytest.fail("the cluster did not become ready")
            time.sleep(0.1)
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for node in nodes:
            node.kill()
            node.wait()
