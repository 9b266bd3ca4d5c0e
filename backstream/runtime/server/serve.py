"""``backstream serve``: the runtime behind the front door, until SIGINT or SIGTERM.

Shutdown: stop accepting, close clients with 1001, give running jobs
``drain_timeout`` to finish, then end the rest ``interrupted`` with their
content kept.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import secrets
import signal
import ssl
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, nullcontext
from functools import partial

import attrs
import trio

from backstream.actors.config import Config
from backstream.actors.ports import Store
from backstream.actors.webhooks import WebhookSettings
from backstream.runtime.api import Runtime
from backstream.runtime.models.workflows import WorkflowRegistry
from backstream.runtime.server.auth import (
    AnyAuthenticator,
    Authenticator,
    JWTAuthenticator,
    StaticTokens,
    parse_token_pairs,
)
from backstream.runtime.server.frontdoor import FrontDoor, FrontDoorConfig
from backstream.runtime.server.http_app import HttpApp, HttpLimits, StaticRoute
from backstream.runtime.server.http_server import HttpServer, HttpServerConfig
from backstream.runtime.server.listeners import open_tcp_listener
from backstream.runtime.server.metrics import metrics_text
from backstream.runtime.server.responses_http import ResponsesApi
from backstream.runtime.server.settings import (
    ServeSettings,
    check_server_settings,
    runtime_config,
    tls_context,
)
from backstream.runtime.server.streams_serve import mount_streams
from backstream.runtime.server.web_api import WebConfig
from backstream.runtime.server.web_assets import asset_routes
from backstream.runtime.stores.memory import MemoryStore
from backstream.runtime.stores.redis_urls import REDIS_SCHEMES, STORE_FORMS
from backstream.runtime.tools.registry import ToolRegistry
from backstream.runtime.tree import open_runtime
from backstream.runtime.webhook_sender import HttpWebhookSender

__all__ = ["ServeHandle", "configure_logging", "make_authenticator", "make_store", "serve"]

log = logging.getLogger("backstream.serve")

REDIS_PREFIXES = tuple(f"{scheme}://" for scheme in REDIS_SCHEMES)


def make_store(url: str, config: Config | None = None) -> Store:
    """``memory``, ``sqlite:///PATH`` or a Redis URL (``redis_urls``). ``config``'s
    ``store_wait_*`` settings make a Redis store wait for replicas; other stores have none,
    and refuse them. Raises ``ValueError`` naming the known forms for any other URL."""
    config = config or Config()
    if url.startswith(REDIS_PREFIXES):
        from backstream.runtime.stores.redis import RedisStore
        from backstream.runtime.stores.redis_client import Replication

        return RedisStore(
            url,
            prefix=os.environ.get("BACKSTREAM_REDIS_PREFIX", "backstream"),
            replication=Replication(
                config.store_wait_replicas, config.store_wait_timeout, config.store_wait_on == "flush"
            ),
        )
    if config.store_wait_replicas:
        raise ValueError(f"--store-wait-replicas needs a Redis store with replicas, not {url!r}")
    if url == "memory":
        return MemoryStore()
    if url.startswith("sqlite:///"):
        from backstream.runtime.stores.sqlite import SqliteStore, path_from_url

        return SqliteStore(path_from_url(url))
    raise ValueError(f"unknown store {url!r}: use {STORE_FORMS}")


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


def compression_window_bits(settings: ServeSettings) -> int:
    """``--compression-window-bits``. Raises ``ValueError`` naming it when out of range."""
    from backstream.runtime.server.deflate import MAX_WINDOW_BITS, MIN_WINDOW_BITS

    bits: int = settings.compression_window_bits
    if not MIN_WINDOW_BITS <= bits <= MAX_WINDOW_BITS:
        raise ValueError(
            f"--compression-window-bits (BACKSTREAM_COMPRESSION_WINDOW_BITS): {bits} is not in "
            f"[{MIN_WINDOW_BITS}, {MAX_WINDOW_BITS}]"
        )
    return bits


def front_door_config(settings: ServeSettings) -> FrontDoorConfig:
    """The front door's settings. Raises ``ValueError`` naming a setting out of range."""
    from backstream.protocol.ui_messages import MAX_COALESCE_MS
    from backstream.runtime.server.connection import ConnectionLimits
    from backstream.runtime.server.deflate import DeflateSettings

    if not 0 <= settings.ai_sdk_coalesce_ms <= MAX_COALESCE_MS:
        raise ValueError(
            f"--ai-sdk-coalesce-ms (BACKSTREAM_AI_SDK_COALESCE_MS): {settings.ai_sdk_coalesce_ms} "
            f"is not in [0, {MAX_COALESCE_MS}]"
        )
    for name in ("max_connections_per_user", "max_streams_per_user"):
        if getattr(settings, name) < 1:
            flag, env = name.replace("_", "-"), "BACKSTREAM_" + name.upper()
            raise ValueError(f"--{flag} ({env}): {getattr(settings, name)} must be at least 1")
    bits = compression_window_bits(settings)
    deflate = DeflateSettings(window_bits=bits) if settings.ws_deflate else None
    return FrontDoorConfig(
        host=settings.host,
        deflate=deflate,
        port=settings.port,
        allow_origins=tuple(settings.allow_origin),
        auth_cookie=settings.auth_cookie,
        default_model=settings.default_model,
        ai_sdk_coalesce_ms=settings.ai_sdk_coalesce_ms,
        reuse_port=bool(settings.reuse_port),
        limits=ConnectionLimits(
            hello_timeout=settings.hello_timeout,
            max_message_bytes=settings.max_message_bytes,
            max_connections_per_user=settings.max_connections_per_user,
        ),
        ssl_context=tls_context(settings),
    )


