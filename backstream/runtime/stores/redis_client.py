"""``RedisConnection``: the client, the keyspace and the scripts that every part of
``RedisStore`` (jobs, signals, inbox) shares, and how an outage surfaces
(``UnavailableError``).

The URL picks the client (``redis_urls``): one server, a Cluster (coredis' cluster
client, which follows ``MOVED`` and failovers) or a Sentinel group (a client whose
connections ask the sentinels for the primary, so a promotion is followed without a
restart). ``Replication`` makes chosen writes wait for replicas: ``confirm_replicated``
writes a marker in the key's slot and sends ``WAIT`` on that write's connection
(coredis' ``ensure_replication``; in a cluster, on the node of the key).
"""

from __future__ import annotations

import contextlib
import ssl
from typing import Any

import attrs
import coredis
import coredis.exceptions
from coredis.connection import TCPLocation

from backstream.actors.ports import StoreClosedError
from backstream.protocol.errors import UnavailableError
from backstream.runtime.stores import redis_quota_scripts
from backstream.runtime.stores import redis_scripts as scripts
from backstream.runtime.stores.redis_keys import RedisKeyspace
from backstream.runtime.stores.redis_urls import RedisUrl, parse_redis_url

__all__ = ["SAFETY_TTL_S", "UNAVAILABLE", "RedisConnection", "Replication", "ms", "script_bodies"]

SAFETY_TTL_S = 3600
"""Keys outlive retention by this, in case no sweep runs."""

UNAVAILABLE = (
    coredis.exceptions.ConnectionError,  # includes BusyLoadingError: Redis restarting
    coredis.exceptions.ReadOnlyError,  # a primary demoted to replica (a failover under way)
    coredis.exceptions.ClusterDownError,
    coredis.exceptions.TryAgainError,
    coredis.exceptions.ClusterError,  # redirections past coredis' retries (slots moving)
    coredis.exceptions.ClusterRoutingError,
    coredis.exceptions.SentinelError,  # no primary known yet, or one not yet promoted
    coredis.exceptions.ReplicationError,  # fewer replicas than asked acknowledged in time
    TimeoutError,
    OSError,
)

_SCRIPTS = {
    "create_user": scripts.CREATE_USER,
    "create_reserve": scripts.CREATE_RESERVE,
    "create_undo": scripts.CREATE_UNDO,
    "create_job": scripts.CREATE_JOB,
    "commit": scripts.COMMIT,
    "finish_user": scripts.FINISH_USER,
    "finish_instance": scripts.FINISH_INSTANCE,
    "handover": scripts.HANDOVER,
    "announce": scripts.ANNOUNCE,
    "alive": scripts.ALIVE,
    "renew": scripts.RENEW,
    "notify_claim": scripts.NOTIFY_CLAIM,
    "notify_insert": scripts.NOTIFY_INSERT,
    "claim": scripts.CLAIM,
    "expiry_take": scripts.EXPIRY_TAKE,
    "scan": scripts.SCAN,
    "watch": scripts.WATCH,
    **redis_quota_scripts.SCRIPTS,
}


def script_bodies() -> dict[str, str]:
    """The Lua scripts a ``RedisConnection`` registers, by name: what a tool that sees them
    by their SHA1 (``MONITOR``, ``SCRIPT EXISTS``) names them from."""
    return {**_SCRIPTS, _PROGRESS: _PROGRESS_SCRIPT}


def ms(seconds: float) -> int:
    return int(seconds * 1000)


@attrs.frozen
class Replication:
    """Writes that return only once ``replicas`` replicas hold them (``WAIT``), within
    ``timeout`` seconds; fewer in time is an outage (``UnavailableError``): the write
    happened on the primary, the caller retries it (every write is idempotent)."""

    replicas: int = 0
    timeout: float = 1.0
    each_flush: bool = False
    """Every commit waits, not only a job's terminal one."""

    def applies(self, terminal: bool) -> bool:
        return self.replicas > 0 and (terminal or self.each_flush)


