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

One process: ``open`` takes the file's lock first (``sqlite_file``), so a second server
on the same file stops with ``StoreInUseError``.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sqlite3
from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeVar

import attrs
import trio

from backstream.actors.ports import (
    Capability,
    Handover,
    JobEndedElsewhereError,
    LogBehindError,
    NotificationListener,
    OutboxEntry,
    StoreClosedError,
)
from backstream.actors.signals import OUTBOX_BELL, through_outage
from backstream.protocol.errors import UnavailableError
from backstream.protocol.events import LogEvent
from backstream.protocol.lifecycle import is_terminal, sql_terminal_list
from backstream.protocol.records import (
    JobProgress,
    JobRecord,
    SharedCapacity,
    events_from_json,
    record_to_dict,
    request_bytes,
)
from backstream.runtime.stores import sqlite_quota
from backstream.runtime.stores.local import LocalStore
from backstream.runtime.stores.shared import outbox_from_json
from backstream.runtime.stores.sqlite_commits import Commit, Operation, Queued, write_alone, write_group
from backstream.runtime.stores.sqlite_file import StoreInUseError, lock_path, path_from_url, take_lock
from backstream.runtime.stores.sqlite_inbox import SqliteShelf
from backstream.runtime.stores.sqlite_schema import (
    COLUMNS,
    MIGRATIONS,
    SELECT_JOB,
    migrate,
    record_from_row,
    row_values,
)
from backstream.runtime.stores.sqlite_webhooks import SqliteWebhookQueue

__all__ = [
    "MIGRATIONS",
    "SqliteStore",
    "SqliteStoreStatistics",
    "StoreInUseError",
    "lock_path",
    "path_from_url",
]

log = logging.getLogger("backstream.sqlite")

T = TypeVar("T")

MAILBOX_SIZE = 4096
"""Commits waiting for the writer; when full, committing jobs wait."""
GROUP_LIMIT = 512
"""Commits written in one transaction at most."""


@attrs.frozen
class SqliteStoreStatistics:
    transactions: int
    """Group transactions committed (each holds every commit that waited for it)."""
    commits: int
    """Job commits written by those transactions (refused ones included)."""
    groups_failed: int
    """Group transactions that failed (each of their commits got the error)."""
    largest_group: int
    """The most commits one transaction held."""
    commits_waiting: int
    """Commits in the writer's mailbox."""
    readers_waiting: int
    """Tasks parked in ``wait_for_entries``."""
    abort_listeners: int
    decisions_waiting: int


