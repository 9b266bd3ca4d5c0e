"""The SQLite store's notifications and mutes: in the file (presence stays in the process)."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from backstream.protocol.records import NotificationRecord
from backstream.runtime.stores.local_notifications import NotificationShelf

__all__ = ["SqliteShelf"]

OnConnection = Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]]


class SqliteShelf(NotificationShelf):
    """Each step one statement or one transaction, on the store's writer (or reader)."""

    def __init__(self, write: OnConnection, read: OnConnection) -> None:
        self._write_fn = write
        self._read_fn = read

    async def keep(self, n: NotificationRecord, max_per_user: int) -> bool:
        def insert(conn: sqlite3.Connection) -> bool:
            conn.execute("BEGIN IMMEDIATE")
            try:
                muted = conn.execute(
                    "SELECT 1 FROM muted_threads WHERE user = ? AND thread_id = ?", (n.user, n.thread_id)
                ).fetchone()
                created = False
                if not muted:
                    created = (
                        conn.execute(
                            "INSERT OR IGNORE INTO notifications (notification_id, user, type, job_id, "
                            "thread_id, title, body, created_at, read) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
                            (
                                n.notification_id,
                                n.user,
                                n.type,
                                n.job_id,
                                n.thread_id,
                                n.title,
                                n.body,
                                n.created_at,
                            ),
                        ).rowcount
                        == 1
                    )
                if created:  # the oldest go first
                    conn.execute(
                        "DELETE FROM notifications WHERE user = ? AND notification_id NOT IN (SELECT "
                        "notification_id FROM notifications WHERE user = ? ORDER BY created_at DESC LIMIT ?)",
                        (n.user, n.user, max_per_user),
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return created

        return bool(await self._write_fn(insert))

    async def list(self, user: str, *, unread_only: bool, limit: int) -> tuple[list[NotificationRecord], int]:
        def select(conn: sqlite3.Connection) -> tuple[list[NotificationRecord], int]:
            sql = (
                "SELECT notification_id, user, type, job_id, thread_id, title, body, created_at, read "
                "FROM notifications WHERE user = ?"
            )
            if unread_only:
                sql += " AND read = 0"
            rows = conn.execute(sql + " ORDER BY created_at DESC LIMIT ?", (user, limit)).fetchall()
            unread = conn.execute("SELECT count(*) FROM notifications WHERE user = ? AND read = 0", (user,))
            items = [
                NotificationRecord(
                    notification_id=row[0],
                    user=row[1],
                    type=row[2],
                    job_id=row[3],
                    thread_id=row[4],
                    title=row[5],
                    body=row[6],
                    created_at=row[7],
                    read=bool(row[8]),
                )
                for row in rows
            ]
            return items, int(unread.fetchone()[0])

        items, unread = await self._read_fn(select)
        return items, int(unread)

    async def mark_read(self, user: str, ids: Sequence[str], *, everything: bool) -> int:
        def update(conn: sqlite3.Connection) -> int:
            if everything:
                conn.execute("UPDATE notifications SET read = 1 WHERE user = ?", (user,))
            else:
                conn.executemany(
                    "UPDATE notifications SET read = 1 WHERE user = ? AND notification_id = ?",
                    [(user, i) for i in ids],
                )
            return int(
                conn.execute(
                    "SELECT count(*) FROM notifications WHERE user = ? AND read = 0", (user,)
                ).fetchone()[0]
            )

        return int(await self._write_fn(update))

    async def set_muted(self, user: str, thread_id: str, muted: bool) -> None:
        sql = (
            "INSERT OR IGNORE INTO muted_threads (user, thread_id) VALUES (?, ?)"
            if muted
            else "DELETE FROM muted_threads WHERE user = ? AND thread_id = ?"
        )
        await self._write_fn(lambda conn: conn.execute(sql, (user, thread_id)))