def load_tools(settings: ServeSettings, config: Config) -> ToolRegistry:
    """The built-in tools, ``--tools`` and the entry points. Raises ``ValueError`` naming
    the one that does not load."""
    tools = ToolRegistry.with_builtins(max_threads=config.max_tool_threads)
    _load_named(tools.load, tools.load_entry_points, settings.tools, "--tools", "tools")
    return tools


def load_workflows(settings: ServeSettings) -> WorkflowRegistry:
    """The built-in workflows, ``--workflows`` and the entry points. Raises ``ValueError``
    naming the one that does not load."""
    workflows = WorkflowRegistry.with_builtins()
    _load_named(workflows.load, workflows.load_entry_points, settings.workflows, "--workflows", "workflows")
    return workflows


def _load_named(
    load: Callable[[str], object],
    load_entry_points: Callable[[], object],
    paths: Sequence[str],
    flag: str,
    kind: str,
) -> None:
    """Load each of ``paths`` (given with ``flag``), then the entry-point group
    ``backstream.<kind>``; a failure is a ``ValueError`` saying which."""
    for path in paths:
        try:
            load(path)
        except (ImportError, AttributeError, ValueError, TypeError) as exc:
            raise ValueError(f"{flag} {path}: {type(exc).__name__}: {exc}") from None
    try:
        load_entry_points()
    except Exception as exc:  # a third-party package's import failing
        raise ValueError(
            f"{kind} of the entry-point group backstream.{kind}: {type(exc).__name__}: {exc}"
        ) from None


