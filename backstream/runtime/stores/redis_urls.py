"""The Redis URLs a store accepts, parsed without connecting (``parse_redis_url``).

- ``redis://[user:password@]HOST:PORT[/DB]`` (``rediss://`` for TLS): one server;
- ``redis+cluster://[user:password@]HOST:PORT`` (``rediss+cluster://``): a Redis Cluster,
  found from the node named (others are learnt from it);
- ``redis+sentinel://[user:password@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]``
  (``rediss+sentinel://``): the primary that the sentinels name for ``SERVICE``; the
  credentials are the primary's, the sentinels are reached without.
"""

from __future__ import annotations

import urllib.parse
from typing import Literal

import attrs

__all__ = ["REDIS_SCHEMES", "STORE_FORMS", "RedisUrl", "parse_redis_url"]

REDIS_SCHEMES = (
    "redis",
    "rediss",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
)
STORE_FORMS = (
    "memory, sqlite:///PATH, redis://HOST:PORT/DB, rediss://..., redis+cluster://HOST:PORT, "
    "rediss+cluster://..., redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB] or rediss+sentinel://..."
)
"""Every store URL ``serve --store`` knows, for the error that names an unknown one."""

_DEFAULT_PORTS = {"sentinel": 26379}


@attrs.frozen
class RedisUrl:
    url: str
    kind: Literal["single", "cluster", "sentinel"]
    tls: bool
    nodes: tuple[tuple[str, int], ...]
    """The server, the cluster's first node, or the sentinels."""
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    db: int = 0
    service: str = ""
    """The sentinels' name of the primary."""

    @property
    def redacted(self) -> str:
        """The URL without its password, for messages."""
        if self.password is None:
            return self.url
        return self.url.replace(f":{urllib.parse.quote(self.password, safe='')}@", ":***@", 1).replace(
            f":{self.password}@", ":***@", 1
        )

    def location_text(self) -> str:
        """``HOST:PORT[,HOST:PORT...]`` as given."""
        return ",".join(f"{host}:{port}" for host, port in self.nodes)


def parse_redis_url(url: str) -> RedisUrl:
    """Raises ``ValueError`` naming what is wrong (an unknown scheme lists the known ones)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in REDIS_SCHEMES:
        raise ValueError(f"unknown store {url!r}: use {STORE_FORMS}")
    tls = scheme.startswith("rediss")
    kind: Literal["single", "cluster", "sentinel"] = (
        "cluster" if scheme.endswith("+cluster") else "sentinel" if scheme.endswith("+sentinel") else "single"
    )
    netloc, _, path = rest.partition("/")
    path = path.partition("?")[0]
    credentials, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(secret) if colon else None
    nodes = tuple(_host_port(part, url, _DEFAULT_PORTS.get(kind, 6379)) for part in hosts.split(","))
    if kind != "sentinel" and len(nodes) > 1:
        raise ValueError(f"store {url!r}: one HOST:PORT only (several are for redis+sentinel://)")
    segments = [segment for segment in path.split("/") if segment]
    service, db_text = "", ""
    if kind == "sentinel":
        if not segments:
            raise ValueError(
                f"store {url!r}: name the sentinels' service: redis+sentinel://HOST:PORT/SERVICE"
            )
        service, db_text = segments[0], segments[1] if len(segments) > 1 else ""
    elif segments:
        db_text = segments[0]
    if db_text and not db_text.isdigit():
        raise ValueError(f"store {url!r}: the database must be a number, not {db_text!r}")
    db = int(db_text or 0)
    if kind == "cluster" and db:
        raise ValueError(f"store {url!r}: a Redis Cluster has database 0 only")
    return RedisUrl(url, kind, tls, nodes, username, password, db, urllib.parse.unquote(service))


def _host_port(text: str, url: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:PORT
        host, _, port_text = text[1:].partition("]")
        port_text = port_text.removeprefix(":")
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError(f"store {url!r}: a host is missing")
    if port_text and not port_text.isdigit():
        raise ValueError(f"store {url!r}: the port must be a number, not {port_text!r}")
    return host, int(port_text or default_port)
