"""``serve``'s Durable Streams: the stream store beside the job store it runs on, and the API
mounted on the HTTP port."""

from __future__ import annotations

import logging
from typing import Any

import trio

from backstream.runtime.server.auth import Authenticator
from backstream.runtime.server.http_app import HttpApp
from backstream.runtime.server.streams_http import StreamsApi, StreamsSettings
from backstream.runtime.server.streams_ops import StreamLimits, StreamOps
from backstream.runtime.stores.memory import MemoryStore
from backstream.runtime.stores.redis import RedisStore
from backstream.runtime.stores.sqlite import SqliteStore
from backstream.runtime.stores.streams import MemoryStreamStore, StreamStore
from backstream.runtime.stores.streams_redis import RedisStreamStore
from backstream.runtime.stores.streams_sqlite import SqliteStreamStore

__all__ = ["mount_streams", "stream_store_for"]

log = logging.getLogger("backstream.streams")

SWEEP_INTERVAL = 30.0
"""Seconds between sweeps of expired streams nobody touched since."""


def stream_store_for(store: object) -> StreamStore | None:
    """Streams live in the same store as jobs: the same file, the same Redis (None: a store
    that holds none)."""
    if isinstance(store, MemoryStore):
        return MemoryStreamStore()
    if isinstance(store, SqliteStore):
        return SqliteStreamStore(store)
    if isinstance(store, RedisStore):
        return RedisStreamStore(store)
    return None


def mount_streams(
    app: HttpApp, authenticator: Authenticator | None, settings: Any, nursery: trio.Nursery
) -> StreamsApi | None:
    """``settings``: ``serve``'s (``streams_*``, ``auth_cookie``, ``allow_origin``). The
    expiry sweep runs in ``nursery``."""
    key = settings.streams_signing_key
    store = stream_store_for(app.runtime.store)
    if store is None:
        log.warning("durable streams are off: the store %s holds none", type(app.runtime.store).__name__)
        return None
    ops = StreamOps(
        store,
        StreamLimits(
            max_streams_per_user=settings.streams_max_per_user,
            max_bytes_per_user=settings.streams_max_bytes_per_user,
        ),
    )
    nursery.start_soon(ops.run_sweeper, SWEEP_INTERVAL)
    streams = StreamsSettings(
        long_poll_timeout=settings.streams_long_poll_timeout,
        sse_max_duration=settings.streams_sse_max_duration,
        rate_per_s=settings.streams_rate_per_s,
        rate_burst=max(1, int(settings.streams_rate_per_s * 2)),
        max_body_bytes=settings.max_message_bytes,
        signing_key=key.encode() if key else None,
        auth_cookie=settings.auth_cookie,
        allow_origins=tuple(settings.allow_origin),
    )
    return StreamsApi(app, ops, authenticator, streams)
