"""Durable streams in the Redis store's server (or cluster): two keys per stream under a hash
tag of its own, ``{PREFIX:ds:HASH}``, so that a stream's keys share one cluster slot while
streams spread over all of them.

- ``state``: the stream's state (JSON of ``StreamState``);
- ``msgs``: its messages, a sorted set scored by end position; a member is the position (16
  digits), ``:`` and the message's bytes (as Latin-1 text: one character per byte).

``update`` is optimistic: it reads the state, runs the decision in Python, and a Lua script
writes the result only if the state is still the one read (else it reads and decides again).
Each user's usage (streams, bytes) is a hash in the user's slot, ``{PREFIX:user:USER}:ds``,
and the streams that may expire are a sorted set by deadline, ``{PREFIX:ds}:deadlines``; both
are moved by each write after it lands (not atomic with it: a crash between the two leaves
them off by that write; the sweep checks each stream it finds). Each write is announced on the
stream's channel, ``{PREFIX:ds:HASH}:changed`` (``SPUBLISH``, in the stream's slot): the
instances where a reader waits on the stream subscribe to it while it does, and also look
again every ``POLL_INTERVAL`` (for a write made while the subscription was being made).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from coredis.tokens import PureToken

from backstream.protocol.errors import UnavailableError
from backstream.protocol.streams_state import Message, StreamState
from backstream.runtime.stores.redis import RedisStore
from backstream.runtime.stores.redis_client import UNAVAILABLE
from backstream.runtime.stores.redis_subscriber import STREAM
from backstream.runtime.stores.streams import Change, StreamChanges, StreamUsage, owner_of

__all__ = ["POLL_INTERVAL", "RedisStreamStore"]

T = TypeVar("T")
POLL_INTERVAL = 1.0
MAX_ATTEMPTS = 64
"""Writes lost to others' writes of the same stream before one gives up (503)."""
PAGE = 256

_WRITE = """
local current = redis.call('GET', KEYS[1])
if current == false then current = '' end
if current ~= ARGV[1] then return 0 end
if ARGV[3] == 'delete' then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('SPUBLISH', KEYS[3], '1')
  return 1
end
if ARGV[3] == 'fresh' then redis.call('DEL', KEYS[2]) end
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[2]) end
for i = 4, #ARGV, 2 do redis.call('ZADD', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('SPUBLISH', KEYS[3], '1')
return 1
"""


class RedisStreamStore:
    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._prefix = store.prefix
        self._script: Any = None
        self._keys_of_channels: dict[str, str] = {}
        self.changes = StreamChanges(poll_interval=POLL_INTERVAL, interest=self._interest)
        store.subscriber.on_stream_change = self._announced

    def _keys(self, key: str) -> tuple[str, str, str]:
        """The stream's state, messages and channel: one hash tag, one slot."""
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        tag = "{" + f"{self._prefix}:ds:{digest}" + "}"
        return f"{tag}:state", f"{tag}:msgs", f"{tag}:changed"

    @contextmanager
    def _interest(self, key: str) -> Iterator[None]:
        """Subscribed to the stream's channel while it is watched here."""
        channel = self._keys(key)[2]
        self._keys_of_channels[channel] = key
        try:
            with self._store.subscriber.interest(STREAM, channel):
                yield
        finally:
            self._keys_of_channels.pop(channel, None)

    def _announced(self, channel: str) -> None:
        key = self._keys_of_channels.get(channel)
        if key is not None:
            self.changes.notify(key)

    def _deadlines_key(self) -> str:
        return "{" + f"{self._prefix}:ds" + "}:deadlines"

    def _usage_key(self, owner: str) -> str:
        return "{" + f"{self._prefix}:user:{owner}" + "}:ds"

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except UNAVAILABLE as exc:
            raise UnavailableError(f"redis unavailable: {exc}") from None

    async def get(self, key: str) -> StreamState | None:
        raw = await self._call(self._store.redis.get(self._keys(key)[0]))
        return StreamState.from_json(raw) if raw else None

    async def update(self, key: str, decide: Callable[[StreamState | None], Change[T]]) -> Change[T]:
        state_key, msgs_key, channel = self._keys(key)
        client = self._store.redis
        if self._script is None:
            self._script = client.register_script(_WRITE)
        for _ in range(MAX_ATTEMPTS):
            raw = await self._call(client.get(state_key)) or ""
            old = StreamState.from_json(raw) if raw else None
            change = decide(old)
            if not (change.delete or change.state is not None or change.messages):
                return change
            flag = "delete" if change.delete else "fresh" if change.fresh else ""
            args = [raw, change.state.to_json() if change.state is not None else "", flag]
            for end, data in change.messages:
                args += [str(end), f"{end:016d}:" + data.decode("latin-1")]
            if await self._call(self._script(keys=[state_key, msgs_key, channel], args=args)):
                new = None if change.delete else change.state or old
                await self._account(key, old, new)
                await self._index_deadline(key, new)
                self.changes.notify(key)
                return change
        raise UnavailableError("the stream is written too often at once; try again")

    async def _account(self, key: str, old: StreamState | None, new: StreamState | None) -> None:
        streams = (new is not None) - (old is not None)
        stored = (new.stored_bytes if new else 0) - (old.stored_bytes if old else 0)
        if streams or stored:
            usage_key = self._usage_key(owner_of(key))
            client = self._store.redis
            if streams:
                await self._call(client.hincrby(usage_key, "streams", streams))
            if stored:
                await self._call(client.hincrby(usage_key, "bytes", stored))

    async def _index_deadline(self, key: str, state: StreamState | None) -> None:
        deadline = None if state is None or state.soft_deleted else state.deadline
        client = self._store.redis
        if deadline is None:
            await self._call(client.zrem(self._deadlines_key(), [key]))
        else:
            await self._call(client.zadd(self._deadlines_key(), {key: deadline}))

    async def expired_keys(self, now: float, limit: int) -> list[str]:
        found = await self._call(
            self._store.redis.zrange(
                self._deadlines_key(), 0, now, sortby=PureToken.BYSCORE, offset=0, count=limit
            )
        )
        return [str(key) for key in found]

    async def read(self, key: str, after: int, up_to: int, max_bytes: int) -> list[Message]:
        msgs_key = self._keys(key)[1]
        out: list[Message] = []
        size = 0
        low = after
        while True:
            members = await self._call(
                self._store.redis.zrange(
                    msgs_key, low + 1, up_to, sortby=PureToken.BYSCORE, offset=0, count=PAGE
                )
            )
            for member in members:
                end_text, _, text = str(member).partition(":")
                data = text.encode("latin-1")
                if out and size + len(data) > max_bytes:
                    return out
                out.append((int(end_text), data))
                size += len(data)
            if len(members) < PAGE:
                return out
            low = out[-1][0]

    async def usage(self, owner: str) -> StreamUsage:
        raw = await self._call(self._store.redis.hgetall(self._usage_key(owner)))
        return StreamUsage(int(raw.get("streams", 0)), int(raw.get("bytes", 0)))
