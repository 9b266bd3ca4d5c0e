"""``SqliteStore``: jobs in one SQLite file, for a single server process (the default of ``serve``).

stdlib ``sqlite3`` in WAL mode, on worker threads: one connection writes, one
reads, so reads never wait behind a write transaction. Commits are grouped:
the writer actor takes every commit waiting in its mailbox (at most
``GROUP_LIMIT``) and writes them in one transaction, so a thousand jobs cost
tens of transactions a second, not thousands. The schema carries a version
number and is migrated in order at open.

Durability: ``synchronous=NORMAL`` in WAL mode survives a crash of the process
(``kill -9``) with every committed transaction; a power loss may lose the last
ones. A job loses at most its last ``flush_ms`` of output when its process dies.
"""

from __future__ import annotations

import json
import logging
import pathlib
import sqlite3
from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeVar

import attrs
import trio

from backstream.actors.ports import Store
from backstream.protocol.errors import UnavailableError
from backstream.protocol.events import LogEvent, StatusEvent
from backstream.protocol.records import (
    JobProgress,
    JobRecord,
    NotificationRecord,
    SharedCapacity,
    events_from_json,
    events_to_json,
    record_from_dict,
    record_to_dict,
)
from backstream.runtime.stores.local_notifications import LocalNotifications

__all__ = ["MIGRATIONS", "SqliteStore"]

log = logging.getLogger("backstream.sqlite")

T = TypeVar("T")

MAILBOX_SIZE = 4096
"""Commits waiting for the writer; when full, committing jobs wait."""
GROUP_LIMIT = 512
"""Commits written in one transaction at most."""

MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
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
        CREATE INDEX jobs_active ON jobs (status) WHERE status IN ('running', 'awaiting_approval');
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
)


@attrs.define
class _Commit:
    job_id: str
    entries: Sequence[LogEvent]
    progress: JobProgress
    done: trio.Event = attrs.Factory(trio.Event)
    error: BaseException | None = None


def path_from_url(url: str) -> pathlib.Path:
    """``sqlite:///./backstream.db`` → ``./backstream.db``; ``sqlite:////tmp/x.db`` → ``/tmp/x.db``."""
    if not url.startswith("sqlite:///"):
        raise ValueError(f"not a sqlite URL: {url!r} (expected sqlite:///PATH)")
    return pathlib.Path(url[len("sqlite:///") :])


