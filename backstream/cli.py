"""The ``backstream`` command."""

from __future__ import annotations

import argparse
import sys

import trio

import backstream

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="backstream", description="AI responses as background jobs, on trio."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a job, drop the watch midway, resume it, show the answer")
    demo.add_argument("--words", type=int, default=120, help="length of the answer in words")
    demo.add_argument("--rate", type=float, default=40.0, help="words per second")
    sub.add_parser("version", help="print the version")
    args = parser.parse_args(argv)
    if args.command == "version":
        print(backstream.__version__)
    elif args.command == "demo":
        from backstream.demo import run_demo

        sys.exit(trio.run(run_demo, args.words, args.rate))
