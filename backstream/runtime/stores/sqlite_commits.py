"""The SQLite store's group commit: the commits of many jobs written in one transaction.

``write_group`` runs on the writer's thread. The fast path reads the stored state of
every job of the group at once (a few ``IN`` lookups of a prepared statement), plans each
commit in Python, and writes all their log rows and progress rows with two
``executemany``: a handful of statements for the whole group instead of five per commit.
A commit refused by its plan (it would leave a gap, or its job was handed to another
owner) gets its error and writes nothing; the others go ahead.

If a statement fails (a constraint, a trigger), the group's writes are rolled back to
their savepoint and written again one commit at a time, each in a savepoint of its own,
so the commit at fault fails alone. If the transaction itself fails (``BEGIN``,
``COMMIT``, or an error that rolls the whole transaction back), the group fails: every
commit in it gets that error, and none of it is stored.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import TypeVar

import attrs
import trio

from backstream.actors.ports import JobEndedElsewhereError, LogBehindError, OutboxEntry
from backstream.protocol.events import LogEvent
from backstream.protocol.lifecycle import is_terminal
from backstream.protocol.records import JobProgress, events_to_json, progress_to_dict
from backstream.runtime.stores import sqlite_quota
from backstream.runtime.stores.shared import outbox_to_json, plan_commit
from backstream.runtime.stores.sqlite_schema import PROGRESS_COLUMNS, UPDATE_PROGRESS, column_value

__all__ = ["Commit", "Operation", "Queued", "write_alone", "write_group"]

T = TypeVar("T")

_LOOKUP_WIDTH = 64
"""Job ids per lookup: one prepared statement, the last chunk padded with empty ids."""
_LOOKUP = (
    "SELECT job_id, seq, status, owner, user, thread_id, finished_at IS NULL AND error IS NULL "
    "AND usage IS NULL AND expires_at IS NULL FROM jobs WHERE job_id IN ("
    + ", ".join("?" * _LOOKUP_WIDTH)
    + ")"
)
_APPEND = "INSERT OR IGNORE INTO log (job_id, first_seq, last_seq, events) VALUES (?, ?, ?, ?)"
# A running job's commit moves only these: its indexed columns (status, expires_at) stay
# out of the statement, so SQLite leaves the indexes alone (a fifth of the full update's cost).
_ADVANCE = "UPDATE jobs SET seq = ?, content_length = ?, updated_at = ? WHERE job_id = ?"
_OUTBOX = "INSERT OR REPLACE INTO outbox (job_id, entry, claimed_until) VALUES (?, ?, 0)"


@attrs.define
class Queued:
    """A write waiting in the writer's mailbox; the writer settles it with its outcome."""

    error: BaseException | None = attrs.field(default=None, kw_only=True)
    settled: bool = attrs.field(default=False, kw_only=True)
    """The writer is done with it: ``error`` (or a result) is its outcome."""
    waiter: trio.lowlevel.Task | None = attrs.field(default=None, kw_only=True)
    """The writer's caller, parked until it is settled (none once it gave up waiting)."""

    def settle(self, error: BaseException | None = None) -> None:
        """The outcome is known: record it and wake the caller (on the event loop)."""
        if error is not None:
            self.error = error
        self.settled = True
        task, self.waiter = self.waiter, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    async def wait_settled(self) -> None:
        """Park until ``settle``: a park and an unpark, no event object per write.
        Cancellation: stops waiting; the write may still land."""
        if self.settled:
            await trio.lowlevel.checkpoint()
            return
        self.waiter = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self.waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


@attrs.define
class Commit(Queued):
    """One job's commit."""

    job_id: str
    entries: Sequence[LogEvent]
    progress: JobProgress
    owner: str | None
    """The writer's instance: a commit for a job handed to another owner is refused."""
    ended: bool = False
    """It ended the job (and wrote its outbox entry)."""


@attrs.define
class Operation(Queued):
    """Any other write (a job's create): a function of the connection, run in a savepoint
    of its own within the group's transaction, so its error fails it alone."""

    fn: Callable[[sqlite3.Connection], object]
    result: object = None


@attrs.frozen
class _Stored:
    seq: int
    status: str
    owner: str | None
    user: str
    thread_id: str
    bare: bool
    """No end time, error, usage nor expiry stored."""


@attrs.frozen
class _Planned:
    item: Commit
    stored: _Stored
    entries: list[LogEvent]
    apply_progress: bool


