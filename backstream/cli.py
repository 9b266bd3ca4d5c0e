"""The ``backstream`` command: serve, demo, schema, token, version."""

from __future__ import annotations

import argparse
import json
import os
import sys

import trio

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    from backstream.runtime.settings import add_serve_arguments

    parser = argparse.ArgumentParser(
        prog="backstream", description="AI responses as background jobs, on trio."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser("serve", help="run the WebSocket server")
    add_serve_arguments(serve_parser)
    demo = sub.add_parser(
        "demo", help="start a server, run a job, drop the connection, resume, show the answer"
    )
    demo.add_argument("--words", type=int, default=120, help="length of the answer in words")
    demo.add_argument("--rate", type=float, default=40.0, help="words per second")
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
    args = parser.parse_args(argv)

    if args.command == "version":
        from backstream import __version__

        print(__version__)
    elif args.command == "schema":
        from backstream.protocol.schema import json_schema

        print(json.dumps(json_schema(), indent=2))
    elif args.command == "token":
        from backstream.runtime.auth import mint_jwt

        secret = os.environ.get("BACKSTREAM_JWT_SECRET")
        if not secret:
            sys.exit("backstream token: set BACKSTREAM_JWT_SECRET (the server's HS256 secret)")
        print(mint_jwt(secret, args.user, ttl=args.ttl))
    elif args.command == "serve":
        from backstream.runtime.serve import configure_logging, serve
        from backstream.runtime.settings import load_settings

        try:
            settings = load_settings(args)
        except (ValueError, OSError) as exc:
            sys.exit(f"backstream serve: {exc}")
        configure_logging(settings.log_format, settings.log_level)
        if settings.workers > 1:
            from backstream.runtime.workers import run_workers

            sys.exit(run_workers(settings, sys.argv[1:]))
        try:
            trio.run(serve, settings)
        except ValueError as exc:
            sys.exit(f"backstream serve: {exc}")
    elif args.command == "demo" and args.web:
        from backstream.demo import run_web_demo

        sys.exit(trio.run(run_web_demo, args.port, args.http_port))
    elif args.command == "demo":
        from backstream.demo import run_demo

        sys.exit(trio.run(run_demo, args.words, args.rate))
