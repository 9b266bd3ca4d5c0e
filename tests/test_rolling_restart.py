"""Three ``serve`` processes on one Redis, thirty running jobs: a rolling restart (SIGTERM
each in turn, restarted on its port before the next) and a kill -9 lose no answer. Every
job ends ``completed`` with the text an undisturbed run gives, and every watcher's batches,
joined with their rewinds applied, equal it: no gap, no repeat, no ``interrupted``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import trio

from backstream.client import Client, open_client
from backstream.protocol.events import RewindEvent, TextEvent
from bench._procs import free_port, wait_for_port
from tests.conftest import delete_prefix, redis_url, require_redis
from tests.test_takeover import lorem_request, undisturbed

MSG = [{"role": "user", "content": "x"}]
LEASES = ("--lease-ttl", "3", "--lease-renew-interval", "0.3", "--drain-timeout", "10", "--max-jobs-per-user", "50")


class Instance:
    """A ``serve`` process on a fixed port that can be stopped and started again there."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/v1"
        self._env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = ["--port", str(self.port), "--token", "tok=alice", "--store", redis_url(), *LEASES]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backstream", "serve", "--log-level", "warning", *args],
            env={**os.environ, **self._env},
        )
        wait_for_port(self.port, timeout=60)

    async def stop(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        with trio.fail_after(60):
            while self.proc.poll() is None:
                await trio.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def instances(count: int, prefix: str) -> Iterator[list[Instance]]:
    with ExitStack() as stack:
        made = []
        for _ in range(count):
            instance = Instance({"BACKSTREAM_REDIS_PREFIX": prefix})
            stack.callback(instance.kill)
            instance.start()
            made.append(instance)
        yield made


async def watch_whole(client: Client, job_id: str, seen: dict[str, tuple[str, str]]) -> None:
    """Watch from the start across whatever happens; record the joined text and the end."""
    text, next_seq, last = "", 1, None
    async with client.watch(job_id) as batches:
        async for batch in batches:
            if batch.from_seq == batch.to_seq + 1:  # cut back to what the log kept
                assert batch.to_seq < next_seq
            else:
                assert batch.from_seq == next_seq, (job_id, batch.from_seq, next_seq)
            for event in batch.events:
                if isinstance(event, TextEvent):
                    text += event.text
                elif isinstance(event, RewindEvent):
                    text = text[: event.content_length]
            next_seq, last = batch.to_seq + 1, batch
    assert last is not None and last.terminal is not None
    seen[job_id] = (text, last.terminal.status)


async def run_jobs(fleet: list[Instance], jobs_per_instance: int, disturb: Any) -> tuple[dict[str, Any], ...]:
    """Start the jobs on every instance, watch each through the next instance, call
    ``disturb`` once they run, wait for every watch to end; return what was seen and stored."""
    params = {"max_tokens": 600, "tokens_per_s": 30}
    seen: dict[str, tuple[str, str]] = {}
    stored: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        clients = []
        for instance in fleet:
            ctx = open_client(instance.url, "tok", reconnect_max=0.5, max_reconnect_attempts=400)
            clients.append(await nursery.start(_hold, ctx))
        owner: dict[str, int] = {}
        for i, client in enumerate(clients):
            for n in range(jobs_per_instance):
                started = await client.start_job(
                    thread_id="t", message_id=f"m{i}-{n}", model="backstream/lorem", messages=MSG, params=params
                )
                owner[started.job.job_id] = i
        with trio.fail_after(120):
            async with trio.open_nursery() as watches:
                for job_id, i in owner.items():
                    watches.start_soon(watch_whole, clients[(i + 1) % len(clients)], job_id, seen)
                await trio.sleep(3)  # every job has written some text
                await disturb(fleet)
        for job_id, i in owner.items():
            info = await clients[i].get(job_id, include_content=True)
            stored[job_id] = info
        nursery.cancel_scope.cancel()
    return seen, stored


async def _hold(ctx: Any, *, task_status: trio.TaskStatus[Client]) -> None:
    async with ctx as client:
        task_status.started(client)
        await trio.sleep_forever()


def check_whole(seen: dict[str, tuple[str, str]], stored: dict[str, Any], answer: str, jobs: int) -> None:
    assert len(seen) == len(stored) == jobs
    statuses = {job_id: info.job.status for job_id, info in stored.items()}
    assert set(statuses.values()) == {"completed"}, statuses
    for job_id, info in stored.items():
        assert info.content == answer, job_id
        assert seen[job_id] == (answer, "completed"), job_id


async def test_a_rolling_restart_of_three_instances_loses_no_answer() -> None:
    require_redis()
    answer = await undisturbed(lorem_request(600))
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"

    async def roll(fleet: list[Instance]) -> None:
        for instance in fleet:
            await instance.stop(signal.SIGTERM)
            instance.start()

    try:
        with instances(3, prefix) as fleet:
            seen, stored = await run_jobs(fleet, 10, roll)
    finally:
        await delete_prefix(prefix)
    check_whole(seen, stored, answer, 30)
    assert max(info.job.epoch for info in stored.values()) >= 2  # jobs did move


async def test_kill_9_of_the_instance_running_ten_jobs_loses_none() -> None:
    """The killed instance's ten jobs continue on the other two; their watchers there never
    see ``gone`` (a watch of those jobs through the killed one is not part of this run)."""
    require_redis()
    answer = await undisturbed(lorem_request(600))
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"

    async def kill_first(fleet: list[Instance]) -> None:
        fleet[0].kill()

    try:
        with instances(3, prefix) as fleet:
            # Jobs on the first instance only, watched through the second.
            seen, stored = await run_jobs_on_first(fleet, 10, kill_first)
    finally:
        await delete_prefix(prefix)
    check_whole(seen, stored, answer, 10)
    assert {info.job.epoch for info in stored.values()} == {2}


async def run_jobs_on_first(fleet: list[Instance], jobs: int, disturb: Any) -> tuple[dict[str, Any], ...]:
    params = {"max_tokens": 600, "tokens_per_s": 30}
    seen: dict[str, tuple[str, str]] = {}
    stored: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        starter = await nursery.start(_hold, open_client(fleet[0].url, "tok"))
        watcher = await nursery.start(_hold, open_client(fleet[1].url, "tok"))
        reader = await nursery.start(_hold, open_client(fleet[2].url, "tok"))
        job_ids = []
        for n in range(jobs):
            started = await starter.start_job(
                thread_id="t", message_id=f"m{n}", model="backstream/lorem", messages=MSG, params=params
            )
            job_ids.append(started.job.job_id)
        with trio.fail_after(120):
            async with trio.open_nursery() as watches:
                for job_id in job_ids:
                    watches.start_soon(watch_whole, watcher, job_id, seen)
                await trio.sleep(3)
                await disturb(fleet)
        for job_id in job_ids:
            stored[job_id] = await reader.get(job_id, include_content=True)
        nursery.cancel_scope.cancel()
    return seen, stored
