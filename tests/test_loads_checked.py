"""``codec.loads_checked``: the one decoder of JSON from outside (WebSocket frames and HTTP
bodies alike), and ``check_params``' refusal of numbers JSON cannot hold."""

from __future__ import annotations

import json
import math

import pytest

from backstream.protocol.codec import MAX_DEPTH, ProtocolError, loads_checked
from backstream.protocol.errors import BadRequestError
from backstream.runtime.validation import check_params


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_depth_up_to_the_limit_is_taken_and_past_it_refused() -> None:
    assert loads_checked(nested(MAX_DEPTH)) is not None
    with pytest.raises(ProtocolError, match=f"deeper than {MAX_DEPTH}") as refused:
        loads_checked(nested(MAX_DEPTH + 1), what="the request body")
    assert refused.value.code == "bad_request" and refused.value.message.startswith("the request body")
    assert loads_checked(json.dumps({"a": "[" * 500})) == {"a": "[" * 500}  # brackets in strings count not


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999", "-1E400"])
def test_numbers_json_cannot_hold_are_refused(number: str) -> None:
    with pytest.raises(ProtocolError, match="not a finite number") as refused:
        loads_checked(f'{{"temperature": {number}}}')
    assert refused.value.code == "bad_request"


def test_finite_numbers_and_big_integers_are_kept() -> None:
    assert loads_checked("[1e308, -0.5, 12345678901234567890123]") == [1e308, -0.5, 12345678901234567890123]


def test_lone_surrogates_are_repaired_and_pairs_joined() -> None:
    assert loads_checked(r'{"k\ud800": ["\udfff", "\ud83d\ude00"]}') == {"k\ufffd": ["\ufffd", "\U0001f600"]}


def test_check_params_refuses_non_finite_numbers_given_through_the_python_api() -> None:
    with pytest.raises(BadRequestError, match=r"params\.temperature"):
        check_params({"temperature": math.nan}, builtin=False)
    with pytest.raises(BadRequestError, match=r"params\.response_format"):
        check_params({"response_format": {"a": [1.0, math.inf]}}, builtin=False)
    with pytest.raises(BadRequestError, match="deeper than 64"):
        check_params({"response_format": json.loads(nested(70))}, builtin=False)
    with pytest.raises(BadRequestError, match="max_tool_calls"):
        check_params({"max_tool_calls": -2}, builtin=False)
    assert check_params({"temperature": 0.2, "max_tool_calls": 0}, builtin=False) == {
        "temperature": 0.2,
        "max_tool_calls": 0,
    }
