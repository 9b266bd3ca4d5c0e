"""The SQLite schema migrates at open, keeping every job a file of an older version holds."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import attrs
import trio

from backstream.protocol.events import LIVE_STATUSES, TERMINAL_STATUSES, ErrorInfo, StatusEvent, TextEvent
from backstream.protocol.records import (
    JobProgress,
    JobRecord,
    JobRequest,
    events_to_json,
    log_bytes,
    record_to_dict,
    request_bytes,
)
from backstream.runtime.stores.sqlite import SqliteStore
from backstream.runtime.stores.sqlite_schema import MIGRATIONS, migrate


def version_2_file(path: Path, records: list[JobRecord]) -> None:
    """A file as version 2 of the schema wrote it: the whole record as JSON in one column."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for version, sql in MIGRATIONS[:2]:
        for statement in filter(str.strip, sql.split(";")):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
    for r in records:
        conn.execute(
            "INSERT INTO jobs (job_id, user, thread_id, message_id, status, seq, created_at, expires_at, "
            "owner, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                r.job_id,
                r.user,
                r.thread_id,
                r.message_id,
                r.status,
                r.seq,
                r.created_at,
                r.expires_at,
                r.owner,
                json.dumps(record_to_dict(r)),
            ),
        )
    conn.execute(
        "INSERT INTO log (job_id, first_seq, last_seq, events) VALUES (?, 1, 2, ?)",
        ("j_run", events_to_json([StatusEvent(seq=1, status="running"), TextEvent(seq=2, text="hé")])),
    )
    conn.close()


async def test_version_2_files_migrate_with_their_jobs(tmp_path: Path) -> None:
    base = JobRecord(
        job_id="j_run",
        user="zoë",
        thread_id="t",
        message_id="m1",
        request=JobRequest(
            "gpt-x", ({"role": "user", "content": "hi"},), {"temperature": 0.2}, ("calculate",)
        ),
        status="running",
        seq=2,
        epoch=1,
        content_length=2,
        created_at=10.0,
        updated_at=11.0,
        owner="i_a",
        lease_until=25.0,
    )
    done = attrs.evolve(
        base,
        job_id="j_done",
        message_id="m2",
        status="failed",
        seq=0,
        epoch=2,
        finished_at=12.0,
        error=ErrorInfo("upstream_error", "bad gateway", http_status=502),
        usage={"prompt_tokens": 3},
        expires_at=99.0,
        abort_requested=True,
        lease_until=None,
    )
    version_2_file(tmp_path / "old.db", [base, done])
    store = SqliteStore(tmp_path / "old.db")
    await store.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        assert await store.get_job("j_run") == base
        assert await store.get_job("j_done") == done
        assert {r.job_id for r in await store.list_jobs("zoë")} == {"j_run", "j_done"}
        await store.commit("j_run", [TextEvent(seq=3, text="!")], JobProgress("running", 3, 3, 12.0))
        assert [e.seq for e in await store.read("j_run", 0, 10)] == [1, 2, 3]
        # Jobs of older files count nothing against the quota until their end charges them.
        assert await store.stored_bytes("zoë") == 0
        assert await store.delete_expired(100.0) == ["j_done"]  # released nothing: never below 0
        assert await store.stored_bytes("zoë") == 0
        end = [StatusEvent(seq=4, status="completed")]
        await store.commit("j_run", end, JobProgress("completed", 4, 3, 13.0, finished_at=13.0, expires_at=200.0))
        assert await store.stored_bytes("zoë") > request_bytes(base.request) + log_bytes(end)
        assert await store.delete_expired(200.0) == ["j_run"]
        assert await store.stored_bytes("zoë") == 0
        nursery.cancel_scope.cancel()
    await store.aclose()
    with sqlite3.connect(tmp_path / "old.db") as conn:
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == MIGRATIONS[-1][0]


VERSION_1_LIVE_INDEX = (
    "CREATE INDEX jobs_active ON jobs (status) WHERE status IN ('running', 'awaiting_approval')"
)
"""Version 1's index of live jobs as files of that version hold it, written out by hand
before the migration built it from ``LIVE_STATUSES``."""


def _statements(sql: str) -> list[str]:
    return [statement.strip() for statement in sql.split(";") if statement.strip()]


def _schema(path: Path) -> list[tuple[str, str, str, str | None]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
        ).fetchall()


def test_version_1_indexes_the_live_statuses() -> None:
    (index,) = [s for s in _statements(MIGRATIONS[0][1]) if s.startswith("CREATE INDEX jobs_active")]
    listed = index.partition(" IN ")[2].strip("()").replace("'", "").split(", ")
    assert set(listed) == LIVE_STATUSES and len(listed) == len(LIVE_STATUSES)


def test_a_version_1_file_migrates_to_the_schema_of_a_new_one(tmp_path: Path) -> None:
    """Building version 1's index from the constant changed no database: the file an older
    release created (with the index spelled out) ends with the same schema as a new one."""
    old = tmp_path / "v1.db"
    with closing(sqlite3.connect(old, isolation_level=None)) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statement in _statements(MIGRATIONS[0][1]):
            conn.execute(VERSION_1_LIVE_INDEX if "jobs_active" in statement else statement)
        conn.execute("INSERT INTO schema_version (version) VALUES (1)")
        assert conn.execute("SELECT sql FROM sqlite_master WHERE name = 'jobs_active'").fetchone() == (
            VERSION_1_LIVE_INDEX,
        )
        migrate(conn)
    new = tmp_path / "new.db"
    with closing(sqlite3.connect(new, isolation_level=None)) as conn:
        migrate(conn)
    schema = _schema(new)
    assert _schema(old) == schema
    indexes = {name: sql for kind, name, _table, sql in schema if kind == "index"}
    assert "jobs_active" not in indexes  # version 3 dropped it with its table
    live = indexes["jobs_live"]
    assert live is not None
    excluded = live.partition(" NOT IN ")[2].strip().strip("()").replace("'", "").split(", ")
    assert set(excluded) == TERMINAL_STATUSES
