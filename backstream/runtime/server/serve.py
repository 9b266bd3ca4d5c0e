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
import urllib.parse
from collections.abc import Callable

import attrs
import trio

from backstream.actors.config import Config
from backstream.actors.ports import Store
from backstream.runtime.server.auth import (
    AnyAuthenticator,
    Authenticator,
    JWTAuthenticator,
    StaticTokens,
    parse_token_pairs,
)
from backstream.runtime.server.frontdoor import FrontDoor, FrontDoorConfig
from backstream.runtime.server.http_status import Route, serve_status
from backstream.runtime.server.metrics import metrics_text
from backstream.runtime.server.settings import ServeSettings, runtime_config
from backstream.runtime.stores.memory import MemoryStore
from backstream.runtime.tools.registry import ToolRegistry
from backstream.runtime.tree import open_runtime

__all__ = ["ServeHandle", "configure_logging", "make_authenticator", "make_store", "serve"]

log = logging.getLogger("backstream.serve")


def make_store(url: str) -> Store:
    """``memory``, ``sqlite:///PATH`` or ``redis://HOST:PORT/DB`` (``rediss://`` for TLS)."""
    if url == "memory":
        return MemoryStore()
    if url.startswith("sqlite:///"):
        from backstream.runtime.stores.sqlite import SqliteStore, path_from_url

        return SqliteStore(path_from_url(url))
    if url.startswith(("redis://", "rediss://", "redis+cluster://", "rediss+cluster://")):
        from backstream.runtime.stores.redis import RedisStore

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


def front_door_config(settings: ServeSettings) -> FrontDoorConfig:
    from backstream.runtime.server.connection import ConnectionLimits

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


def load_tools(settings: ServeSettings, config: Config) -> ToolRegistry:
    """The built-in tools, ``--tools`` and the entry points. Raises ``ValueError`` naming
    the one that does not load."""
    tools = ToolRegistry.with_builtins(max_threads=config.max_tool_threads)
    for path in settings.tools:
        try:
            tools.load(path)
        except (ImportError, AttributeError, ValueError, TypeError) as exc:
            raise ValueError(f"--tools {path}: {type(exc).__name__}: {exc}") from None
    try:
        tools.load_entry_points()
    except Exception as exc:  # a third-party package's import failing
        raise ValueError(
            f"tools of the entry-point group backstream.tools: {type(exc).__name__}: {exc}"
        ) from None
    return tools


def redact_url(url: str) -> str:
    """``url`` without a password, for logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def startup_lines(
    settings: ServeSettings, models: list[str], tool_names: list[str], http_port: int | None
) -> list[str]:
    """What an operator needs to know once the server listens (never a secret)."""
    http = (
        f"http://{settings.host}:{http_port} (/healthz, /readyz, /metrics)"
        if http_port is not None
        else "off"
    )
    upstream = redact_url(settings.upstream_url) if settings.upstream_url else "none (built-in models only)"
    cap = settings.max_output_tokens
    return [
        f"HTTP: {http}",
        f"store: {redact_url(settings.store)}",
        f"upstream: {upstream}; output tokens per request: {cap if cap is not None else 'no cap'}",
        f"models allowed: {', '.join(models) or 'none'}",
        f"tools: {', '.join(tool_names) or 'none'}",
    ]


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
    announce = announce or (lambda line: log.warning("%s", line))
    authenticator, dev_token = make_authenticator(settings)
    config = runtime_config(settings)
    store = store or make_store(settings.store)
    shutdown = trio.Event()
    tools = load_tools(settings, config)
    async with open_runtime(config, store=store, tools=tools) as runtime, trio.open_nursery() as nursery:
        from backstream.protocol.version import VERSION

        door = FrontDoor(runtime, authenticator, front_door_config(settings), version=VERSION)
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
            http_port = await nursery.start(serve_status, routes, settings.host, settings.http_port)
        if handle_signals:  # before the startup lines: a signal after them shuts down cleanly
            await nursery.start(_wait_for_signal, shutdown)
        scheme = "wss" if settings.tls_cert else "ws"
        log.info("backstream %s listening on %s://%s:%d/v1", VERSION, scheme, settings.host, door.port)
        for line in startup_lines(settings, runtime.allowed_models(), tools.names(), http_port):
            log.info("%s", line)
        if config.upstream_url and not config.allowed_models:
            log.warning("any model may be named and is paid for: restrict them with --allow-model")
        if dev_token is not None:
            announce(f"no auth configured: connect as user 'dev' with token {dev_token}")
        task_status.started(ServeHandle(door.port, http_port, dev_token, shutdown))
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


async def _wait_for_signal(
    shutdown: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
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
