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

from backstream.actors.ports import LogBehindError, NotificationListener, Store, StoreClosedError
from backstream.protocol.backoff import Backoff
from backstream.protocol.errors import UnavailableError
from backstream.protocol.events import LogEvent
from backstream.protocol.lifecycle import is_terminal, sql_terminal_list
from backstream.protocol.records import (
    JobProgress,
    JobRecord,
    NotificationRecord,
    SharedCapacity,
    events_from_json,
    events_to_json,
    progress_to_dict,
    record_to_dict,
)
from backstream.runtime.stores.local_notifications import LocalNotifications
from backstream.runtime.stores.shared import DecisionBox, interrupted, plan_commit
from backstream.runtime.stores.sqlite_schema import (
    COLUMNS,
    MIGRATIONS,
    PROGRESS_COLUMNS,
    SELECT_JOB,
    UPDATE_PROGRESS,
    column_value,
    migrate,
    record_from_row,
    row_values,
)

__all__ = ["MIGRATIONS", "SqliteStore", "SqliteStoreStatistics"]

log = logging.getLogger("backstream.sqlite")

T = TypeVar("T")

MAILBOX_SIZE = 4096
"""Commits waiting for the writer; when full, committing jobs wait."""
GROUP_LIMIT = 512
"""Commits written in one transaction at most."""


