"""The SQLite store's schema: its migrations, and how a job record maps to its rows.

A job is a small row of ``jobs`` (names, status, progress: what a commit updates)
and its request in ``job_requests``, written once at creation.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterable, Sequence

from backstream.protocol.events import LIVE_STATUSES
from backstream.protocol.lifecycle import sql_terminal_list
from backstream.protocol.records import JobRecord, record_from_dict, record_to_dict

__all__ = [
    "COLUMNS",
    "MIGRATIONS",
    "PROGRESS_COLUMNS",
    "SELECT_JOB",
    "UPDATE_PROGRESS",
    "column_value",
    "migrate",
    "record_from_row",
    "row_values",
    "sql_status_list",
]

log = logging.getLogger("backstream.sqlite")


def sql_status_list(statuses: Iterable[str]) -> str:
    """Statuses as an SQL list literal, sorted, as ``sql_terminal_list`` spells the terminal ones."""
    return "(" + ", ".join(f"'{status}'" for status in sorted(statuses)) + ")"


# A migration runs once per database, at the version it brings; changing a past one's text
# changes only databases created afterwards. Version 1's ``jobs_active`` index is built
# from ``LIVE_STATUSES`` for that reason alone: version 3 drops it with its table (and
# indexes ``jobs_live`` instead), so no database at the current version holds it.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        f"""
        CREATE TABLE jobs (
            job_id TEXT PRIMARY KEY,
            user TEXT NOT NULL,
            thread_id TEXT NOT NULL,
            message_id TEXT NOT NULL,
            status TEXT NOT NULL,
            seq INTEGER NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL,
            owner TEXT,
            record TEXT NOT NULL,
            UNIQUE (user, message_id)
        );
        CREATE INDEX jobs_by_user ON jobs (user, created_at DESC);
        CREATE INDEX jobs_by_thread ON jobs (user, thread_id, created_at DESC);
        CREATE INDEX jobs_by_expiry ON jobs (expires_at) WHERE expires_at IS NOT NULL;
        CREATE INDEX jobs_active ON jobs (status) WHERE status IN {sql_status_list(LIVE_STATUSES)};
        CREATE TABLE log (
            job_id TEXT NOT NULL,
            first_seq INTEGER NOT NULL,
            last_seq INTEGER NOT NULL,
            events TEXT NOT NULL,
            PRIMARY KEY (job_id, first_seq)
        ) WITHOUT ROWID;
        """,
    ),
    (
        2,
        """
        CREATE TABLE notifications (
            notification_id TEXT PRIMARY KEY,
            user TEXT NOT NULL,
            type TEXT NOT NULL,
            job_id TEXT NOT NULL,
            thread_id TEXT NOT NULL,
            title TEXT NOT NULL,
            body TEXT NOT NULL,
            created_at REAL NOT NULL,
            read INTEGER NOT NULL DEFAULT 0,
            UNIQUE (job_id, type)
        );
        CREATE INDEX notifications_by_user ON notifications (user, created_at DESC);
        CREATE TABLE muted_threads (
            user TEXT NOT NULL, thread_id TEXT NOT NULL, PRIMARY KEY (user, thread_id)
        )
        """,
    ),
    (
        3,
        # The request is written once, in a table of its own; a commit updates the progress
        # columns of a small row and never rewrites the request.
        f"""
        CREATE TABLE jobs_v3 (
            job_id TEXT PRIMARY KEY,
            user TEXT NOT NULL,
            thread_id TEXT NOT NULL,
            message_id TEXT NOT NULL,
            status TEXT NOT NULL,
            seq INTEGER NOT NULL,
            epoch INTEGER NOT NULL,
            content_length INTEGER NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            finished_at REAL,
            error TEXT,
            usage TEXT,
            expires_at REAL,
            abort_requested INTEGER NOT NULL DEFAULT 0,
            owner TEXT,
            lease_until REAL,
            UNIQUE (user, message_id)
        );
        CREATE TABLE job_requests (job_id TEXT PRIMARY KEY, request TEXT NOT NULL);
        INSERT INTO jobs_v3 SELECT job_id, user, thread_id, message_id, status, seq,
            json_extract(record, '$.epoch'), json_extract(record, '$.content_length'), created_at,
            json_extract(record, '$.updated_at'), json_extract(record, '$.finished_at'),
            json_extract(record, '$.error'), json_extract(record, '$.usage'), expires_at,
            json_extract(record, '$.abort_requested'), owner, json_extract(record, '$.lease_until')
            FROM jobs;
        INSERT INTO job_requests SELECT job_id, json_extract(record, '$.request') FROM jobs;
        DROP TABLE jobs;
        ALTER TABLE jobs_v3 RENAME TO jobs;
        CREATE INDEX jobs_by_user ON jobs (user, created_at DESC);
        CREATE INDEX jobs_by_thread ON jobs (user, thread_id, created_at DESC);
        CREATE INDEX jobs_by_expiry ON jobs (expires_at) WHERE expires_at IS NOT NULL;
        CREATE INDEX jobs_live ON jobs (status) WHERE status NOT IN {sql_terminal_list()}
        """,
    ),
    (
        4,
        # A terminal commit leaves its effects here, in its own transaction; the dispatcher
        # claims them (a lease: claimed_until) and deletes them once carried out.
        """
        CREATE TABLE outbox (
            job_id TEXT PRIMARY KEY,
            entry TEXT NOT NULL,
            claimed_by TEXT,
            claimed_until REAL NOT NULL DEFAULT 0
        );
        CREATE INDEX outbox_by_claim ON outbox (claimed_until)
        """,
    ),
    (
        5,
        # The quota of stored bytes (``sqlite_quota``): what each job counts, and each user's
        # sum. Jobs of older versions count nothing until their terminal commit charges them.
        """
        ALTER TABLE jobs ADD COLUMN stored_bytes INTEGER NOT NULL DEFAULT 0;
        CREATE TABLE user_stored_bytes (user TEXT PRIMARY KEY, bytes INTEGER NOT NULL) WITHOUT ROWID
        """,
    ),
    (
        6,
        # Webhook deliveries (``sqlite_webhooks``): one row per event and endpoint, recorded
        # before the outbox entry that asked for it is deleted; claimed with a lease.
        """
        CREATE TABLE webhooks (
            delivery_id TEXT PRIMARY KEY,
            endpoint TEXT NOT NULL,
            delivery TEXT NOT NULL,
            next_at REAL NOT NULL,
            dead INTEGER NOT NULL DEFAULT 0,
            dead_at REAL,
            claimed_by TEXT,
            claimed_until REAL NOT NULL DEFAULT 0
        );
        CREATE INDEX webhooks_due ON webhooks (endpoint, next_at) WHERE dead = 0;
        CREATE INDEX webhooks_dead ON webhooks (dead_at) WHERE dead = 1;
        CREATE TABLE webhook_endpoints_disabled (endpoint TEXT PRIMARY KEY, reason TEXT NOT NULL)
        """,
    ),
    (
        7,
        # Where each earlier epoch of a job ended (``JobRecord.epoch_ends``), so a reader of
        # an epoch before a takeover goes on if what it read is still in the log; and how
        # many takeovers followed a clean stop (``handoffs``: not counted as crashes).
        """
        ALTER TABLE jobs ADD COLUMN epoch_ends TEXT NOT NULL DEFAULT '[]';
        ALTER TABLE jobs ADD COLUMN handoffs INTEGER NOT NULL DEFAULT 0
        """,
    ),
    (
        8,
        # Durable streams (``streams_sqlite``): each stream's state as JSON, its messages by
        # end position, each user's streams and bytes.
        """
        CREATE TABLE ds_streams (
            stream_key TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            stored_bytes INTEGER NOT NULL,
            deadline REAL,
            state TEXT NOT NULL
        );
        CREATE INDEX ds_streams_by_deadline ON ds_streams (deadline) WHERE deadline IS NOT NULL;
        CREATE TABLE ds_usage (
            owner TEXT PRIMARY KEY,
            streams INTEGER NOT NULL,
            bytes INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE ds_messages (
            stream_key TEXT NOT NULL,
            end_pos INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (stream_key, end_pos)
        )
        """,
    ),
)

COLUMNS = (
    "job_id",
    "user",
    "thread_id",
    "message_id",
    "status",
    "seq",
    "epoch",
    "content_length",
    "created_at",
    "updated_at",
    "finished_at",
    "error",
    "usage",
    "expires_at",
    "abort_requested",
    "owner",
    "lease_until",
    "handoffs",
    "epoch_ends",
)
JSON_COLUMNS = frozenset({"error", "usage", "epoch_ends"})
SELECT_JOB = (
    "SELECT " + ", ".join(f"jobs.{c}" for c in COLUMNS) + ", job_requests.request "
    "FROM jobs JOIN job_requests USING (job_id)"
)
PROGRESS_COLUMNS = (
    "status",
    "seq",
    "content_length",
    "updated_at",
    "finished_at",
    "error",
    "usage",
    "expires_at",
)
UPDATE_PROGRESS = "UPDATE jobs SET " + ", ".join(f"{c} = ?" for c in PROGRESS_COLUMNS) + " WHERE job_id = ?"


def column_value(name: str, value: object) -> object:
    if name in JSON_COLUMNS:
        return None if value is None else json.dumps(value, separators=(",", ":"))
    if name == "abort_requested":
        return int(bool(value))
    return value


def row_values(record: JobRecord) -> tuple[object, ...]:
    data = record_to_dict(record)
    return tuple(column_value(name, data[name]) for name in COLUMNS)


def record_from_row(row: Sequence[object]) -> JobRecord:
    data: dict[str, object] = dict(zip(COLUMNS, row[:-1], strict=True))
    for name in JSON_COLUMNS:
        value = data[name]
        data[name] = None if value is None else json.loads(str(value))
    data["abort_requested"] = bool(data["abort_requested"])
    data["request"] = json.loads(str(row[-1]))
    return record_from_dict(data)


def migrate(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    current = row[0] or 0
    for version, sql in MIGRATIONS:
        if version <= current:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(str.strip, sql.split(";")):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("sqlite schema migrated to version %d", version)
