"""``backstream webhooks``: the operator's view of webhook deliveries, read from the store
(``--store``, else ``BACKSTREAM_STORE``, else the serve default) while servers run.

    backstream webhooks failed              dead-lettered events, oldest first
    backstream webhooks redeliver ID|--all  send them again (a fresh retry schedule)
    backstream webhooks disabled            endpoints disabled for answering 410 Gone
    backstream webhooks enable ENDPOINT     send to it again (its key, ep_…, or its URL)
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import trio

from backstream.actors.ports import Store
from backstream.protocol.webhooks import endpoint_key, parse_endpoint

__all__ = ["add_webhooks_arguments", "run_webhooks_command"]

DEFAULT_STORE = "sqlite:///./backstream.db"
FAILED_LIMIT = 1000


def add_webhooks_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store", help=f"the store the servers use [default: env BACKSTREAM_STORE, else {DEFAULT_STORE}]"
    )
    sub = parser.add_subparsers(dest="webhooks_command", required=True)
    failed = sub.add_parser("failed", help="list dead-lettered events")
    failed.add_argument("--limit", type=int, default=100, help="at most this many (default: %(default)s)")
    redeliver = sub.add_parser("redeliver", help="send dead-lettered events again")
    redeliver.add_argument("ids", nargs="*", help="event ids (evt_…) or delivery ids (evt_…:ep_…)")
    redeliver.add_argument("--all", action="store_true", help="every dead-lettered event")
    sub.add_parser("disabled", help="list endpoints disabled for answering 410 Gone")
    enable = sub.add_parser("enable", help="send to a disabled endpoint again")
    enable.add_argument("endpoint", help="its key (ep_…) or its URL")


def run_webhooks_command(args: argparse.Namespace) -> None:
    """Exits non-zero with one line on a mistake (never a traceback)."""
    from backstream.runtime.server.serve import make_store  # the whole server: only when asked

    url = args.store or os.environ.get("BACKSTREAM_STORE") or DEFAULT_STORE
    try:
        store = make_store(url)
    except ValueError as exc:
        sys.exit(f"backstream webhooks: {exc}")
    if args.webhooks_command == "redeliver" and bool(args.ids) == bool(args.all):
        sys.exit("backstream webhooks redeliver: name event ids, or --all (not both)")
    if args.webhooks_command == "enable" and not args.endpoint.startswith("ep_"):
        try:
            args.endpoint = endpoint_key(parse_endpoint(args.endpoint).url)
        except ValueError as exc:
            sys.exit(f"backstream webhooks enable: {exc}")
    try:
        code = trio.run(_run, store, args)
    except Exception as exc:  # the store cannot be opened or reached: one line
        sys.exit(f"backstream webhooks: cannot use the store {url}: {exc}")
    sys.exit(code)


async def _run(store: Store, args: argparse.Namespace) -> int:
    await store.open()
    try:
        command = args.webhooks_command
        if command == "failed":
            return await _failed(store, args.limit)
        if command == "redeliver":
            count = await store.redeliver_webhooks(None if args.all else args.ids, time.time())
            print(f"{count} event deliveries due again")
            return 0 if count or args.all else 1
        if command == "disabled":
            for key, reason in sorted((await store.disabled_endpoints()).items()):
                print(f"{key}\t{reason}")
            return 0
        key = args.endpoint  # its key: a URL was turned into it before
        if await store.enable_endpoint(key):
            print(f"{key} enabled")
            return 0
        print(f"{key} was not disabled", file=sys.stderr)
        return 1
    finally:
        await store.aclose()


async def _failed(store: Store, limit: int) -> int:
    dead = await store.failed_webhooks(min(limit, FAILED_LIMIT))
    if dead:
        print("event\tdelivery\ttype\turl\tattempts\tdead since\tlast error")
    for d in dead:
        when = datetime.datetime.fromtimestamp(d.dead_at or 0, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        print(f"{d.event_id}\t{d.delivery_id}\t{d.event_type}\t{d.url}\t{d.attempts}\t{when}\t{d.last_error}")
    counts = await store.webhook_counts()
    print(f"{counts.dead} dead-lettered, {counts.pending} waiting", file=sys.stderr)
    return 0