class SqliteStore(LocalStore, SqliteWebhookQueue):
    """Jobs, logs, notifications and mutes in the file; who watches, in this process (one
    process owns the file)."""

    capabilities = frozenset({Capability.SURVIVES_RESTART})

    def __init__(self, path: str | pathlib.Path) -> None:
        super().__init__(SqliteShelf(self._write, self._read))
        self.path = pathlib.Path(path)
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._write_lane = trio.CapacityLimiter(1)
        self._read_lane = trio.CapacityLimiter(1)
        self._mailbox_send, self._mailbox_receive = trio.open_memory_channel[Queued](MAILBOX_SIZE)
        # The jobs this process writes, by owner: a job handed to another owner refuses them.
        self._owners: dict[str, str] = {}
        self._transactions = 0
        self._writer_running = False
        self._commits = 0
        self._groups_failed = 0
        self._largest_group = 0

    def statistics(self) -> SqliteStoreStatistics:
        return SqliteStoreStatistics(
            transactions=self._transactions,
            commits=self._commits,
            groups_failed=self._groups_failed,
            largest_group=self._largest_group,
            commits_waiting=self._mailbox_send.statistics().current_buffer_used,
            readers_waiting=self.hub.waiting("entries"),
            abort_listeners=self.hub.waiting("abort"),
            decisions_waiting=len(self.decisions),
        )

    # -- lifecycle ------------------------------------------------------------------

    async def open(self, *, on_notification: NotificationListener | None = None) -> None:
        """Lock the file (``StoreInUseError`` if another holds it), connect and migrate.
        Cancellation: waits for the connection under way, then nothing is left open."""
        self.inbox.on_notification = on_notification

        def lock() -> int:
            self.path = pathlib.Path(os.path.abspath(self.path))  # the lock stays on this file
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return take_lock(self.path)

        def connect() -> tuple[sqlite3.Connection, sqlite3.Connection]:
            # Prepared statements stay cached on the connection: a group reuses the same few.
            writer = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, cached_statements=256
            )
            writer.execute("PRAGMA journal_mode=WAL")
            writer.execute("PRAGMA synchronous=NORMAL")
            writer.execute("PRAGMA busy_timeout=5000")
            migrate(writer)
            reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            reader.execute("PRAGMA busy_timeout=5000")
            return writer, reader

        self._lock_fd = await trio.to_thread.run_sync(lock, limiter=self._write_lane)
        try:
            self._writer, self._reader = await trio.to_thread.run_sync(connect, limiter=self._write_lane)
        except BaseException as exc:
            self._release_lock()
            if isinstance(exc, sqlite3.Error):
                raise UnavailableError(f"cannot open {self.path}: {exc}") from None
            raise

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # drops the flock

    async def aclose(self) -> None:
        """Close both connections (each after its statement in progress). Cancellation:
        they are closed all the same."""
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        self.hub.close()  # waiters wake and find the store closed
        self._fail_waiting_commits()
        try:
            if writer is not None:
                await trio.to_thread.run_sync(_hand_off_live_jobs, writer, limiter=self._write_lane)
            for conn in (writer, reader):
                if conn is not None:
                    await trio.to_thread.run_sync(conn.close, limiter=self._write_lane)
        finally:
            self._release_lock()  # after the connections: the next owner finds them closed

    def _fail_waiting_commits(self) -> None:
        """The store closes: commits still in the mailbox will never be written."""
        while True:
            try:
                item = self._mailbox_receive.receive_nowait()
            except trio.WouldBlock:
                return
            item.settle(StoreClosedError("the store was closed before this commit was written"))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer actor: every commit waiting in the mailbox (at most ``GROUP_LIMIT``)
        goes into one transaction, on the writer's thread; until cancelled.

        A group's failure fails each of its commits (and only those) with
        ``UnavailableError``; nothing of the group is stored. Cancellation: the group being
        written is rolled back and its committers get ``UnavailableError`` (a thread cannot
        be interrupted: the cancellation waits for the statement in progress); commits
        still in the mailbox wait for the next run, or fail with ``StoreClosedError`` when
        the store closes."""
        self._writer_running = True
        try:
            task_status.started()
            await self._write_groups()
        finally:
            self._writer_running = False

    async def _write_groups(self) -> None:
        while True:
            group = [await self._mailbox_receive.receive()]
            while len(group) < GROUP_LIMIT:
                try:
                    group.append(self._mailbox_receive.receive_nowait())
                except trio.WouldBlock:
                    break
            self._largest_group = max(self._largest_group, len(group))
            try:
                await self._write(partial(write_group, group=group))
            except BaseException as exc:
                self._groups_failed += 1
                error = exc if isinstance(exc, Exception) else UnavailableError("the store was closed")
                for item in group:
                    item.settle(error)
                if isinstance(exc, Exception):
                    log.warning("sqlite: a group of %d commits failed: %s", len(group), exc)
                    continue
                raise
            self._transactions += 1
            for item in group:
                item.settle()
                if isinstance(item, Commit):
                    self._commits += 1
                    self.hub.signal_job(item.job_id)
                    if item.ended:
                        self.hub.ring(OUTBOX_BELL)

    async def _queue(self, item: Queued) -> None:
        """Into the writer's mailbox (when full, wait for room: back-pressure), then until the
        group holding it is committed or failed. Cancellation while waiting for room: nothing
        is written; once queued: the write may still land with its group."""
        try:
            self._mailbox_send.send_nowait(item)
        except trio.WouldBlock:
            await self._mailbox_send.send(item)
        await item.wait_settled()

    async def _grouped(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` in the writer's next group transaction, in a savepoint of its own: its error
        (re-raised here; SQLite's as ``UnavailableError``) undoes it alone."""
        if not self._writer_running:  # opened but not run (a tool, a test): on its own
            return await self._write(partial(write_alone, fn=fn))
        item = Operation(fn=fn)
        await self._queue(item)
        if isinstance(item.error, sqlite3.Error):
            raise UnavailableError(f"sqlite: {item.error}") from None
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[return-value]  # what fn returned

    async def run_grouped(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` in the writer's next group transaction (for stores of other things in the file).
        Cancellation: as ``_grouped``'s (once queued, the write may still land with its group)."""
        return await self._grouped(fn)

    async def run_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` on the reader connection. Cancellation: waits for the statement to finish."""
        return await self._read(fn)

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
        self,
        record: JobRecord,
        capacity: SharedCapacity | None = None,
        *,
        max_stored_bytes: int | None = None,
    ) -> tuple[JobRecord, bool]:
        cost = request_bytes(record.request)

        def insert(conn: sqlite3.Connection) -> tuple[JobRecord, bool]:
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
                sqlite_quota.charge_at_create(conn, record.user, record.job_id, cost, max_stored_bytes)
                found = record
            else:
                found = record_from_row(
                    conn.execute(
                        SELECT_JOB + " WHERE jobs.user = ? AND jobs.message_id = ?",
                        (record.user, record.message_id),
                    ).fetchone()
                )
            return found, created

        # In the writer's group: a burst of starts costs a few transactions, not one each.
        found, created = await self._grouped(insert)
        if created and record.owner is not None:
            self._owners[record.job_id] = record.owner
        return found, created

    async def get_job(self, job_id: str) -> JobRecord | None:
        row = await self._read(
            lambda c: c.execute(SELECT_JOB + " WHERE jobs.job_id = ?", (job_id,)).fetchone()
        )
        return record_from_row(row) if row else None

    async def stored_bytes(self, user: str) -> int:
        return await self._read(lambda conn: sqlite_quota.stored_bytes(conn, user))

    async def find_job(self, user: str, message_id: str) -> JobRecord | None:
        row = await self._read(
            lambda c: c.execute(
                SELECT_JOB + " WHERE jobs.user = ? AND jobs.message_id = ?", (user, message_id)
            ).fetchone()
        )
        return record_from_row(row) if row else None

    async def commit(self, job_id: str, entries: Sequence[LogEvent], progress: JobProgress) -> None:
        """Through the writer's mailbox (when full, this waits: back-pressure on the jobs),
        into the next group transaction; returns once that transaction is committed, raises
        if it failed (``UnavailableError``) or refused this commit (``LogBehindError``,
        ``JobEndedElsewhereError``). Cancellation while waiting for room in the mailbox:
        nothing is written; once queued: the commit may still land with its group (commit
        again: a repeated commit appends nothing twice)."""
        item = Commit(job_id, list(entries), progress, self._owners.get(job_id))
        await self._queue(item)
        if is_terminal(progress.status) and item.error is None:
            self._owners.pop(job_id, None)
        if isinstance(item.error, LogBehindError | JobEndedElsewhereError | StoreClosedError):
            raise item.error
        if isinstance(item.error, UnavailableError):
            raise UnavailableError(f"sqlite commit failed: {item.error}") from None
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
        with self.hub.listen(("entries", job_id)) as listener:
            row = await through_outage(
                f"job {job_id}: reading its progress",
                lambda: self._read(
                    lambda c: c.execute("SELECT seq, status FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
                ),
            )
            if row is None or int(row[0]) > after_seq or is_terminal(str(row[1])):
                return
            await listener.wait()

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
                sqlite_quota.release(conn, ids)
                for table in ("log", "job_requests", "jobs", "outbox"):
                    conn.executemany(f"DELETE FROM {table} WHERE job_id = ?", [(i,) for i in ids])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return ids

        ids = await self._write(delete)
        for job_id in ids:
            self.forget_job(job_id)
        return ids

    async def delete_job(self, job_id: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(
                    f"SELECT 1 FROM jobs WHERE job_id = ? AND status IN {sql_terminal_list()}", (job_id,)
                ).fetchone()
                if row is not None:
                    sqlite_quota.release(conn, [job_id])
                    for table in ("log", "job_requests", "jobs", "outbox"):
                        conn.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return row is not None

        deleted = await self._write(delete)
        if deleted:
            self.forget_job(job_id)
        return deleted

    async def request_abort(self, job_id: str) -> None:
        await self._write(
            lambda c: c.execute("UPDATE jobs SET abort_requested = 1 WHERE job_id = ?", (job_id,))
        )
        self.hub.signal(("abort", job_id))

    async def wait_abort_requested(self, job_id: str) -> None:
        """One process owns the file: after the flag is read once, ``request_abort`` in this
        process is what signals it. A failed read is retried with backoff. Cancellation: safe."""
        while True:
            with self.hub.listen(("abort", job_id)) as listener:
                row = await through_outage(
                    f"job {job_id}: reading its abort flag",
                    lambda: self._read(
                        lambda c: c.execute(
                            "SELECT abort_requested FROM jobs WHERE job_id = ?", (job_id,)
                        ).fetchone()
                    ),
                    level=logging.WARNING,
                )
                if row is not None and row[0]:
                    return
                await listener.wait()

    # -- one process owns the file: every running job found at start is an orphan --------

    async def take_orphans(self, owner: str, now: float, lease_until: float) -> list[Handover]:
        """One process owns the file: every live job another instance started is an orphan.
        Cancellation: one transaction; every orphan is taken, or none."""

        def take(conn: sqlite3.Connection) -> list[Handover]:
            conn.execute("BEGIN IMMEDIATE")
            try:
                rows = conn.execute(
                    SELECT_JOB + f" WHERE jobs.status NOT IN {sql_terminal_list()} "
                    "AND (jobs.owner IS NULL OR jobs.owner != ?)",
                    (owner,),
                ).fetchall()
                taken = []
                for row in rows:
                    old = record_from_row(row)
                    record = attrs.evolve(
                        old,
                        owner=owner,
                        lease_until=lease_until,
                        epoch=old.epoch + 1,
                        epoch_ends=(*old.epoch_ends, old.seq),
                        # No owner: the last run closed the store cleanly and left it running.
                        handoffs=old.handoffs + (old.owner is None),
                    )
                    conn.execute(
                        "UPDATE jobs SET owner = ?, lease_until = ?, epoch = ?, epoch_ends = ?, "
                        "handoffs = ? WHERE job_id = ?",
                        (
                            owner,
                            lease_until,
                            record.epoch,
                            json.dumps(record.epoch_ends),
                            record.handoffs,
                            record.job_id,
                        ),
                    )
                    taken.append(Handover(record, tuple(_select_log(conn, record.job_id))))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return taken

        taken = await self._write(take)
        for handover in taken:
            self._owners[handover.record.job_id] = owner
        return taken

    # -- the outbox: effects of terminal commits ----------------------------------------

    async def claim_outbox(self, owner: str, now: float, until: float, limit: int) -> list[OutboxEntry]:
        """One process owns the file: another owner's claim is a dead instance's.
        Cancellation: one transaction; claimed or not."""

        def claim(conn: sqlite3.Connection) -> list[OutboxEntry]:
            conn.execute("BEGIN IMMEDIATE")
            try:
                rows = conn.execute(
                    "SELECT job_id, entry FROM outbox WHERE claimed_until < ? OR claimed_by IS NOT ? "
                    "ORDER BY claimed_until LIMIT ?",
                    (now, owner, limit),
                ).fetchall()
                conn.executemany(
                    "UPDATE outbox SET claimed_by = ?, claimed_until = ? WHERE job_id = ?",
                    [(owner, until, row[0]) for row in rows],
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return [outbox_from_json(row[1]) for row in rows]

        return await self._write(claim)

    async def delete_outbox(self, job_ids: Sequence[str]) -> None:
        await self._write(
            lambda conn: conn.executemany("DELETE FROM outbox WHERE job_id = ?", [(i,) for i in job_ids])
        )


def _select_log(conn: sqlite3.Connection, job_id: str) -> list[LogEvent]:
    out: list[LogEvent] = []
    for (events,) in conn.execute("SELECT events FROM log WHERE job_id = ? ORDER BY first_seq", (job_id,)):
        out.extend(events_from_json(events))
    return out


def _hand_off_live_jobs(conn: sqlite3.Connection) -> None:
    """A clean close: the jobs still live were left running for the next run, which takes
    them over as hand-offs, not crashes (no owner). Best effort: a failure leaves them as
    a crash leaves them."""
    try:
        conn.execute(f"UPDATE jobs SET owner = NULL WHERE status NOT IN {sql_terminal_list()}")
        conn.commit()
    except sqlite3.Error as exc:
        log.warning("could not mark the jobs left running as handed off: %s", exc)