class SqliteStore(LocalNotifications, Store):
    """Jobs, logs, notifications and mutes in the file; who watches, in this process (one
    process owns the file)."""

    def __init__(self, path: str | pathlib.Path) -> None:
        self._init_local_notifications()
        self.path = pathlib.Path(path)
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._write_lane = trio.CapacityLimiter(1)
        self._read_lane = trio.CapacityLimiter(1)
        self._mailbox_send, self._mailbox_receive = trio.open_memory_channel[_Commit](MAILBOX_SIZE)
        self._changed: dict[str, trio.lowlevel.ParkingLot] = {}
        self._aborts: dict[str, trio.Event] = {}
        self.transactions = 0  # statistics: write transactions made

    # -- lifecycle ------------------------------------------------------------------

    async def open(self) -> None:
        def connect() -> tuple[sqlite3.Connection, sqlite3.Connection]:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            writer = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            writer.execute("PRAGMA journal_mode=WAL")
            writer.execute("PRAGMA synchronous=NORMAL")
            writer.execute("PRAGMA busy_timeout=5000")
            _migrate(writer)
            reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            reader.execute("PRAGMA busy_timeout=5000")
            return writer, reader

        try:
            self._writer, self._reader = await trio.to_thread.run_sync(connect, limiter=self._write_lane)
        except sqlite3.Error as exc:
            raise UnavailableError(f"cannot open {self.path}: {exc}") from None

    async def aclose(self) -> None:
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        for conn in (writer, reader):
            if conn is not None:
                await trio.to_thread.run_sync(conn.close, limiter=self._write_lane)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer actor: group commits into transactions until cancelled."""
        task_status.started()
        while True:
            first = await self._mailbox_receive.receive()
            group = [first]
            while len(group) < GROUP_LIMIT:
                try:
                    group.append(self._mailbox_receive.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                await self._write(partial(_commit_group, group=group))
                self.transactions += 1
            except BaseException as exc:
                for item in group:
                    item.error = (
                        exc if isinstance(exc, Exception) else UnavailableError("the store was closed")
                    )
                    item.done.set()
                raise
            for item in group:
                item.done.set()
                lot = self._changed.get(item.job_id)
                if lot is not None:
                    lot.unpark_all()

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._on_thread(self._writer, self._write_lane, fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._on_thread(self._reader, self._read_lane, fn)

    @staticmethod
    async def _on_thread(
        conn: sqlite3.Connection | None, lane: trio.CapacityLimiter, fn: Callable[[sqlite3.Connection], T]
    ) -> T:
        """Run ``fn(conn)`` on a worker thread, one at a time per connection. Cancellation
        waits for the statement to finish (a thread cannot be interrupted)."""
        if conn is None:
            raise UnavailableError("the store is closed")
        try:
            return await trio.to_thread.run_sync(fn, conn, limiter=lane)
        except sqlite3.Error as exc:
            raise UnavailableError(f"sqlite: {exc}") from None

    async def ping(self) -> None:
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    # -- jobs -----------------------------------------------------------------------------

    async def create_job(
        self, record: JobRecord, capacity: SharedCapacity | None = None
    ) -> tuple[JobRecord, bool]:
        def insert(conn: sqlite3.Connection) -> tuple[JobRecord, bool]:
            cursor = conn.execute(
                "INSERT INTO jobs (job_id, user, thread_id, message_id, status, seq, created_at, owner, "
                "record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user, message_id) DO NOTHING",
                (
                    record.job_id,
                    record.user,
                    record.thread_id,
                    record.message_id,
                    record.status,
                    record.seq,
                    record.created_at,
                    record.owner,
                    json.dumps(record_to_dict(record)),
                ),
            )
            if cursor.rowcount == 1:
                return record, True
            row = conn.execute(
                "SELECT record FROM jobs WHERE user = ? AND message_id = ?", (record.user, record.message_id)
            ).fetchone()
            return record_from_dict(json.loads(row[0])), False

        return await self._write(insert)

    async def get_job(self, job_id: str) -> JobRecord | None:
        row = await self._read(
            lambda c: c.execute("SELECT record FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        )
        return record_from_dict(json.loads(row[0])) if row else None

    async def find_job(self, user: str, message_id: str) -> JobRecord | None:
        row = await self._read(
            lambda c: c.execute(
                "SELECT record FROM jobs WHERE user = ? AND message_id = ?", (user, message_id)
            ).fetchone()
        )
        return record_from_dict(json.loads(row[0])) if row else None

    async def commit(self, job_id: str, entries: Sequence[LogEvent], progress: JobProgress) -> None:
        item = _Commit(job_id, list(entries), progress)
        await self._mailbox_send.send(item)
        await item.done.wait()
        if item.error is not None:
            raise UnavailableError(f"sqlite commit failed: {item.error}")

    async def read(self, job_id: str, after_seq: int, limit: int) -> list[LogEvent]:
        def select(conn: sqlite3.Connection) -> list[LogEvent]:
            out: list[LogEvent] = []
            rows = conn.execute(
                "SELECT events FROM log WHERE job_id = ? AND last_seq > ? ORDER BY first_seq",
                (job_id, after_seq),
            )
            for (events,) in rows:
                out.extend(ev for ev in events_from_json(events) if ev.seq > after_seq)
                if len(out) >= limit:
                    break
            return out[:limit]

        return await self._read(select)

    async def wait_for_entries(self, job_id: str, after_seq: int) -> None:
        record = await self.get_job(job_id)
        if record is None or record.seq > after_seq:
            return
        lot = self._changed.setdefault(job_id, trio.lowlevel.ParkingLot())
        try:
            await lot.park()
        finally:
            if not lot.statistics().tasks_waiting:
                self._changed.pop(job_id, None)

    async def list_jobs(
        self,
        user: str,
        *,
        thread_id: str | None = None,
        statuses: frozenset[str] | None = None,
        limit: int = 50,
    ) -> list[JobRecord]:
        def select(conn: sqlite3.Connection) -> list[JobRecord]:
            sql, args = "SELECT record FROM jobs WHERE user = ?", [user]
            if thread_id is not None:
                sql += " AND thread_id = ?"
                args.append(thread_id)
            if statuses is not None:
                sql += f" AND status IN ({','.join('?' * len(statuses))})"
                args.extend(sorted(statuses))
            sql += " ORDER BY created_at DESC, job_id DESC LIMIT ?"
            args.append(str(limit))
            return [record_from_dict(json.loads(row[0])) for row in conn.execute(sql, args)]

        return await self._read(select)

    async def delete_expired(self, now: float) -> list[str]:
        def delete(conn: sqlite3.Connection) -> list[str]:
            conn.execute("BEGIN IMMEDIATE")
            try:
                ids = [
                    row[0]
                    for row in conn.execute(
                        "SELECT job_id FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ? "
                        "AND status IN ('completed', 'failed', 'aborted', 'interrupted') LIMIT 1000",
                        (now,),
                    )
                ]
                conn.executemany("DELETE FROM log WHERE job_id = ?", [(i,) for i in ids])
                conn.executemany("DELETE FROM jobs WHERE job_id = ?", [(i,) for i in ids])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return ids

        ids = await self._write(delete)
        for job_id in ids:
            self.forget_job_notifications(job_id)
            lot = self._changed.pop(job_id, None)
            if lot is not None:
                lot.unpark_all()
        return ids

    async def request_abort(self, job_id: str) -> None:
        def mark(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT record FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row:
                data = json.loads(row[0])
                data["abort_requested"] = True
                conn.execute("UPDATE jobs SET record = ? WHERE job_id = ?", (json.dumps(data), job_id))

        await self._write(mark)
        waiting = self._aborts.get(job_id)  # a later waiter reads the flag from the file
        if waiting is not None:
            waiting.set()

    async def wait_abort_requested(self, job_id: str) -> None:
        event = self._aborts.setdefault(job_id, trio.Event())
        try:
            record = await self.get_job(job_id)
            if record is not None and record.abort_requested:
                return
            await event.wait()
        finally:
            if self._aborts.get(job_id) is event and not event.is_set():
                self._aborts.pop(job_id, None)

    # -- notifications and mutes live in the file; presence in this process -------------

    async def notify_unwatched(self, notification: NotificationRecord, now: float, max_per_user: int) -> bool:
        n = notification
        if self._watchers_by_job.get(n.job_id) or (
            n.type != "ai.tool.approval_required" and n.job_id in self._seen_ending
        ):
            return False

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

        created = await self._write(insert)
        if created and self.notification_listener is not None:
            self.notification_listener(n)
        return created

    async def list_notifications(
        self, user: str, *, unread_only: bool, limit: int
    ) -> tuple[list[NotificationRecord], int]:
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

        return await self._read(select)

    async def mark_notifications_read(self, user: str, ids: Sequence[str], *, everything: bool) -> int:
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

        return await self._write(update)

    async def set_thread_muted(self, user: str, thread_id: str, muted: bool) -> None:
        sql = (
            "INSERT OR IGNORE INTO muted_threads (user, thread_id) VALUES (?, ?)"
            if muted
            else "DELETE FROM muted_threads WHERE user = ? AND thread_id = ?"
        )
        await self._write(lambda conn: conn.execute(sql, (user, thread_id)))

    # -- one process owns the file: every running job found at start is an orphan --------

    async def recover_orphans(self, owner: str, now: float, retention: float) -> list[JobRecord]:
        def recover(conn: sqlite3.Connection) -> list[JobRecord]:
            conn.execute("BEGIN IMMEDIATE")
            try:
                rows = conn.execute(
                    "SELECT record FROM jobs WHERE status IN ('running', 'awaiting_approval') "
                    "AND (owner IS NULL OR owner != ?)",
                    (owner,),
                ).fetchall()
                recovered = []
                for (text,) in rows:
                    record = record_from_dict(json.loads(text))
                    final = _interrupted(record, now, retention)
                    _append(conn, record.job_id, [StatusEvent(seq=final.seq, status="interrupted")])
                    _save(conn, final)
                    recovered.append(final)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return recovered

        return await self._write(recover)


def _interrupted(record: JobRecord, now: float, retention: float) -> JobRecord:
    return attrs.evolve(
        record,
        status="interrupted",
        seq=record.seq + 1,
        epoch=record.epoch + 1,
        updated_at=now,
        finished_at=now,
        expires_at=now + retention,
        lease_until=None,
    )


def _migrate(conn: sqlite3.Connection) -> None:
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


def _append(conn: sqlite3.Connection, job_id: str, entries: Sequence[LogEvent]) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO log (job_id, first_seq, last_seq, events) VALUES (?, ?, ?, ?)",
        (job_id, entries[0].seq, entries[-1].seq, events_to_json(entries)),
    )


def _save(conn: sqlite3.Connection, record: JobRecord) -> None:
    conn.execute(
        "UPDATE jobs SET status = ?, seq = ?, expires_at = ?, owner = ?, record = ? WHERE job_id = ?",
        (
            record.status,
            record.seq,
            record.expires_at,
            record.owner,
            json.dumps(record_to_dict(record)),
            record.job_id,
        ),
    )


def _commit_group(conn: sqlite3.Connection, *, group: list[_Commit]) -> None:
    """One transaction for the group; each commit in a savepoint, so one bad commit fails alone."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for item in group:
            conn.execute("SAVEPOINT one_commit")
            try:
                _commit_one(conn, item)
            except (sqlite3.IntegrityError, ValueError) as exc:
                conn.execute("ROLLBACK TO one_commit")
                item.error = exc
            conn.execute("RELEASE one_commit")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _commit_one(conn: sqlite3.Connection, item: _Commit) -> None:
    row = conn.execute("SELECT record FROM jobs WHERE job_id = ?", (item.job_id,)).fetchone()
    if row is None:
        return  # swept meanwhile: nothing to keep
    record = record_from_dict(json.loads(row[0]))
    fresh = [ev for ev in item.entries if ev.seq > record.seq]  # a retried commit adds nothing twice
    if fresh:
        if fresh[0].seq != record.seq + 1:
            raise ValueError(f"{item.job_id}: commit of seq {fresh[0].seq} after {record.seq}")
        _append(conn, item.job_id, fresh)
    if item.progress.seq >= record.seq:
        _save(conn, record.advanced(item.progress))
