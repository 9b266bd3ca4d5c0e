"""A SQLite file serves one process: a second store or server on it stops with a clear
error before it touches a job, and a server that cannot listen never opens its store."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from backstream.client import open_client
from backstream.protocol.events import StatusEvent
from backstream.runtime.stores.sqlite import SqliteStore, StoreInUseError, lock_path
from bench._procs import free_port, wait_for_port
from tests.test_store_conformance import progress, record, texts

BACKSTREAM = [sys.executable, "-m", "backstream"]
MSG = [{"role": "user", "content": "x"}]


async def test_a_second_store_on_the_file_is_refused_and_the_first_keeps_its_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    first = SqliteStore("data/jobs.db")  # relative: the error names the absolute path
    await first.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        await first.create_job(record(owner="i_a"))
        await first.commit("j_1", [StatusEvent(seq=1, status="running"), *texts(2, "kept")], progress(2))
        second = SqliteStore(tmp_path / "data" / "jobs.db")
        with pytest.raises(StoreInUseError) as refused:
            await second.open()
        assert f"another process holds {tmp_path}/data/jobs.db " in str(refused.value)
        held = await first.get_job("j_1")
        assert held is not None
        assert (held.status, held.seq, held.owner, held.epoch) == ("running", 2, "i_a", 1)
        await first.commit("j_1", texts(3, " still"), progress(3))  # the first writes on
        assert [e.seq for e in await first.read("j_1", 0, 10)] == [1, 2, 3]
        nursery.cancel_scope.cancel()
    await first.aclose()
    assert lock_path(tmp_path / "data" / "jobs.db").exists()
    again = SqliteStore(tmp_path / "data" / "jobs.db")  # closing released the lock
    await again.open()
    try:
        held = await again.get_job("j_1")
        assert held is not None and held.seq == 3
    finally:
        await again.aclose()


def test_a_store_held_by_another_process_is_refused(tmp_path: Path) -> None:
    """The lock holds across processes (``flock`` on ``PATH.lock``)."""
    path = tmp_path / "jobs.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"

        async def second() -> None:
            with pytest.raises(StoreInUseError, match=f"another process holds {path} "):
                await SqliteStore(path).open()

        trio.run(second)
    finally:
        holder.kill()
        holder.wait()

    async def after_the_holder_died() -> None:  # the OS released the lock (SIGKILL)
        store = SqliteStore(path)
        await store.open()
        await store.aclose()

    trio.run(after_the_holder_died)


HOLD = """
import sys, trio
from backstream.runtime.stores.sqlite import SqliteStore

async def main():
    store = SqliteStore(sys.argv[1])
    await store.open()
    print("open", flush=True)
    await trio.sleep_forever()

trio.run(main)
"""


def start_server(tmp_path: Path, port: int, store: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [*BACKSTREAM, "serve", "--port", str(port), "--token", "tok=alice", "--store", store],
            cwd=tmp_path,
            stderr=out,
        )


def run_serve(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BACKSTREAM, "serve", "--token", "tok=alice", "--log-level", "warning", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_for_line(log: Path, start: str) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if f" {start}" in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no line {start!r} in {log.read_text()}")


async def test_a_second_server_on_the_file_exits_and_the_first_job_completes(tmp_path: Path) -> None:
    port = free_port()
    server = start_server(tmp_path, port, "sqlite:///rel/jobs.db", tmp_path / "first.log")
    try:
        wait_for_port(port)
        store_line = wait_for_line(tmp_path / "first.log", "store:")
        assert store_line.endswith(f"store: sqlite:///rel/jobs.db (file {tmp_path}/rel/jobs.db)")
        async with open_client(f"ws://127.0.0.1:{port}/v1", "tok") as client:
            started = await client.start_job(
                thread_id="t",
                message_id="m",
                model="backstream/lorem",
                messages=MSG,
                params={"max_tokens": 60, "tokens_per_s": 20},  # runs for 3 s
            )
            job_id = started.job.job_id
            second = await trio.to_thread.run_sync(
                run_serve, tmp_path, "--port", str(free_port()), "--store", "sqlite:///rel/jobs.db"
            )
            assert second.returncode == 1 and "Traceback" not in second.stderr
            [line] = second.stderr.strip().splitlines()
            assert line == (
                f"backstream serve: cannot open the store sqlite:///rel/jobs.db: another process "
                f"holds {tmp_path}/rel/jobs.db (its lock {tmp_path}/rel/jobs.db.lock); a SQLite "
                "store serves one process: stop the other or share a Redis store"
            )
            text = ""
            async with client.watch(job_id) as batches:
                async for batch in batches:
                    text += batch.text
                    last = batch
            assert last.terminal is not None and last.terminal.status == "completed"
            info = await client.get(job_id, include_content=True)
            assert (info.job.status, info.job.epoch) == ("completed", 1)
            assert info.content == text and len(text.split()) == 60
            assert text.split()[:3] == ["lorem", "ipsum", "dolor"]
    finally:
        server.kill()
        server.wait()


def test_a_second_server_that_cannot_listen_never_opens_its_store(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_serve(tmp_path, "--port", str(port), "--store", "sqlite:///other/jobs.db")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"backstream serve: --port {port}: cannot listen on 127.0.0.1:{port}: ")
    assert not (tmp_path / "other").exists()  # neither the database nor its lock