def write_group(conn: sqlite3.Connection, group: Sequence[Queued]) -> None:
    """Write ``group`` in one transaction (on the writer's thread): its operations first,
    then its commits. Each one's refusal lands in its ``error``; a failure of the
    transaction raises, and then nothing of the group is stored."""
    commits = [item for item in group if isinstance(item, Commit)]
    conn.execute("BEGIN IMMEDIATE")
    try:
        for item in group:
            if isinstance(item, Operation):
                _operate(conn, item)
        conn.execute("SAVEPOINT group_commit")
        try:
            _write_together(conn, commits)
        except Exception:
            if not conn.in_transaction:
                raise  # the error rolled the whole transaction back
            conn.execute("ROLLBACK TO group_commit")
            _write_one_by_one(conn, commits)
        conn.execute("RELEASE group_commit")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def write_alone(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """``fn`` in a transaction of its own (when no writer runs)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _operate(conn: sqlite3.Connection, item: Operation) -> None:
    item.error = None
    conn.execute("SAVEPOINT one_operation")
    try:
        item.result = item.fn(conn)
    except Exception as exc:
        if not conn.in_transaction:
            raise  # the transaction is gone: the whole group fails
        conn.execute("ROLLBACK TO one_operation")
        item.error = exc
    conn.execute("RELEASE one_operation")


def _write_together(conn: sqlite3.Connection, group: Sequence[Commit]) -> None:
    """The fast path: every commit of the group with a few statements."""
    ids = [item.job_id for item in group]
    if len(set(ids)) != len(ids):
        raise _SameJobTwice  # each commit must see the one before it: one by one
    stored = _lookup(conn, ids)
    planned: list[_Planned] = []
    for item in group:
        item.error, item.ended = None, False
        row = stored.get(item.job_id)
        if row is None:
            continue  # swept meanwhile: nothing to keep
        try:
            planned.append(_plan(item, row))
        except (LogBehindError, JobEndedElsewhereError, ValueError) as exc:
            item.error = exc
    conn.executemany(
        _APPEND,
        [
            (p.item.job_id, p.entries[0].seq, p.entries[-1].seq, events_to_json(p.entries))
            for p in planned
            if p.entries
        ],
    )
    advancing = [p for p in planned if p.apply_progress and _only_advances(p)]
    conn.executemany(_ADVANCE, [_advance_row(p.item) for p in advancing])
    moving = {id(p) for p in advancing}
    conn.executemany(
        UPDATE_PROGRESS, [_progress_row(p.item) for p in planned if p.apply_progress and id(p) not in moving]
    )
    for p in planned:
        if p.apply_progress and is_terminal(p.item.progress.status):
            _end(conn, p)


class _SameJobTwice(Exception):
    """A group holds two commits of one job (rare: a job flushes one at a time)."""


def _write_one_by_one(conn: sqlite3.Connection, group: Sequence[Commit]) -> None:
    """The slow path: each commit in a savepoint of its own, so one bad commit fails alone."""
    for item in group:
        item.error, item.ended = None, False
        conn.execute("SAVEPOINT one_commit")
        try:
            row = _lookup(conn, [item.job_id]).get(item.job_id)
            if row is not None:
                planned = _plan(item, row)
                if planned.entries:
                    entries = planned.entries
                    conn.execute(
                        _APPEND, (item.job_id, entries[0].seq, entries[-1].seq, events_to_json(entries))
                    )
                if planned.apply_progress and _only_advances(planned):
                    conn.execute(_ADVANCE, _advance_row(item))
                elif planned.apply_progress:
                    conn.execute(UPDATE_PROGRESS, _progress_row(item))
                    if is_terminal(item.progress.status):
                        _end(conn, planned)
        except Exception as exc:
            if not conn.in_transaction:
                raise  # the transaction is gone: the whole group fails
            conn.execute("ROLLBACK TO one_commit")
            item.error, item.ended = exc, False
        conn.execute("RELEASE one_commit")


def _lookup(conn: sqlite3.Connection, ids: Sequence[str]) -> dict[str, _Stored]:
    found: dict[str, _Stored] = {}
    for start in range(0, len(ids), _LOOKUP_WIDTH):
        chunk = list(ids[start : start + _LOOKUP_WIDTH])
        chunk += [""] * (_LOOKUP_WIDTH - len(chunk))
        for job_id, seq, status, owner, user, thread_id, bare in conn.execute(_LOOKUP, chunk):
            found[job_id] = _Stored(int(seq), str(status), owner, str(user), str(thread_id), bool(bare))
    return found


def _plan(item: Commit, stored: _Stored) -> _Planned:
    if item.owner is not None and stored.owner != item.owner:
        raise JobEndedElsewhereError(item.job_id)  # handed to another owner: fenced off
    plan = plan_commit(item.job_id, item.entries, item.progress, stored.seq)
    return _Planned(item, stored, plan.entries, plan.apply_progress)


def _only_advances(planned: _Planned) -> bool:
    """The commit changes only the seq, the content length and the update time."""
    progress, stored = planned.item.progress, planned.stored
    return (
        stored.bare
        and progress.status == stored.status
        and progress.finished_at is None
        and progress.error is None
        and progress.usage is None
        and progress.expires_at is None
    )


def _advance_row(item: Commit) -> tuple[object, ...]:
    progress = item.progress
    return (progress.seq, progress.content_length, progress.updated_at, item.job_id)


def _progress_row(item: Commit) -> tuple[object, ...]:
    data = progress_to_dict(item.progress)
    return (*(column_value(name, data[name]) for name in PROGRESS_COLUMNS), item.job_id)


def _end(conn: sqlite3.Connection, planned: _Planned) -> None:
    """A terminal commit: its outbox entry (if it ends a live job) and the job's charge."""
    item, stored = planned.item, planned.stored
    if not is_terminal(stored.status):  # a retried terminal commit writes no second entry
        progress = item.progress
        entry = OutboxEntry(
            item.job_id, stored.user, stored.thread_id, progress.status, progress.error, progress.preview
        )
        conn.execute(_OUTBOX, (item.job_id, outbox_to_json(entry)))
        item.ended = True
    sqlite_quota.charge_at_end(conn, item.job_id)
