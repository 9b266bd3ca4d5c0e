"""``RedisConnection``: the client, the keyspace and the scripts that every part of
``RedisStore`` (jobs, signals, inbox) shares, and how an outage surfaces
(``UnavailableError``)."""

from __future__ import annotations

import contextlib
import ssl
import urllib.parse
from typing import Any

import coredis
import coredis.exceptions
from coredis.connection import TCPLocation

from backstream.actors.ports import StoreClosedError
from backstream.protocol.errors import UnavailableError
from backstream.runtime.stores import redis_quota
from backstream.runtime.stores import redis_scripts as scripts
from backstream.runtime.stores.redis_keys import RedisKeyspace

__all__ = ["SAFETY_TTL_S", "UNAVAILABLE", "RedisConnection", "ms"]

SAFETY_TTL_S = 3600
"""Keys outlive retention by this, in case no sweep runs."""

UNAVAILABLE = (
    coredis.exceptions.ConnectionError,  # includes BusyLoadingError: Redis restarting
    coredis.exceptions.ClusterDownError,
    coredis.exceptions.TryAgainError,
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
    "renew": scripts.RENEW,
    "notify_claim": scripts.NOTIFY_CLAIM,
    "notify_insert": scripts.NOTIFY_INSERT,
    "claim": scripts.CLAIM,
    "expiry_take": scripts.EXPIRY_TAKE,
    "scan": scripts.SCAN,
    "watch": scripts.WATCH,
    **redis_quota.SCRIPTS,
}


def ms(seconds: float) -> int:
    return int(seconds * 1000)


class RedisConnection:
    """Opened once by the store; ``client`` raises ``StoreClosedError`` once closed."""

    def __init__(self, url: str, prefix: str) -> None:
        self.cluster = "+cluster://" in url
        self.url = url.replace("+cluster://", "://")
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
            client: coredis.Redis[str] | coredis.RedisCluster[str]
            if self.cluster:
                client = _cluster_client(self.url)
            else:
                client = coredis.Redis.from_url(self.url, decode_responses=True)
            await stack.enter_async_context(client)
            self._client = client
            self.scripts = {name: client.register_script(body) for name, body in _SCRIPTS.items()}
            await self.call(client.ping())
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

    async def call(self, coro: Any) -> Any:
        """Await a client call; an outage raises ``UnavailableError``. Cancellation: as the
        call's (a command may or may not have run)."""
        try:
            return await coro
        except UNAVAILABLE as exc:
            raise UnavailableError(f"redis unavailable: {exc}") from None

    async def script(self, name: str, keys: list[str], args: list[str]) -> Any:
        """Run one of the store's Lua scripts (all its ``keys`` in one cluster slot: a
        cluster client routes the call by them). Cancellation: it ran entirely or not at all."""
        return await self.call(self.scripts[name](keys=keys, args=args))


def _cluster_client(url: str) -> coredis.RedisCluster[str]:
    """A cluster client bootstrapped from the node in ``url`` (with its credentials and TLS)."""
    parts = urllib.parse.urlsplit(url)
    options: dict[str, Any] = {}
    if parts.username:
        options["username"] = urllib.parse.unquote(parts.username)
    if parts.password:
        options["password"] = urllib.parse.unquote(parts.password)
    if parts.scheme == "rediss":
        options["ssl_context"] = ssl.create_default_context()
    node = TCPLocation(host=parts.hostname or "127.0.0.1", port=parts.port or 6379)
    return coredis.RedisCluster(startup_nodes=[node], decode_responses=True, **options)