@attrs.frozen
class SqliteStoreStatistics:
    transactions: int
    """Write transactions made (each holds a group of commits)."""
    commits_waiting: int
    """Commits in the writer's mailbox."""
    readers_waiting: int
    """Tasks parked in ``wait_for_entries``."""
    abort_listeners: int
    decisions_waiting: int


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
        self._decisions = DecisionBox()
        self._transactions = 0

    def statistics(self) -> SqliteStoreStatistics:
        return SqliteStoreStatistics(
            transactions=self._transactions,
            commits_waiting=self._mailbox_send.statistics().current_buffer_used,
            readers_waiting=sum(lot.statistics().tasks_waiting for lot in self._changed.values()),
            abort_listeners=len(self._aborts),
            decisions_waiting=len(self._decisions),
        )

    # -- lifecycle ------------------------------------------------------------------

    async def open(self, *, on_notification: NotificationListener | None = None) -> None:
        self._on_notification = on_notification

        def connect() -> tuple[sqlite3.Connection, sqlite3.Connection]:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            writer = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            writer.execute("PRAGMA journal_mode=WAL")
            writer.execute("PRAGMA synchronous=NORMAL")
            writer.execute("PRAGMA busy_timeout=5000")
            migrate(writer)
            reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            reader.execute("PRAGMA busy_timeout=5000")
            return writer, reader

        try:
            self._writer, self._reader = await trio.to_thread.run_sync(connect, limiter=self._write_lane)
        except sqlite3.Error as exc:
            raise UnavailableError(f"cannot open {self.path}: {exc}") from None

    async def aclose(self) -> None:
        """Close both connections (each after its statement in progress). Cancellation:
        they are closed all the same."""
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        # Waiters wake and find the store closed.
        self._decisions.close()
        for lot in self._changed.values():
            lot.unpark_all()
        for event in self._aborts.values():
            event.set()
        for conn in (writer, reader):
            if conn is not None:
                await trio.to_thread.run_sync(conn.close, limiter=self._write_lane)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer actor: group commits into transactions until cancelled.

        Cancellation: the group being written fails with ``UnavailableError`` for its
        committers (its transaction is rolled back); commits still in the mailbox wait for
        the next run."""
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
                self._transactions += 1
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
            raise StoreClosedError("the store is closed")
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
            conn.execute("BEGIN IMMEDIATE")
            try:
                cursor = conn.execute(
                    f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
                    "ON CONFLICT (user, message_id) DO NOTHING",
                    row_values(record),
                )
                created = cursor.rowcount == 1
                if created:
                    request = record_to_dict(record)["request"]
                    conn.execute(
                        "INSERT INTO job_requests (job_id, request) VALUES (?, ?)",
                        (record.job_id, json.dumps(request, separators=(",", ":"), ensure_ascii=False)),
                    )
                    found = record
                else:
                    found = record_from_row(
                        conn.execute(
                            SELECT_JOB + " WHERE jobs.user = ? AND jobs.message_id = ?",
                            (record.user, record.message_id),
                        ).fetchone()
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return found, created

        return await self._write(insert)

    async def get_job(self, job_id: str) -> JobRecord | None:
        row = await self._read(
            lambda c: c.execute(SELECT_JOB + " WHERE jobs.job_id = ?", (job_id,)).fetchone()
        )
        return record_from_row(row) if row else None

    async def find_job(self, user: str, message_id: str) -> JobRecord | None:
        row = await self._read(
            lambda c: c.execute(
                SELECT_JOB + " WHERE jobs.user = ? AND jobs.message_id = ?", (user, message_id)
            ).fetchone()
        )
        return record_from_row(row) if row else None

    async def commit(self, job_id: str, entries: Sequence[LogEvent], progress: JobProgress) -> None:
        """Through the writer's mailbox (when full, this waits). Cancellation while queued
        or written: the commit may still land with its group; commit again."""
        item = _Commit(job_id, list(entries), progress)
        await self._mailbox_send.send(item)
        await item.done.wait()
        if isinstance(item.error, LogBehindError):
            raise item.error
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
        """Woken by this process's writer (one process owns the file). Cancellation: safe."""
        row = await self._read(
            lambda c: c.execute("SELECT seq, status FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        )
        if row is None or int(row[0]) > after_seq or is_terminal(str(row[1])):
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
            sql, args = SELECT_JOB + " WHERE jobs.user = ?", [user]
            if thread_id is not None:
                sql += " AND jobs.thread_id = ?"
                args.append(thread_id)
            if statuses is not None:
                sql += f" AND jobs.status IN ({','.join('?' * len(statuses))})"
                args.extend(sorted(statuses))
            sql += " ORDER BY jobs.created_at DESC, jobs.job_id DESC LIMIT ?"
            args.append(str(limit))
            return [record_from_row(row) for row in conn.execute(sql, args)]

        return await self._read(select)

    async def delete_expired(self, now: float) -> list[str]:
        def delete(conn: sqlite3.Connection) -> list[str]:
            conn.execute("BEGIN IMMEDIATE")
            try:
                ids = [
                    row[0]
                    for row in conn.execute(
                        "SELECT job_id FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ? "
                        f"AND status IN {sql_terminal_list()} LIMIT 1000",
                        (now,),
                    )
                ]
                for table in ("log", "job_requests", "jobs"):
                    conn.executemany(f"DELETE FROM {table} WHERE job_id = ?", [(i,) for i in ids])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return ids

        ids = await self._write(delete)
        for job_id in ids:
            self.forget_job_notifications(job_id)
            self._decisions.forget_job(job_id)
            lot = self._changed.pop(job_id, None)
            if lot is not None:
                lot.unpark_all()
        return ids

    async def request_abort(self, job_id: str) -> None:
        await self._write(
            lambda c: c.execute("UPDATE jobs SET abort_requested = 1 WHERE job_id = ?", (job_id,))
        )
        waiting = self._aborts.get(job_id)  # a later waiter reads the flag from the file
        if waiting is not None:
            waiting.set()

    async def wait_abort_requested(self, job_id: str) -> None:
        """One process owns the file: after the flag is read once, ``request_abort`` in this
        process is what sets it. A failed read is retried with backoff. Cancellation: safe."""
        event = self._aborts.setdefault(job_id, trio.Event())
        try:
            backoff = Backoff(0.1, 5.0)
            while True:
                try:
                    row = await self._read(
                        lambda c: c.execute(
                            "SELECT abort_requested FROM jobs WHERE job_id = ?", (job_id,)
                        ).fetchone()
                    )
                    break
                except StoreClosedError:
                    raise
                except UnavailableError as exc:
                    delay = backoff.next_delay()
                    log.warning("job %s: abort flag unreadable (%s); retrying in %.1fs", job_id, exc, delay)
                    await trio.sleep(delay)
            if row is not None and row[0]:
                return
            await event.wait()
            if self._writer is None:
                raise StoreClosedError("the store is closed")
        finally:
            if self._aborts.get(job_id) is event and not event.is_set():
                self._aborts.pop(job_id, None)

    async def send_decision(self, job_id: str, call_id: str, approved: bool) -> None:
        await trio.lowlevel.checkpoint()
        self._decisions.put(job_id, call_id, approved)

    async def wait_decision(self, job_id: str, call_id: str) -> bool:
        return await self._decisions.wait(job_id, call_id)

    # -- notifications and mutes live in the file; presence in this process -------------

    async def _keep_notification(self, n: NotificationRecord, max_per_user: int) -> bool:
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

        return await self._write(insert)

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
                    SELECT_JOB + f" WHERE jobs.status NOT IN {sql_terminal_list()} "
                    "AND (jobs.owner IS NULL OR jobs.owner != ?)",
                    (owner,),
                ).fetchall()
                recovered = []
                for row in rows:
                    final, event = interrupted(record_from_row(row), now, retention)
                    _append(conn, final.job_id, [event])
                    conn.execute(
                        "UPDATE jobs SET status = ?, seq = ?, epoch = ?, updated_at = ?, finished_at = ?, "
                        "expires_at = ?, lease_until = NULL WHERE job_id = ?",
                        (final.status, final.seq, final.epoch, now, now, final.expires_at, final.job_id),
                    )
                    recovered.append(final)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return recovered

        return await self._write(recover)


def _append(conn: sqlite3.Connection, job_id: str, entries: Sequence[LogEvent]) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO log (job_id, first_seq, last_seq, events) VALUES (?, ?, ?, ?)",
        (job_id, entries[0].seq, entries[-1].seq, events_to_json(entries)),
    )


def _commit_group(conn: sqlite3.Connection, *, group: list[_Commit]) -> None:
    """One transaction for the group; each commit in a savepoint, so one bad commit fails alone."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for item in group:
            conn.execute("SAVEPOINT one_commit")
            try:
                _commit_one(conn, item)
            except (sqlite3.IntegrityError, LogBehindError) as exc:
                conn.execute("ROLLBACK TO one_commit")
                item.error = exc
            conn.execute("RELEASE one_commit")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _commit_one(conn: sqlite3.Connection, item: _Commit) -> None:
    row = conn.execute("SELECT seq FROM jobs WHERE job_id = ?", (item.job_id,)).fetchone()
    if row is None:
        return  # swept meanwhile: nothing to keep
    plan = plan_commit(item.job_id, item.entries, item.progress, int(row[0]))
    if plan.entries:
        _append(conn, item.job_id, plan.entries)
    if plan.apply_progress:
        data = progress_to_dict(item.progress)
        conn.execute(
            UPDATE_PROGRESS,
            (*(column_value(name, data[name]) for name in PROGRESS_COLUMNS), item.job_id),
        )