def redact_url(url: str) -> str:
    """``url`` without a password, for logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def store_line(url: str) -> str:
    """The store as set, and for SQLite the file's absolute path (a relative one is
    relative to the working directory)."""
    line = f"store: {redact_url(url)}"
    if url.startswith("sqlite:///"):
        from backstream.runtime.stores.sqlite import path_from_url

        line += f" (file {os.path.abspath(path_from_url(url))})"
    return line


def startup_lines(
    settings: ServeSettings,
    models: list[str],
    tool_names: list[str],
    http_port: int | None,
    metrics_port: int | None = None,
) -> list[str]:
    """What an operator needs to know once the server listens (never a secret)."""
    status = "/healthz, /readyz, /metrics"
    http = "off"
    if http_port is not None:
        served = "/v1/responses, /client/" + (", the demo page /, /api/config" if settings.web else "")
        served += "" if metrics_port is not None else f", {status}"
        scheme = "https" if settings.tls_cert else "http"
        http = f"{scheme}://{settings.host}:{http_port} ({served})"
    if metrics_port is not None:
        http += f"; metrics: http://{settings.host}:{metrics_port} ({status})"
    upstream = redact_url(settings.upstream_url) if settings.upstream_url else "none (built-in models only)"
    cap = settings.max_output_tokens
    return [
        f"HTTP: {http}",
        store_line(settings.store),
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
    metrics_port: int | None = None


def configure_gc(thresholds: tuple[int, int, int] | None) -> None:
    """Tune the cyclic garbage collector of a serving process (``None``: Python's own).

    Python collects its youngest generation every 700 net allocations of container
    objects, and a full collection walks every object alive: with a thousand connections
    and their tasks, the server spent a fifth of its CPU there (docs/performance.md).
    Higher thresholds collect the same cycles less often; what startup loaded (modules,
    classes, functions) is frozen out of every collection, since it lives as long as the
    process. Memory stays bounded: cycles are still collected, a few thousand later.
    """
    if thresholds is None:
        return
    gc.freeze()
    gc.set_threshold(*thresholds)


async def serve(
    settings: ServeSettings,
    *,
    store: Store | None = None,
    handle_signals: bool = True,
    announce: Callable[[str], None] | None = None,
    task_status: trio.TaskStatus[ServeHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGINT/SIGTERM (or ``handle.shutdown`` is set), then shut down gracefully.

    Signals are taken before anything binds: one that comes while the server starts is queued
    and shuts it down cleanly once started, never a KeyboardInterrupt half-way through.
    """
    receiver = trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) if handle_signals else nullcontext()
    with receiver as signals:
        await _serve(settings, store, signals, announce, task_status)


async def _serve(
    settings: ServeSettings,
    store: Store | None,
    signals: AsyncIterator[int] | None,
    announce: Callable[[str], None] | None,
    task_status: trio.TaskStatus[ServeHandle],
) -> None:
    announce = announce or (lambda line: log.warning("%s", line))
    check_server_settings(settings)
    authenticator, dev_token = make_authenticator(settings)
    config = runtime_config(settings)
    door_config = front_door_config(settings)
    store = store or make_store(settings.store, config)
    shutdown = trio.Event()
    tools = load_tools(settings, config)
    workflows = load_workflows(settings)
    # Bound before the store opens: a server that cannot listen never touches its jobs.
    bound = await _BoundListeners.bind(settings, door_config)
    hooks, sender = webhook_parts(settings)
    runtime_cm = open_runtime(
        config, store=store, tools=tools, webhooks=hooks, webhook_sender=sender, workflows=workflows
    )
    async with bound, _closing(sender), runtime_cm as runtime, trio.open_nursery() as nursery:
        from backstream.protocol.version import VERSION

        if signals is not None:
            nursery.start_soon(_wait_for_signal, signals, shutdown)
        door = FrontDoor(runtime, authenticator, door_config, version=VERSION)
        await nursery.start(partial(door.run, listener=bound.door))
        http = _HttpListeners(runtime, door, authenticator, settings)
        http_port, metrics_port = await http.start(nursery, bound)
        scheme = "wss" if settings.tls_cert else "ws"
        log.info("backstream %s listening on %s://%s:%d/v1", VERSION, scheme, settings.host, door.port)
        log.info("Vercel AI SDK endpoint: %s://%s:%d/v1/ai-sdk", scheme, settings.host, door.port)
        models, names = runtime.allowed_models(), tools.names()
        for line in startup_lines(settings, models, names, http_port, metrics_port):
            log.info("%s", line)
        if config.upstream_url and not config.allowed_models:
            log.warning("any model may be named and is paid for: restrict them with --allow-model")
        if dev_token is not None:
            announce(f"no auth configured: connect as user 'dev' with token {dev_token}")
        http_scheme = "https" if settings.tls_cert else "http"
        if http_port is not None:
            log.info("Responses API on %s://%s:%d/v1/responses", http_scheme, settings.host, http_port)
        if settings.web:
            fragment = f"#token={dev_token}" if dev_token is not None else ""
            announce(f"demo chat page: {http_scheme}://{settings.host}:{http_port}/{fragment}")
        task_status.started(ServeHandle(door.port, http_port, dev_token, shutdown, metrics_port))
        await shutdown.wait()
        log.info("shutting down: closing clients, draining jobs for up to %gs", config.drain_timeout)
        door.stop_accepting()
        runtime.stop_accepting()
        door.close_all(1001, "server shutting down")
        http.stop_accepting()  # streams end; their clients resume on another instance or later
        with trio.move_on_after(door.config.limits.close_timeout + 1):
            await door.wait_closed()
            await http.wait_closed()
        nursery.cancel_scope.cancel()
    # Leaving open_runtime drained the jobs (drain_timeout), then interrupted the rest.
    finished = runtime.statistics().jobs.finished_total
    summary = ", ".join(f"{count} {status}" for status, count in sorted(finished.items()))
    log.info("stopped; jobs ended here: %s", summary or "none")


