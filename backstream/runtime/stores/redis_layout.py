"""Which key layout a prefix holds: checked once when a ``RedisStore`` opens.

The first open of a prefix writes the marker ``{p}:layout`` (``LAYOUT``). A prefix
without it that holds keys only an earlier layout writes (its instance set:
``{p}:running``, ``{p}:expiry``, ``{p}:outbox``) is refused with ``StoreLayoutError``:
this layout would not find those jobs, and their instances' writes would go on
beside ours. So is a prefix whose marker names another layout.
"""

from __future__ import annotations

from coredis.tokens import PureToken

from backstream.protocol.errors import UnavailableError
from backstream.runtime.stores.redis_client import RedisConnection
from backstream.runtime.stores.redis_keys import LAYOUT

__all__ = ["StoreLayoutError", "check_layout"]


class StoreLayoutError(UnavailableError):
    """The prefix holds data of another key layout (``serve`` exits with its message)."""


async def check_layout(conn: RedisConnection) -> None:
    """Write the marker on a fresh prefix; raise ``StoreLayoutError`` on one that holds
    another layout's data. Two round trips at most. Cancellation: the marker may or may
    not be written (writing it again is harmless)."""
    k, client = conn.keys, conn.client
    marker = await conn.call(client.get(k.layout()))
    if marker == LAYOUT:
        return
    advice = (
        "stop the servers of the earlier version and delete the prefix's keys (its jobs are "
        "lost), or serve this version under another BACKSTREAM_REDIS_PREFIX"
    )
    if marker is not None:
        raise StoreLayoutError(
            f"the Redis prefix {k.prefix!r} holds key layout {marker} ({k.layout()}); this "
            f"version reads layout {LAYOUT} only: {advice}"
        )
    for key in k.earlier_layout_keys():
        if await conn.call(client.exists([key])):
            raise StoreLayoutError(
                f"the Redis prefix {k.prefix!r} holds jobs of an earlier key layout ({key} "
                f"is there, the marker {k.layout()} is not); this version does not read them: "
                f"{advice}"
            )
    await conn.call(client.set(k.layout(), LAYOUT, condition=PureToken.NX))
