"""Stream offsets (``protocol.offsets``) and the HTTP status each error type carries."""

from __future__ import annotations

import pytest

from backstream.protocol import errors
from backstream.protocol.errors import BadRequestError
from backstream.protocol.offsets import NO_OFFSET, StreamOffset, parse_offset


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, NO_OFFSET),
        ("", NO_OFFSET),
        ("7", StreamOffset(7)),
        ("-1", StreamOffset(-1)),
        ("0", StreamOffset(0)),
        ("1_7", StreamOffset(7, 1)),
        ("3_-1", StreamOffset(-1, 3)),
        (" 2_10 ", StreamOffset(10, 2)),
    ],
)
def test_offsets_parse(raw: str | None, expected: StreamOffset) -> None:
    assert parse_offset(raw, name="starting_after") == expected


@pytest.mark.parametrize("raw", ["abc", "1_", "_3", "1_2_3", "-2", "0_4", "1.5", "x" * 100, "1_" + "9" * 30])
def test_bad_offsets_are_a_clear_bad_request(raw: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        parse_offset(raw, name="Last-Event-ID")
    assert caught.value.code == "bad_request" and caught.value.extra["param"] == "Last-Event-ID"
    assert "Last-Event-ID" in caught.value.message


def test_offsets_round_trip_and_carry_the_epoch() -> None:
    for offset in (StreamOffset(5, 2), StreamOffset(5), StreamOffset(-1, 1)):
        assert parse_offset(offset.encode(), name="o") == offset
    assert StreamOffset(5, 2).encode() == "2_5" and StreamOffset(5).encode() == "5"
    assert StreamOffset(5, 2).after(9) == StreamOffset(9, 2)


def test_each_error_type_carries_its_http_status() -> None:
    statuses = {
        errors.BadRequestError: 400,
        errors.UnauthorizedError: 401,
        errors.NotFoundError: 404,
        errors.ConflictError: 409,
        errors.GoneError: 410,
        errors.TooLargeError: 413,
        errors.RateLimitedError: 429,
        errors.CapacityError: 429,
        errors.QuotaExceededError: 429,
        errors.UnavailableError: 503,
        errors.InternalError: 500,
        errors.BackstreamError: 500,
    }
    for cls, status in statuses.items():
        assert cls.http_status == status, cls
    assert errors.error_for_code("gone", "x").http_status == 410
    assert isinstance(errors.error_for_code("quota_exceeded", "x"), errors.QuotaExceededError)
    assert errors.error_for_code("no_such_code", "x").http_status == 500