def webhook_parts(settings: ServeSettings) -> tuple[WebhookSettings | None, HttpWebhookSender | None]:
    """The webhooks' settings and HTTP client, or None without ``--webhook``."""
    if not settings.webhook:
        return None, None
    hooks = WebhookSettings(
        endpoints=tuple(settings.webhook),
        retry_schedule=settings.webhook_retry_schedule,
        timeout=settings.webhook_timeout,
        concurrency=settings.webhook_concurrency,
    )
    connections = hooks.concurrency * len(hooks.endpoints)  # every lane's attempts at once
    sender = HttpWebhookSender(
        settings.webhook_secret, ca_file=settings.webhook_ca_file, max_connections=connections
    )
    return hooks, sender


@asynccontextmanager
async def _closing(sender: HttpWebhookSender | None) -> AsyncIterator[None]:
    try:
        yield
    finally:
        if sender is not None:
            with trio.CancelScope(shield=True):
                await sender.aclose()


@attrs.frozen
class _BoundListeners:
    """The listening sockets of ``serve``, bound before the runtime opens its store."""

    door: trio.SocketListener
    http: trio.SocketListener | None
    metrics: trio.SocketListener | None

    @classmethod
    async def bind(cls, settings: ServeSettings, door: FrontDoorConfig) -> _BoundListeners:
        """Bind each configured port. Raises ``ListenError`` naming the first that cannot
        be bound (those bound before it are closed)."""
        reuse = bool(settings.reuse_port)
        sockets: list[trio.SocketListener] = []

        async def listen(port: int, send_buffer: int) -> trio.SocketListener:
            sockets.append(
                await open_tcp_listener(settings.host, port, reuse_port=reuse, send_buffer=send_buffer)
            )
            return sockets[-1]

        http_buffer = HttpServerConfig(host=settings.host, port=0).socket_send_buffer
        try:
            return cls(
                await listen(settings.port, door.socket_send_buffer),
                None if settings.http_port is None else await listen(settings.http_port, http_buffer),
                None if settings.metrics_port is None else await listen(settings.metrics_port, http_buffer),
            )
        except BaseException:
            for sock in sockets:
                sock.socket.close()
            raise

    async def __aenter__(self) -> _BoundListeners:
        await trio.lowlevel.checkpoint()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Close the sockets (those served are closed already; again is harmless).
        Cancellation: they are closed all the same."""
        for listener in (self.door, self.http, self.metrics):
            if listener is not None:
                listener.socket.close()
        await trio.lowlevel.checkpoint_if_cancelled()


class _HttpListeners:
    """The HTTP side: the API listener (``http_port``) and, if set, a metrics listener."""

    def __init__(
        self, runtime: Runtime, door: FrontDoor, authenticator: Authenticator, settings: ServeSettings
    ) -> None:
        self._runtime = runtime
        self._door = door
        self._auth = authenticator
        self._settings = settings
        self._apps: list[HttpApp] = []
        self._servers: list[HttpServer] = []
        self._api: HttpApp | None = None

    def _status_routes(self, with_metrics: bool) -> dict[str, StaticRoute]:
        runtime = self._runtime

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

        routes: dict[str, StaticRoute] = {"/healthz": healthz, "/readyz": readyz}
        if with_metrics:
            render = metrics_text(runtime, self._door, self._api)

            async def metrics() -> tuple[int, str, bytes]:
                await trio.lowlevel.checkpoint()
                return 200, "text/plain; version=0.0.4; charset=utf-8", render()

            routes["/metrics"] = metrics
        return routes

    def _static_routes(self) -> dict[str, StaticRoute]:
        """The browser client; with ``web``, the demo page and its ``/api/config``."""
        settings = self._settings
        routes = asset_routes(web=bool(settings.web))
        if settings.web:
            routes["/api/config"] = WebConfig(
                self._runtime, ws_port=self._door.port, tls=bool(settings.tls_cert)
            )
        return routes

    async def _serve(
        self,
        nursery: trio.Nursery,
        app: HttpApp,
        listener: trio.SocketListener,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> int:
        settings = self._settings
        server = HttpServer(
            app,
            HttpServerConfig(
                host=settings.host,
                port=listener.socket.getsockname()[1],
                reuse_port=bool(settings.reuse_port),
                ssl_context=tls,
            ),
            streams=app.peer_streams,
        )
        self._apps.append(app)
        self._servers.append(server)
        port: int = await nursery.start(partial(server.run, listener=listener))
        return port

    async def start(self, nursery: trio.Nursery, bound: _BoundListeners) -> tuple[int | None, int | None]:
        """Serve the API on ``bound.http`` and the metrics on ``bound.metrics`` (each if set);
        returns their ports."""
        settings = self._settings
        http_port = metrics_port = None
        split = bound.metrics is not None
        if bound.http is not None:
            app = self._api = HttpApp(
                self._runtime,
                self._auth,
                limits=HttpLimits(
                    max_body_bytes=settings.max_message_bytes,
                    sse_keepalive=settings.sse_keepalive,
                    max_streams_per_user=settings.max_streams_per_user,
                    gzip_window_bits=compression_window_bits(settings) if settings.http_gzip else None,
                ),
                allow_origins=tuple(settings.allow_origin),
                static_routes=self._static_routes(),
            )
            app.status_routes.update(self._status_routes(with_metrics=not split))
            ResponsesApi(app)
            mount_streams(app, self._auth, settings, nursery)
            # Bearer tokens come here too: with TLS configured they never cross in clear text.
            tls = self._door.config.ssl_context
            http_port = await self._serve(nursery, app, bound.http, tls=tls)
        if bound.metrics is not None:
            metrics_app = HttpApp(self._runtime, None, status_routes=self._status_routes(with_metrics=True))
            metrics_port = await self._serve(nursery, metrics_app, bound.metrics)
        return http_port, metrics_port

    def stop_accepting(self) -> None:
        for app in self._apps:
            app.closing.set()
        for server in self._servers:
            server.stop_accepting()

    async def wait_closed(self) -> None:
        """Wait (bounded by each server's graceful timeout) until every connection has ended."""
        for server in self._servers:
            await server.wait_closed()


async def _wait_for_signal(signals: AsyncIterator[int], shutdown: trio.Event) -> None:
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
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):  # a job's start and end (actors/job_lines.py)
            entry.update({key: value for key, value in fields.items() if key not in entry})
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
