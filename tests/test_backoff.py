"""The one backoff schedule every retry loop uses."""

from __future__ import annotations

import random

from backstream.protocol.backoff import Backoff


def test_doubles_up_to_the_cap_without_jitter() -> None:
    backoff = Backoff(0.1, 1.0, jitter="none")
    assert [round(backoff.next_delay(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert backoff.attempt == 6
    backoff.reset()
    assert backoff.next_delay() == 0.1


def test_full_jitter_stays_within_zero_and_the_delay() -> None:
    backoff = Backoff(1.0, 8.0, jitter="full", random=random.Random(7))
    for attempt in range(1, 10):
        assert 0.0 <= backoff.next_delay() <= min(8.0, 2.0 ** (attempt - 1))


def test_equal_jitter_never_retries_at_once_and_respects_the_cap() -> None:
    backoff = Backoff(1.0, 3.0, random=random.Random(3))
    delays = [backoff.next_delay() for _ in range(8)]
    assert delays[0] >= 0.5
    assert all(0.5 <= d <= 3.0 for d in delays)


def test_a_server_hint_replaces_the_delay_but_not_the_cap() -> None:
    backoff = Backoff(0.1, 5.0)
    assert backoff.next_delay(at_least=2.5) == 2.5
    assert backoff.next_delay(at_least=60.0) == 5.0
    assert backoff.next_delay(at_least=-1.0) == 0.0
    assert backoff.attempt == 3
