"""Durable streams in the SQLite store's file: a row of state per stream, a row per message, a
row of counts per user (moved in the same transaction as the write).

Each ``update`` is one operation of the writer's group transaction (``SqliteStore``): its
decision runs on the writer's thread between reading the state and writing the result, so it
is atomic, and an acknowledged append is committed (it survives ``kill -9`` of the process).
Reads use the reader connection. One process owns the file, so wake-ups stay in-process.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TypeVar

from backstream.protocol.streams_state import Message, StreamState
from backstream.runtime.stores.sqlite import SqliteStore
from backstream.runtime.stores.streams import Change, StreamChanges, StreamUsage, owner_of

__all__ = ["SqliteStreamStore"]

T = TypeVar("T")


class SqliteStreamStore:
    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self.changes = StreamChanges()

    async def get(self, key: str) -> StreamState | None:
        def select(conn: sqlite3.Connection) -> StreamState | None:
            row = conn.execute("SELECT state FROM ds_streams WHERE stream_key = ?", (key,)).fetchone()
            return StreamState.from_json(row[0]) if row else None

        return await self._store.run_read(select)

    async def update(self, key: str, decide: Callable[[StreamState | None], Change[T]]) -> Change[T]:
        def apply(conn: sqlite3.Connection) -> Change[T]:
            row = conn.execute("SELECT state FROM ds_streams WHERE stream_key = ?", (key,)).fetchone()
            old = StreamState.from_json(row[0]) if row else None
            change = decide(old)
            if change.delete or change.state is not None:
                _account(conn, key, old, None if change.delete else change.state)
            if change.delete or change.fresh:
                conn.execute("DELETE FROM ds_messages WHERE stream_key = ?", (key,))
            if change.delete:
                conn.execute("DELETE FROM ds_streams WHERE stream_key = ?", (key,))
                return change
            if change.state is not None:
                state = change.state
                deadline = None if state.soft_deleted else state.deadline
                conn.execute(
                    "INSERT INTO ds_streams (stream_key, owner, stored_bytes, deadline, state) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (stream_key) DO UPDATE SET "
                    "stored_bytes = excluded.stored_bytes, deadline = excluded.deadline, "
                    "state = excluded.state",
                    (key, owner_of(key), state.stored_bytes, deadline, state.to_json()),
                )
            conn.executemany(
                "INSERT INTO ds_messages (stream_key, end_pos, data) VALUES (?, ?, ?)",
                [(key, end, data) for end, data in change.messages],
            )
            return change

        change = await self._store.run_grouped(apply)
        if change.delete or change.state is not None or change.messages:
            self.changes.notify(key)
        return change

    async def read(self, key: str, after: int, up_to: int, max_bytes: int) -> list[Message]:
        def select(conn: sqlite3.Connection) -> list[Message]:
            rows = conn.execute(
                "SELECT end_pos, data FROM ds_messages WHERE stream_key = ? AND end_pos > ? AND end_pos <= ? "
                "ORDER BY end_pos",
                (key, after, up_to),
            )
            out: list[Message] = []
            size = 0
            for end, data in rows:
                if out and size + len(data) > max_bytes:
                    break
                out.append((int(end), bytes(data)))
                size += len(data)
            return out

        return await self._store.run_read(select)

    async def expired_keys(self, now: float, limit: int) -> list[str]:
        def select(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT stream_key FROM ds_streams WHERE deadline IS NOT NULL AND deadline <= ? LIMIT ?",
                (now, limit),
            )
            return [str(row[0]) for row in rows]

        return await self._store.run_read(select)

    async def usage(self, owner: str) -> StreamUsage:
        def select(conn: sqlite3.Connection) -> StreamUsage:
            row = conn.execute("SELECT streams, bytes FROM ds_usage WHERE owner = ?", (owner,)).fetchone()
            return StreamUsage(int(row[0]), int(row[1])) if row else StreamUsage(0, 0)

        return await self._store.run_read(select)


def _account(conn: sqlite3.Connection, key: str, old: StreamState | None, new: StreamState | None) -> None:
    """The owner's counts follow the write, in its transaction."""
    streams = (new is not None) - (old is not None)
    stored = (new.stored_bytes if new else 0) - (old.stored_bytes if old else 0)
    if streams or stored:
        conn.execute(
            "INSERT INTO ds_usage (owner, streams, bytes) VALUES (?, ?, ?) ON CONFLICT (owner) DO UPDATE SET "
            "streams = streams + excluded.streams, bytes = bytes + excluded.bytes",
            (owner_of(key), streams, stored),
        )
