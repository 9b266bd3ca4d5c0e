"""Joining a prefilled turn's reply onto its prefix, over any chunking: never a character
sent twice or lost; and the continuation policies, per model pattern."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backstream.protocol.continuation import (
    START_OVER_MIN,
    Continuation,
    PrefixJoiner,
    continuation_for,
    parse_continuation,
)

texts = st.text(alphabet="ab c\né", min_size=0, max_size=40)
prefixes = st.text(alphabet="ab c\né", min_size=1, max_size=30)
cut_points = st.lists(st.integers(min_value=0, max_value=80), max_size=8)


def chunked(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


def join(prefix: str, pieces: list[str]) -> tuple[str, bool]:
    joiner = PrefixJoiner(prefix)
    out = [joiner.feed(piece) for piece in pieces]
    out.append(joiner.settle())
    return "".join(o.text for o in out), any(o.started_over for o in out)


def shared(a: str, b: str) -> int:
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return i


@given(prefixes, texts, cut_points)
def test_an_echoed_prefix_is_stripped_exactly(prefix: str, rest: str, cuts: list[int]) -> None:
    text, started_over = join(prefix, chunked(prefix + rest, cuts))
    assert (text, started_over) == (rest, False)


@given(prefixes, texts, cut_points)
def test_a_continuation_without_echo_passes_whole(prefix: str, rest: str, cuts: list[int]) -> None:
    if shared(rest, prefix) >= min(len(prefix), START_OVER_MIN):
        rest = "#" + rest  # departs from the prefix at once
    text, started_over = join(prefix, chunked(rest, cuts))
    assert (text, started_over) == (rest, False)


@given(prefixes, texts, cut_points)
def test_a_new_answer_is_recognised_and_kept_whole(prefix: str, tail: str, cuts: list[int]) -> None:
    keep = min(len(prefix), START_OVER_MIN)
    if keep == len(prefix):
        return  # a prefix this short: a reply that holds it is an echo
    answer = prefix[:keep] + "#" + tail  # like the prefix for a while, then not
    text, started_over = join(prefix, chunked(answer, cuts))
    assert (text, started_over) == (answer, True)


def test_llama_cpp_echo_in_the_first_delta() -> None:
    joiner = PrefixJoiner("The quick brown")
    assert joiner.feed("The quick brown fox").text == " fox"
    assert joiner.feed(" jumps").text == " jumps"


def test_policies_per_pattern_first_match_then_builtins_then_interrupt() -> None:
    patterns = dict([parse_continuation("llama-*=prefill"), parse_continuation("gpt-*=restart")])
    assert continuation_for("llama-3", patterns) is Continuation.PREFILL
    assert continuation_for("gpt-4o", patterns) is Continuation.RESTART
    assert continuation_for("backstream/lorem", patterns) is Continuation.PREFILL
    assert continuation_for("other", patterns) is Continuation.INTERRUPT
    assert continuation_for("backstream/lorem", {"*": Continuation.INTERRUPT}) is Continuation.INTERRUPT
    assert Continuation.PREFILL.fallback is Continuation.RESTART


@pytest.mark.parametrize("bad", ["prefill", "=prefill", "x=maybe"])
def test_a_bad_policy_says_what_is_known(bad: str) -> None:
    with pytest.raises(ValueError, match="prefill"):
        parse_continuation(bad)
