"""The job log: seqs, merging, bounds and the terminal entry."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backstream.actors.joblog import JobLog, LogClosedError, OutputLimitExceeded, merge_events, read_content
from backstream.protocol.events import ReasoningEvent, RewindEvent, StatusEvent, TextEvent, ToolCallEvent
from backstream.runtime.stores.memory import MemoryStore
from tests.test_store_conformance import progress, record, texts


def make_log(limit: int = 1000) -> JobLog:
    return JobLog("j", 1, max_output_chars=limit)


def test_seqs_merge_and_terminal_last() -> None:
    log = make_log()
    log.append_status("running")
    log.append_text("a")
    log.append_text("b")
    log.append_reasoning("r")
    log.append_text("c")
    log.append_tool_call("call_1", "clock_now", "{}")
    log.append_status("failed")
    assert log.last_seq == 7 and log.content_length == 3 and log.content() == "abc"
    events = log.read(0, max_events=100, max_chars=100)
    assert events == (
        StatusEvent(seq=1, status="running"),
        TextEvent(seq=3, text="ab"),
        ReasoningEvent(seq=4, text="r"),
        TextEvent(seq=5, text="c"),
        ToolCallEvent(seq=6, call_id="call_1", name="clock_now", arguments="{}"),
        StatusEvent(seq=7, status="failed"),
    )
    assert log.read(2, max_events=100, max_chars=100)[0] == TextEvent(seq=3, text="b")
    with pytest.raises(LogClosedError):
        log.append_text("late")
    assert log.last_seq == 7


def test_output_limit_appends_what_fits() -> None:
    log = make_log(limit=5)
    log.append_status("running")
    log.append_text("abc")
    with pytest.raises(OutputLimitExceeded):
        log.append_text("defg")
    assert log.content() == "abcde"
    with pytest.raises(OutputLimitExceeded):
        log.append_reasoning("x")
    with pytest.raises(OutputLimitExceeded):
        log.append_tool_call("c", "n", "{}")
    assert log.last_seq == 3


@given(
    kinds=st.lists(st.sampled_from(["text", "reasoning", "declined"]), max_size=60),
    max_events=st.integers(min_value=1, max_value=10),
    max_chars=st.integers(min_value=1, max_value=20),
    after=st.integers(min_value=0, max_value=60),
)
def test_reads_are_contiguous_and_bounded(
    kinds: list[str], max_events: int, max_chars: int, after: int
) -> None:
    log = make_log(limit=10_000)
    log.append_status("running")
    for i, kind in enumerate(kinds):
        if kind == "text":
            log.append_text(f"t{i}")
        elif kind == "reasoning":
            log.append_reasoning(f"r{i}")
        else:  # entries without text of their own: a call declined, and its result
            decline(log, f"c{i}")
    after = min(after, log.last_seq)
    cursor, text = after, ""
    while cursor < log.last_seq:
        events = log.read(cursor, max_events=max_events, max_chars=max_chars)
        assert events and len(events) <= max_events
        for a, b in itertools.pairwise(events):
            assert a.seq < b.seq and not (isinstance(a, TextEvent) and isinstance(b, TextEvent))
        text += "".join(e.text for e in events if isinstance(e, TextEvent))
        cursor = events[-1].seq
    expected = "".join(e.text for e in log.entries(after) if isinstance(e, TextEvent))
    assert text == expected


def decline(log: JobLog, call_id: str) -> None:
    log.append_tool_call(call_id, "send_note", "{}")
    log.append_approval_required(call_id, "send_note", "{}")
    log.append_status("awaiting_approval")
    log.append_approval(call_id, False)
    log.append_status("running")
    log.append_tool_result(call_id, "send_note", "declined", True)


def test_merge_keeps_at_least_one_entry() -> None:
    entries = [TextEvent(seq=1, text="x" * 50), TextEvent(seq=2, text="y")]
    assert merge_events(entries, max_events=1, max_chars=10) == (TextEvent(seq=1, text="x" * 50),)


STEPS = st.lists(
    st.one_of(
        st.text(min_size=1, max_size=5),  # a text append
        st.just(None),  # a reasoning append
        st.tuples(st.integers(0, 40), st.integers(1, 6), st.integers(1, 12)),  # a read
    ),
    min_size=1,
    max_size=40,
)


@given(STEPS)
def test_a_read_repeated_or_after_an_append_equals_a_fresh_merge(
    steps: list[str | tuple[int, int, int] | None],
) -> None:
    """The log keeps its last merged read for the watchers that read the same range next;
    any read, repeated or after an append, equals merging the entries afresh."""
    log = make_log(10_000)
    log.append_status("running")
    for step in steps:
        if isinstance(step, str):
            log.append_text(step)
        elif step is None:
            log.append_reasoning("r")
        else:
            after, max_events, max_chars = step
            after = min(after, log.last_seq)
            expected = merge_events(log.entries(after), max_events=max_events, max_chars=max_chars)
            for _ in range(2):
                assert log.read(after, max_events=max_events, max_chars=max_chars) == expected


async def test_read_content_of_a_stored_log_applies_a_rewind_and_holds_only_its_prefix() -> None:
    store = MemoryStore()
    await store.create_job(record())
    entries = [*texts(1, "Hello ", "wor"), RewindEvent(seq=3, to_seq=1, content_length=6), *texts(4, "there")]
    await store.commit("j_1", entries, progress(4, content_length=11))
    assert await read_content(store, "j_1", 100) == "Hello there"  # "wor" withdrawn
    assert await read_content(store, "j_1", 8) == "Hello th"
