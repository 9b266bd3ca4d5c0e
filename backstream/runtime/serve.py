"""``backstream serve``: the runtime behind the front door, until SIGINT or SIGTERM.

Shutdown: stop accepting, close clients with 1001, give running jobs
``drain_timeout`` to finish, then end the rest ``interrupted`` with their
content kept.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import ssl
import sys
import time
from collections.abc import Callable
from functools import partial

import attrs
import trio

from backstream.runtime.auth import (
    AnyAuthenticator,
    Authenticator,
    JWTAuthenticator,
    StaticTokens,
    parse_token_pairs,
)
from backstream.runtime.config import Config
from backstream.runtime.frontdoor import FrontDoor, FrontDoorConfig
from backstream.runtime.http_status import Route, serve_status
from backstream.runtime.memory_store import MemoryStore
from backstream.runtime.metrics import metrics_text
from backstream.runtime.runtime import open_runtime
from backstream.runtime.settings import ServeSettings
from backstream.runtime.store import Store
from backstream.runtime.tools import ToolRegistry
from backstream.runtime.web_api import WebConfig
from backstream.runtime.web_assets import find_asset

__all__ = ["ServeHandle", "configure_logging", "make_authenticator", "make_store", "serve"]

log = logging.getLogger("backstream.serve")


def make_store(url: str) -> Store:
    """``memory``, ``sqlite:///PATH`` or ``redis://HOST:PORT/DB`` (``rediss://`` for TLS)."""
    if url == "memory":
        return MemoryStore()
    if url.startswith("sqlite:///"):
        from backstream.runtime.sqlite_store import SqliteStore, path_from_url

        return SqliteStore(path_from_url(url))
    if url.startswith(("redis://", "rediss://", "redis+cluster://", "rediss+cluster://")):
        from backstream.runtime.redis_store import RedisStore

        return RedisStore(url, prefix=os.environ.get("BACKSTREAM_REDIS_PREFIX", "backstream"))
    raise ValueError(f"unknown store {url!r}: use memory, sqlite:///PATH or redis://HOST:PORT/DB")


def make_authenticator(settings: ServeSettings) -> tuple[Authenticator, str | None]:
    """The configured authenticators; with none, a random token for user ``dev`` (returned)."""
    found: list[Authenticator] = []
    tokens = parse_token_pairs(settings.token)
    if tokens:
        found.append(StaticTokens(tokens))
    if settings.tokens_file:
        found.append(StaticTokens.from_file(settings.tokens_file))
    if settings.jwt_secret:
        found.append(JWTAuthenticator(settings.jwt_secret))
    if found:
        return (found[0] if len(found) == 1 else AnyAuthenticator(found)), None
    dev_token = secrets.token_urlsafe(24)
    return StaticTokens({dev_token: "dev"}), dev_token


def runtime_config(settings: ServeSettings) -> Config:
    return Config(
        max_jobs=settings.max_jobs,
        max_jobs_per_user=settings.max_jobs_per_user,
        job_timeout=settings.job_timeout,
        retention=settings.retention,
        batch_ms=settings.batch_ms,
        drain_timeout=settings.drain_timeout,
        lease_ttl=settings.lease_ttl,
        lease_renew_interval=settings.lease_renew_interval,
        flush_ms=settings.flush_ms,
        upstream_url=settings.upstream_url,
        upstream_api_key=settings.upstream_api_key,
    )


def front_door_config(settings: ServeSettings) -> FrontDoorConfig:
    from backstream.actors.connection import ConnectionLimits

    context = None
    if settings.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return FrontDoorConfig(
        host=settings.host,
        port=settings.port,
        allow_origins=tuple(settings.allow_origin),
        reuse_port=bool(settings.reuse_port),
        limits=ConnectionLimits(
            hello_timeout=settings.hello_timeout, max_message_bytes=settings.max_message_bytes
        ),
        ssl_context=context,
    )


@attrs.define
class ServeHandle:
    """What ``serve`` reports once it listens (for tests and embedders)."""

    port: int
    http_port: int | None
    dev_token: str | None
    shutdown: trio.Event


async def serve(
    settings: ServeSettings,
    *,
    store: Store | None = None,
    handle_signals: bool = True,
    announce: Callable[[str], None] | None = None,
    task_status: trio.TaskStatus[ServeHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGINT/SIGTERM (or ``handle.shutdown`` is set), then shut down gracefully."""
    announce = announce or (lambda line: print(line, file=sys.stderr, flush=True))
    authenticator, dev_token = make_authenticator(settings)
    config = runtime_config(settings)
    store = store or make_store(settings.store)
    shutdown = trio.Event()
    tools = ToolRegistry.with_builtins()
    for path in settings.tools:
        tools.load(path)
    tools.load_entry_points()
    async with open_runtime(config, store=store, tools=tools) as runtime, trio.open_nursery() as nursery:
        from backstream import __version__

        door = FrontDoor(runtime, authenticator, front_door_config(settings), version=__version__)
        await nursery.start(door.run)
        http_port = None
        if settings.http_port is not None:
            render = metrics_text(runtime, door)

            async def healthz() -> tuple[int, str, bytes]:
                await trio.lowlevel.checkpoint()
                return 200, "text/plain", b"ok\n"

            async def readyz() -> tuple[int, str, bytes]:
                with trio.move_on_after(2) as waited:
                    try:
                        await runtime.store.ping()
                    except Exception:
                        return 503, "text/plain", b"store unavailable\n"
                if waited.cancelled_caught:
                    return 503, "text/plain", b"store did not answer\n"
                return 200, "text/plain", b"ready\n"

            async def metrics() -> tuple[int, str, bytes]:
                await trio.lowlevel.checkpoint()
                return 200, "text/plain; version=0.0.4; charset=utf-8", render()

            routes: dict[str, Route] = {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics}
            if settings.web:
                routes["/api/config"] = WebConfig(
                    ws_port=door.port,
                    tls=bool(settings.tls_cert),
                    upstream_url=config.upstream_url,
                    upstream_api_key=config.upstream_api_key,
                )
            assets = partial(find_asset, web=bool(settings.web))
            http_port = await nursery.start(
                partial(serve_status, routes, settings.host, settings.http_port, assets=assets)
            )
        scheme = "wss" if settings.tls_cert else "ws"
        announce(f"backstream {__version__} listening on {scheme}://{settings.host}:{door.port}/v1")
        if dev_token is not None:
            announce(f"no auth configured: connect as user 'dev' with token {dev_token}")
        if settings.web:
            fragment = f"#token={dev_token}" if dev_token is not None else ""
            announce(f"demo chat page: http://{settings.host}:{http_port}/{fragment}")
        task_status.started(ServeHandle(door.port, http_port, dev_token, shutdown))
        if handle_signals:
            nursery.start_soon(_wait_for_signal, shutdown)
        await shutdown.wait()
        log.info("shutting down: closing clients, draining jobs for up to %gs", config.drain_timeout)
        door.stop_accepting()
        runtime.stop_accepting()
        door.close_all(1001, "server shutting down")
        with trio.move_on_after(door.config.limits.close_timeout + 1):
            await door.wait_closed()
        nursery.cancel_scope.cancel()
    # Leaving open_runtime drained the jobs (drain_timeout), then interrupted the rest.
    finished = runtime.statistics().jobs.finished_total
    summary = ", ".join(f"{count} {status}" for status, count in sorted(finished.items()))
    log.info("stopped; jobs ended here: %s", summary or "none")


async def _wait_for_signal(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            shutdown.set()
            return


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("trio-websocket").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
