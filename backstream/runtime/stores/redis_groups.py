"""Group commit on Redis: the commit scripts of many jobs sent in one pipeline.

Every job's writer is woken by the registry's ticker on the same ``flush_ms`` grid, so
their commits reach the store together. Sent one by one, each is a round trip of its own
through coredis (a pooled connection taken and given back, a timeout scope, a reply
parsed alone): most of what a flush costs the instance's CPU. ``ScriptGroups`` takes
every call waiting (at most ``GROUP_LIMIT``) and sends them as one non-transactional
pipeline: one write, one read, each script still atomic on its own slot (a cluster
pipeline splits the group by node). The commands Redis runs are the same; their number
does not change, only the instance's cost of sending them.

Each call's reply or error goes to its caller alone: a script Redis does not know yet
(``NOSCRIPT``: a restarted server) is run again alone, which loads it; an outage fails
every call of the group with ``UnavailableError``, as it would have failed each.
Announcements between commits (``publish``: an ``SPUBLISH``) go in the same pipelines.
"""

from __future__ import annotations

from typing import Any

import attrs
import coredis
import trio

from backstream.actors.ports import StoreClosedError
from backstream.protocol.errors import UnavailableError
from backstream.runtime.stores.redis_client import UNAVAILABLE, RedisConnection

__all__ = ["GROUP_LIMIT", "WAITING_LIMIT", "ScriptGroups", "ScriptGroupsStatistics"]

GROUP_LIMIT = 256
"""Calls sent in one pipeline at most; more wait for the next."""
WAITING_LIMIT = 4096
"""Calls waiting for a pipeline at most; when full, callers wait for room."""
_PUBLISH = "SPUBLISH"
"""The name of a call that is an announcement, not a script."""
PIPELINE_TIMEOUT_S = 10.0
"""A pipeline's replies not all read in this long fail its calls (an outage: retried)."""


@attrs.frozen
class ScriptGroupsStatistics:
    groups_sent: int
    """Pipelines sent."""
    calls_sent: int
    """Script calls they carried."""
    largest_group: int
    calls_waiting: int


@attrs.define(eq=False)
class _Call:
    name: str
    keys: list[str]
    args: list[str]
    done: trio.Event = attrs.Factory(trio.Event)
    reply: Any = None
    error: BaseException | None = None

    def settle(self, reply: Any = None, error: BaseException | None = None) -> None:
        self.reply, self.error = reply, error
        self.done.set()


class ScriptGroups:
    """Script calls of one ``RedisConnection`` sent together (``run`` sends them); a call
    made while ``run`` is not running goes alone."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn
        self._waiting: list[_Call] = []
        self._room = trio.Semaphore(WAITING_LIMIT)
        self._wake = trio.Event()
        self._running = False
        self._groups_sent = 0
        self._calls_sent = 0
        self._largest = 0

    def statistics(self) -> ScriptGroupsStatistics:
        return ScriptGroupsStatistics(self._groups_sent, self._calls_sent, self._largest, len(self._waiting))

    async def publish(self, channel: str, message: str) -> int:
        """``SPUBLISH`` with the next group; returns how many subscribers got it. Waits and
        is cancelled as ``script`` is."""
        return int(await self.script(_PUBLISH, [channel], [message]))

    async def script(self, name: str, keys: list[str], args: list[str]) -> Any:
        """Run one of the connection's scripts with the next group, and return its reply;
        raises what ``RedisConnection.script`` raises. Waits for room while
        ``WAITING_LIMIT`` calls wait. Cancellation: a call still waiting for its group is
        withdrawn (so no more than ``WAITING_LIMIT`` ever wait); one already sent runs or
        not, its reply dropped, as a call sent alone runs or not."""
        if not self._running:
            return await self._alone(_Call(name, keys, args))
        async with self._room:
            call = _Call(name, keys, args)
            self._waiting.append(call)
            self._wake.set()
            try:
                await call.done.wait()
            except BaseException:
                if call in self._waiting:  # not sent yet: nobody will want its reply
                    self._waiting.remove(call)
                raise
        if call.error is not None:
            raise call.error
        return call.reply

    async def run(self) -> None:
        """Send what waits, a group at a time, until cancelled; then every call still
        waiting gets ``StoreClosedError``."""
        self._running = True
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._waiting:
                    group, self._waiting = self._waiting[:GROUP_LIMIT], self._waiting[GROUP_LIMIT:]
                    await self._send(group)
        finally:
            self._running = False
            waiting, self._waiting = self._waiting, []
            for call in waiting:
                call.settle(error=StoreClosedError("the store is closed"))

    async def _send(self, group: list[_Call]) -> None:
        """Send the group; every call of it is settled when this returns or raises."""
        self._groups_sent += 1
        self._calls_sent += len(group)
        self._largest = max(self._largest, len(group))
        try:
            alone = group if len(group) == 1 else await self._send_together(group)
            for call in alone:  # a pipeline of one costs more than the call; NOSCRIPT loads it
                try:
                    call.settle(await self._alone(call))
                except Exception as exc:
                    call.settle(error=exc)
        finally:  # cancelled (the store stops): what was not answered will not be
            for call in group:
                if not call.done.is_set():
                    call.settle(error=StoreClosedError("the store is closed"))

    async def _send_together(self, group: list[_Call]) -> list[_Call]:
        """One pipeline; settles each call with its reply or error, and returns the calls
        whose script Redis did not know (to be sent alone)."""
        try:
            requests = await self._pipeline(group)
        except Exception as exc:  # each call fails as it would have alone
            error = self._unavailable(exc)
            for call in group:
                call.settle(error=error)
            return []
        alone: list[_Call] = []
        for call, request in zip(group, requests, strict=True):
            try:
                call.settle(await request)
            except coredis.exceptions.NoScriptError:
                alone.append(call)
            except Exception as exc:
                call.settle(error=self._unavailable(exc))
        return alone

    async def _alone(self, call: _Call) -> Any:
        if call.name == _PUBLISH:
            return await self._conn.call(self._conn.client.spublish(call.keys[0], call.args[0]))
        return await self._conn.script(call.name, call.keys, call.args)

    async def _pipeline(self, group: list[_Call]) -> list[Any]:
        """Send the group's scripts (``EVALSHA``) and announcements in one pipeline; the
        per-call replies or errors, to be awaited."""
        client = self._conn.client
        scripts = self._conn.scripts
        async with client.pipeline(
            transaction=False, raise_on_error=False, timeout=PIPELINE_TIMEOUT_S
        ) as pipe:
            requests = [
                pipe.spublish(call.keys[0], call.args[0])
                if call.name == _PUBLISH
                else pipe.evalsha(scripts[call.name].sha, keys=call.keys, args=call.args)
                for call in group
            ]
        return requests

    def _unavailable(self, exc: Exception) -> Exception:
        """An outage as ``RedisConnection.call`` reports one; any other error as it is."""
        if isinstance(exc, UNAVAILABLE):
            if isinstance(exc, coredis.exceptions.ReadOnlyError):
                self._conn.forget_primary()
            return UnavailableError(f"redis unavailable: {exc}")
        return exc
