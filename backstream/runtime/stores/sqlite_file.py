"""The SQLite file of a ``SqliteStore``: its URL, and the lock that keeps it to one process.

One process: ``SqliteStore.open`` takes an exclusive ``flock`` on ``PATH.lock`` before it
reads a job, so a second server on the same file stops with ``StoreInUseError`` instead of
taking the first one's running jobs for orphans. The OS releases the lock when the process
ends, ``kill -9`` included; the lock file itself stays (removing it would let two
processes lock two different files).
"""

from __future__ import annotations

import fcntl
import os
import pathlib

from backstream.protocol.errors import UnavailableError

__all__ = ["StoreInUseError", "lock_path", "path_from_url", "take_lock"]


class StoreInUseError(UnavailableError):
    """Another process (or another store in this one) has the SQLite file open."""


def lock_path(path: pathlib.Path) -> pathlib.Path:
    """The lock file beside the database: ``jobs.db`` → ``jobs.db.lock``.

    Not the database itself: SQLite takes POSIX locks on it, and closing any descriptor
    of a file drops every POSIX lock the process holds on it."""
    return path.with_name(path.name + ".lock")


def take_lock(path: pathlib.Path) -> int:
    """An open descriptor of ``lock_path(path)`` holding its exclusive ``flock``. Raises
    ``StoreInUseError`` at once if another holds it (``flock`` locks belong to the open
    file, so a second store in the same process is refused too)."""
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreInUseError(
            f"another process holds {path} (its lock {lock_path(path)}); "
            "a SQLite store serves one process: stop the other or share a Redis store"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def path_from_url(url: str) -> pathlib.Path:
    """``sqlite:///./backstream.db`` → ``./backstream.db``; ``sqlite:////tmp/x.db`` → ``/tmp/x.db``."""
    if not url.startswith("sqlite:///"):
        raise ValueError(f"not a sqlite URL: {url!r} (expected sqlite:///PATH)")
    return pathlib.Path(url[len("sqlite:///") :])
