"""The ``backstream`` command: serve, demo, schema, token, version."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sqlite3
import sys
from functools import partial
from typing import Any

import trio

from backstream.protocol.errors import UnavailableError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Run the command ``argv`` names. A reader that closes stdout early (``| head``) ends
    it quietly, with status 1 and no traceback."""
    try:
        _run_command(argv)
        sys.stdout.flush()  # what is still buffered fails here, not at exit
    except BaseException as exc:
        if not _is_broken_pipe(exc):
            raise
        # Python would flush stdout again at exit and report that failure too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)


def _is_broken_pipe(exc: BaseException) -> bool:
    """Whether ``exc`` is (or a group holds only) a closed stdout's ``BrokenPipeError``."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_broken_pipe(inner) for inner in exc.exceptions)
    return isinstance(exc, BrokenPipeError)


def _run_command(argv: list[str] | None) -> None:
    from backstream.protocol.version import VERSION
    from backstream.runtime.server.settings import add_serve_arguments

    parser = argparse.ArgumentParser(
        prog="backstream", description="AI responses as background jobs, on trio."
    )
    parser.add_argument("--version", action="version", version=f"backstream {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser(
        "serve",
        help="run the WebSocket server",
        usage="backstream serve [--config FILE] [options]",
        description="Settings come from flags, then BACKSTREAM_* environment variables, "
        "then the --config TOML file, then defaults.",
    )
    add_serve_arguments(serve_parser)
    demo = sub.add_parser(
        "demo", help="start a server, run a job, drop the connection, resume, show the answer"
    )
    demo.add_argument("--words", type=int, default=120, help="length of the answer in words")
    demo.add_argument("--rate", type=float, default=40.0, help="words per second (built-in models)")
    demo.add_argument(
        "--upstream-url", help="an OpenAI-compatible base URL (key from BACKSTREAM_UPSTREAM_API_KEY)"
    )
    demo.add_argument(
        "--model",
        default="backstream/lorem",
        help="the model to ask (default: %(default)s; with --web the page picks)",
    )
    demo.add_argument(
        "--web", action="store_true", help="serve the demo chat page instead and print its URL (Ctrl-C stops)"
    )
    demo.add_argument("--port", type=int, default=8765, help="with --web: WebSocket port (or a free one)")
    demo.add_argument("--http-port", type=int, default=8766, help="with --web: page port (or a free one)")
    sub.add_parser("schema", help="print the JSON Schema of every wire message")
    token_parser = sub.add_parser("token", help="mint a JWT for a user (needs BACKSTREAM_JWT_SECRET)")
    token_parser.add_argument("user")
    token_parser.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires")
    sub.add_parser("version", help="print the version")
    from backstream.runtime.server.webhooks_cli import add_webhooks_arguments, run_webhooks_command

    add_webhooks_arguments(sub.add_parser("webhooks", help="list and redeliver failed webhook events"))
    args = parser.parse_args(argv)

    if args.command == "version":
        print(VERSION)
    elif args.command == "schema":
        from backstream.protocol.schema import json_schema

        print(json.dumps(json_schema(), indent=2))
    elif args.command == "token":
        from backstream.runtime.server.auth import mint_jwt

        secret = os.environ.get("BACKSTREAM_JWT_SECRET")
        if not secret:
            sys.exit("backstream token: set BACKSTREAM_JWT_SECRET (the server's HS256 secret)")
        print(mint_jwt(secret, args.user, ttl=args.ttl))
    elif args.command == "serve":
        _serve(args)
    elif args.command == "webhooks":
        run_webhooks_command(args)
    elif args.command == "demo" and args.web:
        from backstream.demo import run_web_demo

        sys.exit(trio.run(partial(run_web_demo, args.port, args.http_port, upstream_url=args.upstream_url)))
    elif args.command == "demo":
        from backstream.demo import run_demo

        sys.exit(
            trio.run(
                partial(run_demo, args.words, args.rate, upstream_url=args.upstream_url, model=args.model)
            )
        )


# Mistakes an operator can make at startup: one line each, never a traceback.
_STARTUP_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    sqlite3.Error,
    ImportError,
    UnavailableError,  # the store cannot be opened or reached
)


def _serve(args: argparse.Namespace) -> None:
    from backstream.runtime.server.serve import configure_gc, configure_logging, serve
    from backstream.runtime.server.settings import load_settings

    try:
        settings = load_settings(args)
    except ValueError as exc:
        sys.exit(f"backstream serve: {exc}")
    configure_logging(settings.log_format, settings.log_level)
    if settings.workers > 1:
        from backstream.runtime.server.workers import run_workers

        sys.exit(run_workers(settings, sys.argv[1:]))
    configure_gc(settings.gc_thresholds)
    try:
        trio.run(serve, settings)
    except KeyboardInterrupt:  # SIGINT before the server could take over its signals
        sys.exit("backstream serve: interrupted while starting")
    except BaseException as exc:
        known = _startup_error(exc)
        if known is None:
            raise
        sys.exit(f"backstream serve: {_describe(known, settings)}")


def _startup_error(exc: BaseException) -> BaseException | None:
    """The operator's mistake inside ``exc`` (perhaps wrapped in exception groups), if any."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _startup_error(inner)
            if found is not None:
                return found
        return None
    return exc if isinstance(exc, _STARTUP_ERRORS) else None


def _describe(exc: BaseException, settings: Any) -> str:
    from backstream.runtime.server.listeners import ListenError

    if isinstance(exc, ListenError):
        hint = " (is another server running on it?)" if exc.errno == errno.EADDRINUSE else ""
        return f"{_port_setting(exc.port, settings)}: {exc}{hint}"
    if isinstance(exc, UnavailableError):
        return f"cannot open the store {settings.store}: {exc}"
    if isinstance(exc, sqlite3.Error):
        return f"cannot open the store {settings.store}: {exc}"
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror or exc}{where}"
        if exc.filename and str(exc.filename) in settings.store:
            return f"cannot open the store {settings.store}: {text}"
        return text
    return str(exc)


def _port_setting(port: int, settings: Any) -> str:
    """The flag and value that asked for ``port``: ``--port 8765``, ``--http-port 8080``."""
    for name in ("port", "http_port", "metrics_port"):
        if getattr(settings, name) == port:
            return f"--{name.replace('_', '-')} {port}"
    return f"port {port}"
