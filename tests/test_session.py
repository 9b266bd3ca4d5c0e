"""The session core's parts that stand alone: per-user buckets, frame sizing, byte counts,
the cheap peek at a refused frame."""

from __future__ import annotations

import trio
import trio.testing

from backstream.runtime.server.peer import TokenBucket
from backstream.runtime.server.session import UserBuckets, frame_chars, peek_string_field, utf8_len


async def test_user_buckets_limit_each_user_and_refill(autojump_clock: trio.testing.MockClock) -> None:
    buckets = UserBuckets(rate=2.0, burst=3, max_users=10)
    assert [buckets.take("alice") for _ in range(4)] == [True, True, True, False]
    assert buckets.take("bob")  # another user's bucket is full
    await trio.sleep(0.5)  # one token back at 2 per second
    assert buckets.take("alice") and not buckets.take("alice")


async def test_user_buckets_forget_only_refilled_users(autojump_clock: trio.testing.MockClock) -> None:
    buckets = UserBuckets(rate=1.0, burst=2, max_users=2)
    assert buckets.take("a") and buckets.take("a")  # a is empty
    assert buckets.take("b")
    await trio.sleep(1.0)  # b refills (burst 2 at 1/s from 1), a has 1 token
    assert buckets.take("c")  # past max_users: b is forgotten, a is kept
    assert buckets.take("a") and not buckets.take("a")  # a kept its state: only one token


async def test_user_buckets_stay_bounded_while_every_user_is_busy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    buckets = UserBuckets(rate=1.0, burst=2, max_users=2)
    for user in ("a", "b", "c", "d"):  # none refills meanwhile: each is still in use
        assert buckets.take(user)
        assert len(buckets) <= 2
    assert buckets.take("d") and not buckets.take("d")  # a kept bucket keeps its state
    assert buckets.take("a") and buckets.take("a")  # the longest tracked was forgotten: a full burst


async def test_a_token_bucket_says_when_it_is_full(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(1.0, 2)
    assert bucket.full()
    assert bucket.take()
    assert not bucket.full()
    await trio.sleep(1.0)
    assert bucket.full()


def test_frames_fit_beside_what_a_slow_client_left_unread() -> None:
    assert frame_chars(256 * 1024) == 64 * 1024
    assert frame_chars(100) == 1024  # never below 1 KiB


def test_bytes_are_utf8_bytes() -> None:
    assert utf8_len("abc") == 3
    assert utf8_len("héllo ✓") == len("héllo ✓".encode()) == 10


def test_peek_finds_top_level_string_fields_only() -> None:
    frame = '{"type":"resume","requestId":"r1","body":{"requestId":"inner"}}'
    assert peek_string_field(frame, "requestId") == "r1"
    assert peek_string_field(frame, "type") == "resume"
    assert peek_string_field('{"body":{"requestId":"inner"}}', "requestId") is None
    assert peek_string_field("not json", "requestId") is None
    assert peek_string_field(b'{"requestId":"r1"}', "requestId") is None  # binary frames: no peek
