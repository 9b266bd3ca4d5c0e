"""The SQLite store's group commit: many jobs' commits in one transaction, a failing group
fails its own commits and no others, and a ``serve`` killed with SIGKILL keeps every
committed transaction."""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from backstream.actors.ports import LogBehindError
from backstream.client import open_client
from backstream.protocol.errors import UnavailableError
from backstream.protocol.records import events_from_json
from backstream.runtime.stores.sqlite import SqliteStore
from tests.test_recovery import MSG, server
from tests.test_store_conformance import progress, record, texts

JOBS = 40


@pytest.fixture
async def sqlite_store(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    await nursery.start(store.run)
    for i in range(JOBS):
        await store.create_job(record(job_id=f"j_{i}", message_id=f"m{i}"))
    try:
        yield store
    finally:
        await store.aclose()


async def commit_all(
    store: SqliteStore, commits: dict[str, tuple[int, int]]
) -> dict[str, BaseException | None]:
    """Commit ``job_id -> (first seq, last seq)`` from one task per job, all at once; the
    outcome of each (None when it landed)."""
    outcomes: dict[str, BaseException | None] = {}

    async def one(job_id: str, first: int, last: int) -> None:
        words = [f"w{seq} " for seq in range(first, last + 1)]
        try:
            await store.commit(job_id, texts(first, *words), progress(last))
        except Exception as exc:
            outcomes[job_id] = exc
        else:
            outcomes[job_id] = None

    async with trio.open_nursery() as nursery:
        for job_id, (first, last) in commits.items():
            nursery.start_soon(one, job_id, first, last)
    return outcomes


def stored_seqs(path: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return {job_id: seq for job_id, seq in conn.execute("SELECT job_id, seq FROM jobs")}


def add_trigger(path: Path, sql: str) -> None:
    """A trigger in the database file itself (SQLite's own failure paths, nothing mocked)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(sql)
    finally:
        conn.close()


async def test_many_jobs_commits_land_in_fewer_transactions(sqlite_store: SqliteStore) -> None:
    before = sqlite_store.statistics()
    outcomes = await commit_all(sqlite_store, {f"j_{i}": (1, 3) for i in range(JOBS)})
    assert outcomes == {f"j_{i}": None for i in range(JOBS)}
    after = sqlite_store.statistics()
    assert after.commits - before.commits == JOBS
    assert after.transactions - before.transactions <= 2  # all of them waited together
    assert after.largest_group >= JOBS // 2
    for i in range(JOBS):
        assert [e.seq for e in await sqlite_store.read(f"j_{i}", 0, 10)] == [1, 2, 3]


async def test_a_failing_group_fails_its_commits_and_no_others(
    sqlite_store: SqliteStore, tmp_path: Path
) -> None:
    first = await commit_all(sqlite_store, {f"j_{i}": (1, 3) for i in range(JOBS)})
    assert set(first.values()) == {None}
    # An error that rolls the whole transaction back, raised by one job's update.
    add_trigger(
        tmp_path / "jobs.db",
        "CREATE TRIGGER gone BEFORE UPDATE OF seq ON jobs WHEN NEW.job_id = 'j_7' AND NEW.seq = 6 "
        "BEGIN SELECT RAISE(ROLLBACK, 'the disk went away'); END",
    )
    failed = sqlite_store.statistics().groups_failed
    second = await commit_all(sqlite_store, {f"j_{i}": (4, 6) for i in range(JOBS)})
    assert all(isinstance(exc, UnavailableError) for exc in second.values()), second
    assert "the disk went away" in str(second["j_7"])
    assert sqlite_store.statistics().groups_failed == failed + 1
    assert set(stored_seqs(tmp_path / "jobs.db").values()) == {3}  # nothing of the group
    # The next group goes through, the culprit aside; the first group's commits stay.
    third = await commit_all(sqlite_store, {f"j_{i}": (4, 6) for i in range(JOBS) if i != 7})
    assert set(third.values()) == {None}
    seqs = stored_seqs(tmp_path / "jobs.db")
    assert seqs.pop("j_7") == 3 and set(seqs.values()) == {6}
    assert [e.seq for e in await sqlite_store.read("j_3", 0, 10)] == [1, 2, 3, 4, 5, 6]


async def test_a_refused_commit_fails_alone_within_its_group(
    sqlite_store: SqliteStore, tmp_path: Path
) -> None:
    add_trigger(
        tmp_path / "jobs.db",
        "CREATE TRIGGER refuse BEFORE UPDATE OF seq ON jobs WHEN NEW.job_id = 'j_2' "
        "BEGIN SELECT RAISE(ABORT, 'refused by a constraint'); END",
    )
    commits = {f"j_{i}": (1, 3) for i in range(JOBS)}
    commits["j_5"] = (2, 3)  # a gap: the store holds nothing before seq 2
    outcomes = await commit_all(sqlite_store, commits)
    assert isinstance(outcomes.pop("j_2"), UnavailableError)
    assert isinstance(outcomes.pop("j_5"), LogBehindError)
    assert set(outcomes.values()) == {None}
    seqs = stored_seqs(tmp_path / "jobs.db")
    assert seqs.pop("j_2") == 0 and seqs.pop("j_5") == 0 and set(seqs.values()) == {3}
    assert await sqlite_store.read("j_2", 0, 10) == []  # its log rows went with its update
    assert sqlite_store.statistics().transactions >= 1 and sqlite_store.statistics().groups_failed == 0


def committed_logs(path: Path) -> dict[str, str]:
    """Each job's stored log text, read by another connection (so: committed)."""
    logs: dict[str, str] = {}
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT job_id, events FROM log ORDER BY job_id, first_seq")
        for job_id, events in rows:
            logs[job_id] = logs.get(job_id, "") + "".join(
                getattr(event, "text", "") for event in events_from_json(events)
            )
    return logs


async def test_kill_9_keeps_every_committed_transaction(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    with server(f"sqlite:///{path}", "--max-jobs-per-user", "20") as (port, proc):
        async with open_client(f"ws://127.0.0.1:{port}/v1", "tok") as client:
            for i in range(20):
                await client.start_job(
                    thread_id="t",
                    message_id=f"m{i}",
                    model="backstream/lorem",
                    messages=MSG,
                    params={"max_tokens": 5000, "tokens_per_s": 100},
                )
            with trio.fail_after(20):
                while True:  # until every job has flushed a few times
                    seen = committed_logs(path)
                    if len(seen) == 20 and min(len(text.split()) for text in seen.values()) >= 20:
                        break
                    await trio.sleep(0.05)
            seen_seqs = stored_seqs(path)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    after = committed_logs(path)
    after_seqs = stored_seqs(path)
    for job_id, text in seen.items():
        assert after[job_id].startswith(text)
        assert after_seqs[job_id] >= seen_seqs[job_id]
