"""The SQLite schema migrates at open, keeping every job a file of an older version holds."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import attrs
import trio

from backstream.protocol.events import ErrorInfo, StatusEvent, TextEvent
from backstream.protocol.records import JobProgress, JobRecord, JobRequest, events_to_json, record_to_dict
from backstream.runtime.stores.sqlite import SqliteStore
from backstream.runtime.stores.sqlite_schema import MIGRATIONS


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
        nursery.cancel_scope.cancel()
    await store.aclose()
    with sqlite3.connect(tmp_path / "old.db") as conn:
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == len(MIGRATIONS)
