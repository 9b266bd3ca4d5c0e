"""Redis going away under a running job: our own redis-server on a spare port."""

from __future__ import annotations

import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from backstream import Config, open_runtime
from backstream.runtime.stores.redis import RedisStore
from tests.conftest import redis_url
from tests.helpers import check_contiguous, joined_text, terminal
from tests.test_serve import free_port, wait_for_port

MSG = [{"role": "user", "content": "x"}]


class RedisServer:
    """A redis-server of the test's own, persisting every write (appendfsync always)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@contextmanager
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is needed for the Redis fault tests")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()


async def test_redis_restart_mid_job_loses_nothing(tmp_path: Path) -> None:
    with own_redis(tmp_path) as redis:
        store = RedisStore(redis_url(redis.port), prefix=f"bstest:{uuid.uuid4().hex[:8]}")
        async with open_runtime(
            Config(drain_timeout=0, flush_ms=20, store_outage_limit=30), store=store
        ) as rt:
            started = await rt.start_job(
                user="alice",
                thread_id="t",
                message_id="m",
                model="backstream/lorem",
                messages=MSG,
                params={"max_tokens": 150, "tokens_per_s": 50},
            )
            batches, restarted = [], False
            async with rt.watch(started.job_id, user="alice") as watch:
                async for batch in watch:  # local watchers keep streaming while Redis is down
                    batches.append(batch)
                    if not restarted and batch.to_seq > 30:
                        restarted = True
                        redis.kill()
                        await trio.sleep(1.0)
                        redis.start()
            check_contiguous(batches)
            assert terminal(batches).status == "completed"
            await rt.wait_idle()
            stored = await store.read(started.job_id, 0, 10_000)
            assert [e.seq for e in stored] == list(range(1, terminal(batches).seq + 1))
            info = await rt.get_job(started.job_id, user="alice", include_content=True)
            assert info.content == joined_text(batches) and info.job.status == "completed"


async def test_redis_down_too_long_fails_the_job_unavailable(tmp_path: Path) -> None:
    with own_redis(tmp_path) as redis:
        store = RedisStore(redis_url(redis.port), prefix=f"bstest:{uuid.uuid4().hex[:8]}")
        async with open_runtime(
            Config(drain_timeout=0, flush_ms=20, store_outage_limit=1.0), store=store
        ) as rt:
            started = await rt.start_job(
                user="alice",
                thread_id="t",
                message_id="m",
                model="backstream/lorem",
                messages=MSG,
                params={"max_tokens": 1000, "tokens_per_s": 50},
            )
            batches = []
            async with rt.watch(started.job_id, user="alice") as watch:
                async for batch in watch:
                    batches.append(batch)
                    if batch.to_seq > 10 and redis.proc is not None and redis.proc.poll() is None:
                        redis.kill()
            end = terminal(batches)
            assert end.status == "failed" and end.error is not None and end.error.code == "unavailable"
            check_contiguous(batches)
            assert 10 < len(joined_text(batches).split()) < 1000  # what it had, kept for its watchers
