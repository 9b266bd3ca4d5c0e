"""A server killed with SIGKILL (or stopped with SIGTERM) mid-job: its jobs are taken over
and finish with the answer an undisturbed run gives (the built-in models continue exactly);
under the ``interrupt`` policy they end ``interrupted`` with what was flushed."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import trio

from backstream import GoneError
from backstream.client import Client, open_client
from backstream.protocol.events import RewindEvent, TextEvent
from bench._procs import ServeProcess, free_port, wait_for_port
from tests.conftest import delete_prefix, redis_url, require_redis
from tests.test_takeover import lorem_request, undisturbed

MSG = [{"role": "user", "content": "x"}]


@contextmanager
def server(
    store: str, *extra: str, env: dict[str, str] | None = None
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    serving = ServeProcess(["--token", "tok=alice", "--store", store, "--log-level", "warning", *extra], env)
    try:
        serving.start()
        assert serving.proc is not None
        yield serving.port, serving.proc
    finally:
        serving.kill()


async def watch_some(client: Client, job_id: str, entries: int) -> tuple[str, int]:
    """Watch until ``entries`` log entries were seen; return the text and the cursor."""
    text, cursor = "", 0
    async with client.watch(job_id) as batches:
        async for batch in batches:
            text += batch.text
            cursor = batch.to_seq
            if cursor >= entries:
                break
    return text, cursor


async def check_recovered(client: Client, job_id: str, seen: str, cursor: int) -> None:
    info = await client.get(job_id, include_content=True)
    job = info.job
    assert job.status == "interrupted" and job.epoch == 2 and job.finished_at is not None
    content = info.content or ""
    # What was flushed and what the client saw come from one log: one is a prefix of the other,
    # and at most about one flush interval (100 ms at 50 words/s, plus a batch) was lost.
    assert content.startswith(seen) or seen.startswith(content)
    assert len(content.split()) >= len(seen.split()) - 10
    # The epoch-1 cursor goes on: at once if the log kept what it names, else after a batch
    # whose rewind cuts the view back to what was kept.
    resumed = seen
    async with client.watch(job_id, after_seq=cursor, epoch=1) as batches:
        async for batch in batches:
            for event in batch.events:
                if isinstance(event, TextEvent):
                    resumed += event.text
                elif isinstance(event, RewindEvent):
                    assert batch.from_seq == batch.to_seq + 1 == event.to_seq + 1 <= cursor + 1
                    resumed = resumed[: event.content_length]
    assert resumed == content
    with pytest.raises(GoneError):  # an epoch the job never had
        async with client.watch(job_id, after_seq=1, epoch=3) as batches:
            await batches.__anext__()
    replay, seqs = "", []
    async with client.watch(job_id) as batches:
        async for batch in batches:
            replay += batch.text
            seqs.append((batch.from_seq, batch.to_seq))
            last = batch
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(seqs))
    assert replay == content and last.terminal is not None and last.terminal.status == "interrupted"


LOREM = {"max_tokens": 200, "tokens_per_s": 50}
INTERRUPT = ("--continuation", "backstream/*=interrupt")


async def wait_completed(client: Client, job_id: str) -> tuple[str, int]:
    """Watch the job from its start to its end; the text it gave, and its epoch."""
    text = ""
    with trio.fail_after(30):
        async with client.watch(job_id) as batches:
            async for batch in batches:
                text += batch.text
                last = batch
    assert last.terminal is not None and last.terminal.status == "completed"
    info = await client.get(job_id, include_content=True)
    assert info.job.status == "completed" and info.content == text
    return text, info.job.epoch


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
async def test_a_restarted_sqlite_server_finishes_what_its_last_run_left(tmp_path: Path, sig: int) -> None:
    answer = await undisturbed(lorem_request(LOREM["max_tokens"]))
    store = f"sqlite:///{tmp_path}/jobs.db"
    with server(store, "--drain-timeout", "0") as (port, proc):
        async with open_client(f"ws://127.0.0.1:{port}/v1", "tok") as client:
            started = await client.start_job(
                thread_id="t", message_id="m", model="backstream/lorem", messages=MSG, params=LOREM
            )
            seen, _ = await watch_some(client, started.job.job_id, 40)
            proc.send_signal(sig)
            proc.wait()
    assert len(seen.split()) < LOREM["max_tokens"]  # stopped mid-answer
    with server(store) as (port, _):  # the next start continues the job
        async with open_client(f"ws://127.0.0.1:{port}/v1", "tok") as client:
            text, epoch = await wait_completed(client, started.job.job_id)
    assert text == answer and epoch == 2
    # A stop is a hand-off, a kill a crash: only crashes count toward --max-continuations.
    with contextlib.closing(sqlite3.connect(tmp_path / "jobs.db")) as conn:
        [(handoffs,)] = conn.execute("SELECT handoffs FROM jobs").fetchall()
    assert handoffs == (1 if sig == signal.SIGTERM else 0)


async def test_kill_9_with_sqlite_under_the_interrupt_policy(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/jobs.db"
    with server(store, *INTERRUPT) as (port, proc):
        async with open_client(f"ws://127.0.0.1:{port}/v1", "tok") as client:
            started = await client.start_job(
                thread_id="t",
                message_id="m",
                model="backstream/lorem",
                messages=MSG,
                params={"max_tokens": 2000, "tokens_per_s": 50},
            )
            seen, cursor = await watch_some(client, started.job.job_id, 60)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    with server(store, *INTERRUPT) as (port, _):  # the next start of the instance recovers its jobs
        async with open_client(f"ws://127.0.0.1:{port}/v1", "tok") as client:
            await check_recovered(client, started.job.job_id, seen, cursor)


@asynccontextmanager
async def job_on_a_watched_from_b(*flags: str) -> AsyncIterator[tuple[subprocess.Popen[bytes], Client, str]]:
    """Two servers on one Redis prefix (short leases, and ``flags``), a lorem job started
    on A; A's process, a client of B and the job's id. The prefix is deleted after."""
    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    env = {"BACKSTREAM_REDIS_PREFIX": prefix}
    flags = ("--lease-ttl", "1.5", "--lease-renew-interval", "0.3", *flags)
    try:
        with (
            server(redis_url(), *flags, env=env) as (port_a, proc_a),
            server(redis_url(), *flags, env=env) as (port_b, _),
        ):
            async with (
                open_client(f"ws://127.0.0.1:{port_a}/v1", "tok") as a,
                open_client(f"ws://127.0.0.1:{port_b}/v1", "tok") as b,
            ):
                started = await a.start_job(
                    thread_id="t", message_id="m", model="backstream/lorem", messages=MSG, params=LOREM
                )
                yield proc_a, b, started.job.job_id
    finally:
        await delete_prefix(prefix)


async def test_kill_9_with_redis_is_continued_by_another_instance() -> None:
    """The job goes on on the other instance and completes; its watcher there goes on
    across the takeover: the batches join with no gap, but for one cut back to what was
    durable if the watcher was shown more (the client applies it), and its content is the
    answer."""
    answer = await undisturbed(lorem_request(LOREM["max_tokens"]))
    async with job_on_a_watched_from_b() as (proc_a, b, job_id):
        seqs = []
        async with b.watch(job_id) as batches:  # watched live through the other instance
            async for batch in batches:
                seqs.append((batch.from_seq, batch.to_seq))
                if batch.to_seq >= 40 and proc_a.poll() is None:
                    proc_a.send_signal(signal.SIGKILL)
                last = batch
            text = batches.content
        cuts = [y for x, y in itertools.pairwise(seqs) if y[0] != x[1] + 1]
        assert all(cut[0] == cut[1] + 1 for cut in cuts) and len(cuts) <= 1, seqs
        assert proc_a.poll() is not None  # killed mid-answer
        assert last.terminal is not None and last.terminal.status == "completed"
        assert last.epoch == 2  # the batch with the end carries the new epoch
        info = await b.get(job_id, include_content=True)
        assert info.job.status == "completed" and info.job.epoch == 2
        assert info.content == text == answer


async def test_kill_9_rewinds_a_remote_watcher_that_saw_entries_only_announced() -> None:
    """Commits far apart (``--commit-ms``): the watcher on B is shown entries that A only
    announced, then A dies. B takes the job over from what was durable, and the watch is
    rewound there (a batch holding a ``rewind``), never handed the new epoch's entries
    after the lost ones: its content is the undisturbed answer."""
    answer = await undisturbed(lorem_request(LOREM["max_tokens"]))
    async with job_on_a_watched_from_b("--commit-ms", "60000") as (proc_a, b, job_id):
        rewinds: list[RewindEvent] = []
        with trio.fail_after(30):
            async with b.watch(job_id) as batches:
                async for batch in batches:
                    rewinds += [e for e in batch.events if isinstance(e, RewindEvent)]
                    if batch.to_seq >= 40 and proc_a.poll() is None:
                        proc_a.send_signal(signal.SIGKILL)
                content = batches.content
        assert proc_a.poll() is not None  # killed mid-answer
        [rewind] = rewinds
        assert rewind.to_seq < 40  # back to what A made durable: less than B was shown
        info = await b.get(job_id, include_content=True)
        assert info.job.status == "completed" and info.job.epoch == 2
        assert info.content == content == answer


async def test_workers_share_one_port() -> None:
    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    port = free_port()
    parent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backstream",
            "serve",
            "--port",
            str(port),
            "--workers",
            "2",
            "--token",
            "tok=alice",
            "--store",
            redis_url(),
            "--log-level",
            "warning",
        ],
        env={**os.environ, "BACKSTREAM_REDIS_PREFIX": prefix},
    )
    try:
        wait_for_port(port)
        await trio.sleep(1.0)  # both workers listening
        with open(f"/proc/{parent.pid}/task/{parent.pid}/children") as f:
            workers = f.read().split()
        assert len(workers) == 2
        for _ in range(6):  # the kernel spreads connections over the workers; every one serves
            async with open_client(f"ws://127.0.0.1:{port}/v1", "tok") as client:
                assert (await client.list_jobs()).jobs == []
        async with (
            open_client(f"ws://127.0.0.1:{port}/v1", "tok") as first,
            open_client(f"ws://127.0.0.1:{port}/v1", "tok") as second,
        ):
            started = await first.start_job(
                thread_id="t",
                message_id="m",
                model="backstream/lorem",
                messages=MSG,
                params={"max_tokens": 30, "tokens_per_s": 100},
            )
            text = ""
            async with second.watch(started.job.job_id) as batches:
                async for batch in batches:
                    text += batch.text
            assert len(text.split()) == 30
            assert (await second.get(started.job.job_id)).job.status == "completed"
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=20) == 0
    finally:
        if parent.poll() is None:
            parent.kill()
        await delete_prefix(prefix)
