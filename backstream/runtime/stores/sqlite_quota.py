"""The SQLite store's quota of stored bytes: what each job counts (``jobs.stored_bytes``)
and each user's sum (``user_stored_bytes``), changed only inside the store's own write
transactions, so that the check, the charge and the release are atomic with the create,
the terminal commit and the delete they belong to.

A job counts its request from its create on (``request_bytes``) and its log, too, from
its terminal commit on: the request's JSON and the log's batches as stored, in UTF-8
(``length(CAST(... AS BLOB))``), which is what ``request_bytes`` and ``log_bytes``
measure. Every call runs on the writer's connection, within a transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from backstream.runtime.stores.shared import quota_exceeded

__all__ = ["charge_at_create", "charge_at_end", "release", "stored_bytes"]


def stored_bytes(conn: sqlite3.Connection, user: str) -> int:
    row = conn.execute("SELECT bytes FROM user_stored_bytes WHERE user = ?", (user,)).fetchone()
    return int(row[0]) if row else 0


def _add(conn: sqlite3.Connection, user: str, delta: int) -> None:
    if delta:
        conn.execute(
            "INSERT INTO user_stored_bytes (user, bytes) VALUES (?, ?) "
            "ON CONFLICT (user) DO UPDATE SET bytes = bytes + excluded.bytes",
            (user, delta),
        )
        conn.execute("DELETE FROM user_stored_bytes WHERE user = ? AND bytes = 0", (user,))


def charge_at_create(
    conn: sqlite3.Connection, user: str, job_id: str, cost: int, max_stored_bytes: int | None
) -> None:
    """Charge a job just inserted its request's ``cost``; raises ``QuotaExceededError``
    (the caller rolls the insert back) if that takes ``user`` past ``max_stored_bytes``."""
    stored = stored_bytes(conn, user)
    if max_stored_bytes is not None and stored + cost > max_stored_bytes:
        raise quota_exceeded(stored, cost, max_stored_bytes)
    conn.execute("UPDATE jobs SET stored_bytes = ? WHERE job_id = ?", (cost, job_id))
    _add(conn, user, cost)


def charge_at_end(conn: sqlite3.Connection, job_id: str) -> None:
    """The job ended: it counts its request and its whole log from now on (the same
    charge again for a retried terminal commit)."""
    row = conn.execute(
        "SELECT jobs.user, jobs.stored_bytes, length(CAST(job_requests.request AS BLOB)) "
        "FROM jobs JOIN job_requests USING (job_id) WHERE jobs.job_id = ?",
        (job_id,),
    ).fetchone()
    if row is None:
        return
    user, charged, request = str(row[0]), int(row[1]), int(row[2])
    (logged,) = conn.execute(
        "SELECT coalesce(sum(length(CAST(events AS BLOB))), 0) FROM log WHERE job_id = ?", (job_id,)
    ).fetchone()
    charge = request + int(logged)
    conn.execute("UPDATE jobs SET stored_bytes = ? WHERE job_id = ?", (charge, job_id))
    _add(conn, user, charge - charged)


def release(conn: sqlite3.Connection, job_ids: Sequence[str]) -> None:
    """Release what these jobs count, in the transaction that deletes them (so never twice)."""
    for job_id in job_ids:
        row = conn.execute("SELECT user, stored_bytes FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is not None:
            _add(conn, str(row[0]), -int(row[1]))
