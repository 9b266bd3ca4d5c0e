"""Three ``serve`` processes on one Redis, thirty running jobs: a rolling restart (SIGTERM
each in turn, restarted on its port before the next) and a kill -9 lose no answer. Every
job ends ``completed`` with the text an undisturbed run gives, and every watcher's batches,
joined with their rewinds applied, equal it: no gap, no repeat, no ``interrupted``."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import trio

from backstream.client import Client, open_client
from backstream.protocol.events import RewindEvent, TextEvent
from backstream.runtime.stores.redis import RedisStore
from bench._procs import ServeProcess
from tests.conftest import delete_prefix, redis_url, require_redis
from tests.test_takeover import lorem_request, undisturbed

MSG = [{"role": "user", "content": "x"}]
LEASES = (
    "--lease-ttl",
    "3",
    "--lease-renew-interval",
    "0.3",
    "--drain-timeout",
    "10",
    "--max-jobs-per-user",
    "50",
)


class Instance(ServeProcess):
    """A ``serve`` on the shared Redis prefix, stopped and started again on its port."""

    def __init__(self, env: dict[str, str]) -> None:
        args = ["--token", "tok=alice", "--store", redis_url(), "--log-level", "warning", *LEASES]
        super().__init__(args, env)

    async def stop(self, sig: int) -> None:
        self.signal(sig)
        with trio.fail_after(60):
            while not self.exited():
                await trio.sleep(0.05)


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


LABELS: dict[str, list[tuple[int, int, int]]] = {}
"""Per job watched, each batch's (from_seq, to_seq, epoch), as the watcher got them."""


async def watch_whole(client: Client, job_id: str, seen: dict[str, tuple[str, str]]) -> None:
    """Watch from the start across whatever happens; record the joined text and the end."""
    text, next_seq, last = "", 1, None
    labels = LABELS.setdefault(job_id, [])
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
            labels.append((batch.from_seq, batch.to_seq, batch.epoch))
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
                    thread_id="t",
                    message_id=f"m{i}-{n}",
                    model="backstream/lorem",
                    messages=MSG,
                    params=params,
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


def _first_difference(got: str, want: str) -> tuple[int, int, int, str, str]:
    at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    return at, len(got), len(want), got[at - 40 : at + 60], want[at - 40 : at + 60]


def check_whole(seen: dict[str, tuple[str, str]], stored: dict[str, Any], answer: str, jobs: int) -> None:
    assert len(seen) == len(stored) == jobs
    statuses = {job_id: info.job.status for job_id, info in stored.items()}
    assert set(statuses.values()) == {"completed"}, statuses
    for job_id, info in stored.items():
        assert info.content == answer, (job_id, _first_difference(info.content or "", answer))
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
        wrong = [job_id for job_id, info in stored.items() if info.content != answer]
        logs = await logs_of(prefix, wrong)
    finally:
        await delete_prefix(prefix)
    assert not wrong, logs
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
        kept = await kept_through(prefix, list(stored))
    finally:
        await delete_prefix(prefix)
    check_whole(seen, stored, answer, 10)
    assert {info.job.epoch for info in stored.values()} == {2}
    # Watched from another instance, the new epoch's entries come labelled with it. Entries
    # of the first epoch past what it kept were only announced: the watch was cut back to
    # what was kept before anything more came.
    for job_id, end in kept.items():
        labels = LABELS[job_id]
        cut = max((i for i, (_, last, _) in enumerate(labels) if last <= end), default=-1)
        mislabelled = [(first, epoch) for first, _, epoch in labels[cut + 1 :] if epoch != 2]
        assert not mislabelled, (job_id, end, labels)


async def logs_of(prefix: str, job_ids: list[str]) -> dict[str, Any]:
    """What a wrong job's record and log say: its epochs, and its entries but the text."""
    store = RedisStore(redis_url(), prefix=prefix)
    await store.open()
    found: dict[str, Any] = {}
    try:
        for job_id in job_ids:
            record = await store.get_job(job_id)
            entries = await store.read(job_id, 0, 100_000)
            texts = [e for e in entries if isinstance(e, TextEvent)]
            others = [e for e in entries if not isinstance(e, TextEvent)]
            found[job_id] = (record, len(texts), sum(len(t.text) for t in texts), others)
    finally:
        await store.aclose()
    return found


async def kept_through(prefix: str, job_ids: list[str]) -> dict[str, int]:
    """Where each job's first epoch ended, from its record."""
    store = RedisStore(redis_url(), prefix=prefix)
    await store.open()
    try:
        records = [await store.get_job(job_id) for job_id in job_ids]
    finally:
        await store.aclose()
    return {r.job_id: r.epoch_ends[0] for r in records if r is not None}


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
