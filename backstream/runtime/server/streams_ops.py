"""Durable Streams operations over a ``StreamStore``: what needs more than one stream (forks and
their references, soft delete and its cascade, reads stitched across a fork chain), expiry, and
the limits of each user. The HTTP shell is ``streams_http``; every rule of one stream is the
sans-IO ``protocol/streams_state``."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable

import attrs
import trio

from backstream.protocol.errors import UnavailableError
from backstream.protocol.streams_state import (
    AppendPlan,
    AppendRequest,
    CreateRequest,
    Message,
    StreamRefusal,
    StreamState,
    is_json,
    normalize_type,
    plan_append,
    plan_create,
    same_config,
)
from backstream.runtime.stores.streams import Change, StreamStore, owner_of

__all__ = ["StreamLimits", "StreamOps"]

log = logging.getLogger("backstream.streams")

MAX_FORK_DEPTH = 64
"""A fork of a fork ... at most this deep: reads walk the chain."""


@attrs.frozen(kw_only=True)
class StreamLimits:
    max_streams_per_user: int = 10_000
    max_bytes_per_user: int = 1024**3
    max_read_bytes: int = 1024 * 1024
    """One catch-up response carries at most this (at least one message)."""


class StreamOps:
    def __init__(
        self,
        store: StreamStore,
        limits: StreamLimits | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.limits = limits or StreamLimits()
        self._clock = clock

    async def live(self, key: str) -> StreamState:
        """The stream's state; ``StreamRefusal`` 404 if there is none (or it expired), 410 if
        it was deleted while forks still read it."""
        state = await self.store.get(key)
        if state is not None and state.expired(self._clock()):
            state = await self._expire(key)
        if state is None:
            raise StreamRefusal(404, "no such stream")
        if state.soft_deleted:
            raise StreamRefusal(410, "the stream was deleted")
        return state

    async def _expire(self, key: str) -> StreamState | None:
        """An expired stream goes, or is soft-deleted while forks read it."""
        now = self._clock()

        def decide(current: StreamState | None) -> Change[StreamState | None]:
            if current is None or not current.expired(now):
                return Change(current)
            if current.ref_count > 0:
                soft = attrs.evolve(current, soft_deleted=True)
                return Change(soft, state=soft)
            return Change(None, delete=True)

        before = await self.store.get(key)
        change = await self.store.update(key, decide)
        if change.delete and before is not None and before.forked_from:
            await self._release(before.forked_from)
        return change.result

    async def sweep(self, *, limit: int = 256) -> int:
        """Remove (or soft-delete) up to ``limit`` expired streams nobody touched since they
        expired; how many were found."""
        keys = await self.store.expired_keys(self._clock(), limit)
        for key in keys:
            await self._expire(key)
        return len(keys)

    async def run_sweeper(self, interval: float) -> None:
        """Sweep every ``interval`` seconds, until cancelled (an outage skips a round).

        Cancellation: stops; a stream being removed may stay for the next sweep."""
        while True:
            await trio.sleep(interval)
            try:
                while await self.sweep() >= 256:
                    await trio.lowlevel.checkpoint()
            except UnavailableError as exc:
                log.warning("durable streams: the expiry sweep skipped a round: %s", exc)

    async def create(self, key: str, request: CreateRequest) -> tuple[int, StreamState]:
        """PUT: 201 and the new stream, or 200 and the existing one with the same configuration."""
        now = self._clock()
        existing = await self.store.get(key)
        if existing is not None and existing.expired(now):
            existing = await self._expire(key)
        if existing is not None:
            return 200, self._idempotent(existing, request)
        usage = await self.store.usage(owner_of(key))
        if usage.streams >= self.limits.max_streams_per_user:
            raise StreamRefusal(429, "too many streams for this user")
        source = None
        prefix = b""
        if request.forked_from is not None:
            source = await self._fork_source(request)
            prefix = await self._sub_offset_prefix(request.forked_from, source, request)
        incarnation = secrets.token_hex(8)

        def decide(current: StreamState | None) -> Change[tuple[int, StreamState]]:
            if current is not None and not current.expired(now):
                return Change((200, self._idempotent(current, request)))
            if current is not None and current.ref_count > 0:
                raise StreamRefusal(409, "the stream was deleted; its forks still read it")
            state, messages = plan_create(
                request,
                incarnation=incarnation,
                now=now,
                source=source,
                forked_from=request.forked_from,
                sub_offset_prefix=prefix,
            )
            return Change((201, state), state=state, messages=tuple(messages), fresh=True)

        try:
            change = await self.store.update(key, decide)
        except BaseException:
            if request.forked_from is not None:
                await self._release(request.forked_from)
            raise
        if change.result[0] == 200 and request.forked_from is not None:
            await self._release(request.forked_from)
        return change.result

    @staticmethod
    def _idempotent(existing: StreamState, request: CreateRequest) -> StreamState:
        if existing.soft_deleted:
            raise StreamRefusal(409, "the stream was deleted; its forks still read it")
        if not same_config(existing, request, request.forked_from):
            raise StreamRefusal(409, "the stream exists with another configuration")
        return existing

    async def _fork_source(self, request: CreateRequest) -> StreamState:
        """The fork's source, with a reference taken on it for the fork."""
        assert request.forked_from is not None
        now = self._clock()
        try:
            source = await self.live(request.forked_from)
        except StreamRefusal as refusal:
            if refusal.status == 410:
                raise StreamRefusal(409, "the source stream was deleted") from None
            raise
        if request.content_type and not _same_type(request.content_type, source.content_type):
            raise StreamRefusal(409, "the content type differs from the source stream's")
        if request.fork_offset is not None and request.fork_offset > source.tail:
            raise StreamRefusal(400, "the fork offset is beyond the source stream's tail")

        def take(current: StreamState | None) -> Change[StreamState]:
            if current is None or current.expired(now):
                raise StreamRefusal(404, "no such source stream")
            if current.soft_deleted:
                raise StreamRefusal(409, "the source stream was deleted")
            taken = attrs.evolve(current, ref_count=current.ref_count + 1)
            return Change(taken, state=taken)

        return (await self.store.update(request.forked_from, take)).result

    async def _sub_offset_prefix(self, source_key: str, source: StreamState, request: CreateRequest) -> bytes:
        """What ``Stream-Fork-Sub-Offset`` inherits past the fork offset: the first values (JSON)
        or bytes of the source's next message; 400 past that message's end."""
        if not request.fork_sub_offset:
            return b""
        anchor = source.tail if request.fork_offset is None else request.fork_offset
        try:
            following = await self.read(source_key, source, anchor, max_bytes=1)
            if not following:
                raise StreamRefusal(400, "the fork sub-offset names no data")
            data = following[0][1]
            wanted = request.fork_sub_offset
            if is_json(source.content_type):
                values = json.loads(b"[" + data.rstrip(b",") + b"]")
                if wanted > len(values):
                    raise StreamRefusal(400, "the fork sub-offset is past the next message")
                return b"".join(json.dumps(v, separators=(",", ":")).encode() + b"," for v in values[:wanted])
            if wanted > len(data):
                raise StreamRefusal(400, "the fork sub-offset is past the next message")
            return data[:wanted]
        except BaseException:
            await self._release(source_key)
            raise

    async def append(self, key: str, request: AppendRequest) -> AppendPlan:
        now = self._clock()
        if request.body:  # the stream's own checks are the decision's, in the write
            usage = await self.store.usage(owner_of(key))
            if usage.bytes + len(request.body) > self.limits.max_bytes_per_user:
                raise StreamRefusal(413, "this user's streams hold as much as they may")

        def decide(current: StreamState | None) -> Change[AppendPlan]:
            if current is not None and current.expired(now) and current.ref_count > 0:
                raise StreamRefusal(410, "the stream expired; its forks still read it")
            if current is None or current.expired(now):
                raise StreamRefusal(404, "no such stream")  # an expired one goes when next read
            plan = plan_append(current, request, now)
            message = (plan.message,) if plan.message is not None else ()
            return Change(plan, state=plan.state, messages=message)

        return (await self.store.update(key, decide)).result

    async def delete(self, key: str) -> None:
        await self.live(key)

        def decide(current: StreamState | None) -> Change[StreamState]:
            if current is None:
                raise StreamRefusal(404, "no such stream")
            if current.soft_deleted:
                raise StreamRefusal(410, "the stream was deleted")
            if current.ref_count > 0:
                soft = attrs.evolve(current, soft_deleted=True)
                return Change(current, state=soft)
            return Change(current, delete=True)

        change = await self.store.update(key, decide)
        if change.delete and change.result.forked_from:
            await self._release(change.result.forked_from)

    async def _release(self, key: str) -> None:
        """Drop a fork's reference on its source; a soft-deleted source with none left goes,
        and so on up the chain."""
        while key:

            def decide(current: StreamState | None) -> Change[StreamState | None]:
                if current is None:
                    return Change(None)
                count = max(0, current.ref_count - 1)
                if count == 0 and current.soft_deleted:
                    return Change(current, delete=True)
                return Change(None, state=attrs.evolve(current, ref_count=count))

            change = await self.store.update(key, decide)
            if not change.delete or change.result is None or not change.result.forked_from:
                return
            key = change.result.forked_from

    async def touch(self, key: str, state: StreamState) -> None:
        """A read restarts a sliding TTL (not a HEAD). Written at most once a second."""
        now = self._clock()
        if state.ttl_seconds is None or now - state.last_access < 1.0:
            return

        def decide(current: StreamState | None) -> Change[None]:
            if current is None or current.incarnation != state.incarnation or current.expired(now):
                return Change(None)
            return Change(None, state=attrs.evolve(current, last_access=now))

        await self.store.update(key, decide)

    async def read(
        self, key: str, state: StreamState, after: int, *, max_bytes: int | None = None
    ) -> list[Message]:
        """Messages after position ``after``: inherited ones from the fork chain, then the
        stream's own; at most ``max_bytes`` (but at least one message, if there is one)."""
        budget = self.limits.max_read_bytes if max_bytes is None else max_bytes
        return await self._read_capped(key, state, after, state.tail, budget, depth=0)

    async def _read_capped(
        self, key: str, state: StreamState, after: int, cap: int, budget: int, *, depth: int
    ) -> list[Message]:
        out: list[Message] = []
        fork_offset = state.fork_offset
        if state.forked_from is not None and fork_offset is not None and after < fork_offset:
            source = await self.store.get(state.forked_from)
            if source is not None and depth < MAX_FORK_DEPTH:
                inherited_cap = min(cap, fork_offset)
                out = await self._read_capped(
                    state.forked_from, source, after, inherited_cap, budget, depth=depth + 1
                )
                if out and sum(len(data) for _, data in out) >= budget and out[-1][0] < inherited_cap:
                    return out
            after = max(after, fork_offset)
        used = sum(len(data) for _, data in out)
        if out and used >= budget:
            return out
        own = await self.store.read(key, after, cap, budget - used)
        return out + own


def _same_type(a: str, b: str) -> bool:
    return normalize_type(a) == normalize_type(b)