class RedisConnection:
    """Opened once by the store; ``client`` raises ``StoreClosedError`` once closed."""

    def __init__(
        self,
        url: str,
        prefix: str,
        *,
        replication: Replication | None = None,
    ) -> None:
        """Raises ``ValueError`` for a URL of no known form (naming the forms)."""
        self.parsed: RedisUrl = parse_redis_url(url)
        self.cluster = self.parsed.kind == "cluster"
        self.url = url
        self.replication = replication or Replication()
        self.keys = RedisKeyspace(prefix)
        self.scripts: dict[str, Any] = {}
        self._client: coredis.Redis[str] | coredis.RedisCluster[str] | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    @property
    def client(self) -> coredis.Redis[str] | coredis.RedisCluster[str]:
        if self._client is None:
            raise StoreClosedError("the store is closed")
        return self._client

    async def open(self) -> None:
        """Connect, register the scripts and ping. Cancellation: nothing stays open."""
        stack = contextlib.AsyncExitStack()
        try:
            client = await _open_client(self.parsed, stack)
            self._client = client
            self.scripts = {name: client.register_script(body) for name, body in _SCRIPTS.items()}
            self.scripts[_PROGRESS] = client.register_script(_PROGRESS_SCRIPT)
            await self.call(client.ping())
            if self.parsed.kind != "cluster":
                await self._refuse_cluster_node(client)
        except BaseException:
            self._client = None
            await stack.aclose()
            raise
        self._stack = stack

    async def aclose(self) -> None:
        """Cancellation: the connections are closed all the same."""
        stack, self._stack = self._stack, None
        self._client = None
        if stack is not None:
            await stack.aclose()

    @property
    def closed(self) -> bool:
        return self._client is None

    async def _refuse_cluster_node(self, client: coredis.Redis[str] | coredis.RedisCluster[str]) -> None:
        """A ``redis://`` URL naming a Cluster node would meet ``MOVED`` at its first key:
        refuse it at once, with the URL to use instead."""
        try:
            info = await client.info("cluster")
        except coredis.exceptions.ResponseError:
            return  # INFO denied (an ACL): the first redirected key will tell
        if str(info.get("cluster_enabled", "0")) == "1":
            hint = self.parsed.location_text()
            raise ValueError(
                f"{self.parsed.redacted} points at a Redis Cluster node: use redis+cluster://{hint}"
                if not self.parsed.tls
                else f"{self.parsed.redacted} points at a Redis Cluster node: use rediss+cluster://{hint}"
            )

    async def call(self, coro: Any) -> Any:
        """Await a client call; an outage raises ``UnavailableError``. Cancellation: as the
        call's (a command may or may not have run)."""
        try:
            return await coro
        except UNAVAILABLE as exc:
            if isinstance(exc, coredis.exceptions.ReadOnlyError):
                self.forget_primary()
            raise UnavailableError(f"redis unavailable: {exc}") from None

    def forget_primary(self) -> None:
        """A write met a replica where the primary was: drop the pooled connections, so
        the next ones ask the sentinels again (a promotion followed) or reconnect."""
        client = self._client
        if client is not None and self.parsed.kind != "cluster":
            client.connection_pool.disconnect()

    async def script(self, name: str, keys: list[str], args: list[str]) -> Any:
        """Run one of the store's Lua scripts (all its ``keys`` in one cluster slot: a
        cluster client routes the call by them). Cancellation: it ran entirely or not at all."""
        if self.closed:
            raise StoreClosedError("the store is closed")
        return await self.call(self.scripts[name](keys=keys, args=args))

    async def confirm_replicated(self, key: str) -> None:
        """Return once ``replication``'s replicas hold everything written to ``key``'s node
        so far; raise ``UnavailableError`` if they do not answer in time. A write of its
        own in ``key``'s slot (a marker beside it that expires), then ``WAIT`` on that
        write's connection: Redis answers once the replicas reached that write, and so
        every write the node took before it, whatever connection carried them.
        Cancellation: as ``call``."""
        client, wanted = self.client, self.replication
        with client.ensure_replication(wanted.replicas, ms(wanted.timeout)):
            await self.call(client.set(f"{key}:replicated", "1", px=ms(_MARKER_TTL_S)))

    async def read_progress(self, key: str) -> list[Any]:
        """``seq`` and ``status`` of a job record, read on its primary: a replica (a demoted
        primary, a failover under way) answers ``READONLY``, an outage, rather than a
        progress that can no longer move. Cancellation: safe."""
        return list(await self.script(_PROGRESS, [key], []))


_PROGRESS = "progress"
_PROGRESS_SCRIPT = """#!lua
return redis.call('HMGET', KEYS[1], 'seq', 'status')
"""
"""With a shebang and without ``no-writes``, Redis runs it on a primary only."""

_SENTINEL_CONNECT_S = 2.0
"""A sentinel that does not accept a connection in this long is passed over for the next."""

_MARKER_TTL_S = 60.0
"""The marker a ``confirm_replicated`` writes goes by itself after this."""


async def _open_client(
    url: RedisUrl, stack: contextlib.AsyncExitStack
) -> coredis.Redis[str] | coredis.RedisCluster[str]:
    """The client for ``url``, entered into ``stack``."""
    options: dict[str, Any] = {}
    if url.username:
        options["username"] = url.username
    if url.password:
        options["password"] = url.password
    if url.tls:
        options["ssl_context"] = ssl.create_default_context()
    nodes = [TCPLocation(host=host, port=port) for host, port in url.nodes]
    if url.kind == "cluster":
        cluster = coredis.RedisCluster(startup_nodes=nodes, decode_responses=True, **options)
        return await stack.enter_async_context(cluster)
    if url.kind == "sentinel":
        sentinel_options = {"ssl_context": options["ssl_context"]} if url.tls else {}
        sentinel: coredis.Sentinel[str] = coredis.Sentinel(
            nodes,
            sentinel_kwargs={"connect_timeout": _SENTINEL_CONNECT_S, **sentinel_options},
            decode_responses=True,
            db=url.db,
            **options,
        )
        await stack.enter_async_context(sentinel)
        return await stack.enter_async_context(sentinel.primary_for(url.service))
    single: coredis.Redis[str] = coredis.Redis.from_url(url.url, decode_responses=True)
    return await stack.enter_async_context(single)
