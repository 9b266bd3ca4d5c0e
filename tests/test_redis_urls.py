"""The Redis URLs a store accepts, parsed without connecting."""

from __future__ import annotations

import pytest

from backstream.runtime.stores.redis_urls import parse_redis_url


def test_one_server() -> None:
    url = parse_redis_url("rediss://me:s%40cret@redis.internal:6380/2")
    assert (url.kind, url.tls, url.nodes, url.db) == ("single", True, (("redis.internal", 6380),), 2)
    assert (url.username, url.password) == ("me", "s@cret")
    assert "s%40cret" not in url.redacted and "***" in url.redacted


def test_sentinels_with_a_service_and_a_database() -> None:
    url = parse_redis_url("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2,[::1]:26380/main/3")
    assert url.kind == "sentinel" and not url.tls
    assert url.nodes == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380))
    assert (url.service, url.db, url.username, url.password) == ("main", 3, None, "pw")


def test_cluster_defaults() -> None:
    url = parse_redis_url("rediss+cluster://node-1")
    assert (url.kind, url.tls, url.nodes, url.db) == ("cluster", True, (("node-1", 6379),), 0)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("redis+sentinel://h:26379", "name the sentinels' service"),
        ("redis+sentinel://h:26379/svc/x", "the database must be a number"),
        ("redis://h:port/0", "the port must be a number"),
        ("redis://:1/0", "a host is missing"),
        ("redis+cluster://h:7000/1", "database 0 only"),
        ("unix:///tmp/redis.sock", "unknown store"),
    ],
)
def test_mistakes_are_named(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_redis_url(text)
