"""A finished log kept compact reads exactly as the entries it was made from."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backstream.protocol.compact import CompactEntries
from backstream.protocol.events import ErrorInfo, LogEvent, ReasoningEvent, StatusEvent, TextEvent


def entries_from(kinds: list[tuple[str, str]]) -> list[LogEvent]:
    out: list[LogEvent] = [StatusEvent(seq=1, status="running")]
    for kind, text in kinds:
        seq = len(out) + 1
        out.append(TextEvent(seq=seq, text=text) if kind == "t" else ReasoningEvent(seq=seq, text=text))
    error = ErrorInfo("x", "y")
    out.append(StatusEvent(seq=len(out) + 1, status="failed", error=error))
    return out


@given(st.lists(st.tuples(st.sampled_from("tr"), st.text(min_size=1, max_size=5)), max_size=30), st.data())
def test_compact_entries_read_as_the_originals(kinds: list[tuple[str, str]], data: st.DataObject) -> None:
    original = entries_from(kinds)
    compact = CompactEntries(original)
    assert len(compact) == len(original)
    assert list(compact) == original
    start = data.draw(st.integers(0, len(original)))
    stop = data.draw(st.integers(start, len(original) + 3))
    assert compact[start:stop] == original[start:stop]
    assert compact[-1] == original[-1] and compact[0] == original[0]
    compact.extend([])
    with pytest.raises(ValueError):
        compact.extend(original[:1])


def test_entries_out_of_seq_order_are_refused() -> None:
    with pytest.raises(ValueError):
        CompactEntries([TextEvent(seq=2, text="a")])
