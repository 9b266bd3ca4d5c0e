"""The history checker (bench/history.py) finds each kind of violation it claims to."""

from __future__ import annotations

from backstream.protocol.events import Batch, LogEvent, RewindEvent, StatusEvent, TextEvent, ToolCallEvent
from bench.history import History


def batch(*events: LogEvent, from_seq: int | None = None, epoch: int = 1) -> Batch:
    start = events[0].seq if from_seq is None else from_seq
    return Batch("j", epoch, start, events[-1].seq, events)


RUN, END = StatusEvent(1, "running"), StatusEvent(5, "completed")
GOOD = [batch(RUN, TextEvent(3, "ab")), batch(TextEvent(4, "c"), END)]


def kinds(history: History, after_seq: int, batches: list[Batch]) -> set[str]:
    return {v.kind for v in history.observe("j", "w", after_seq, batches)}


def test_a_correct_history_passes_and_matches_job_get() -> None:
    history = History()
    assert kinds(history, 0, GOOD) == set()
    # Another watch from seq 3 cuts the text differently but agrees on the content.
    assert kinds(history, 3, [batch(TextEvent(4, "c"), END)]) == set()
    assert history.check_final("j", 1, "completed", "abc", 5) == []
    assert {v.kind for v in history.check_final("j", 1, "completed", "abx", 5)} == {"content"}
    assert {v.kind for v in history.check_final("j", 1, "running", "abc", 4)} == {"stale_get"}


def test_gap_duplicate_and_reorder() -> None:
    assert kinds(History(), 0, [batch(RUN), batch(TextEvent(3, "x"), from_seq=3)]) == {"gap"}
    assert kinds(History(), 0, [batch(RUN, TextEvent(2, "x")), batch(TextEvent(2, "x"))]) == {"duplicate"}
    reordered = [Batch("j", 1, 1, 3, (RUN, TextEvent(3, "x"), TextEvent(2, "y")))]
    assert "reorder" in kinds(History(), 0, reordered)


def test_watches_that_disagree_conflict() -> None:
    history = History()
    assert kinds(history, 0, GOOD) == set()
    assert kinds(history, 0, [batch(RUN, TextEvent(3, "aX"))]) == {"conflict"}
    call = ToolCallEvent(4, "c1", "calc", "{}")  # seq 4 was text in the first watch
    assert "conflict" in kinds(history, 3, [batch(call)])


def test_nothing_after_the_terminal_status() -> None:
    history = History()
    assert kinds(history, 0, GOOD) == set()
    assert "after_terminal" in kinds(history, 5, [batch(TextEvent(6, "late"))])
    assert "two_terminals" in kinds(
        History(), 0, [batch(RUN, StatusEvent(2, "failed"), StatusEvent(3, "aborted"))]
    )


def test_an_illegal_transition_and_a_mixed_epoch() -> None:
    assert kinds(History(), 0, [batch(RUN, StatusEvent(2, "completed"), StatusEvent(3, "running"))]) >= {
        "lifecycle"
    }
    assert kinds(History(), 0, [batch(RUN, epoch=2), batch(TextEvent(2, "x"))]) == {"epoch"}


def test_a_watch_may_cross_into_the_recovered_epoch() -> None:
    history = History()
    live = [batch(RUN, TextEvent(2, "a"), TextEvent(3, "b"))]  # on the instance that died
    assert kinds(history, 0, live) == set()
    crossed = [batch(RUN, TextEvent(2, "a")), batch(StatusEvent(3, "interrupted"), epoch=2)]
    assert kinds(history, 0, crossed) == set()
    assert history.check_final("j", 2, "interrupted", "a", 3) == []
    assert "conflict" in kinds(history, 0, [batch(RUN, TextEvent(2, "a"), StatusEvent(3, "interrupted"))])


def test_a_rewind_in_the_log_withdraws_text() -> None:
    """A turn run again after a crash: the log's ``rewind`` cuts the content back to its
    ``content_length``, for the watches and for ``job.get``."""
    history = History()
    rewound = [
        batch(RUN, TextEvent(2, "ab"), TextEvent(3, "cd")),
        batch(RewindEvent(4, to_seq=2, content_length=2), TextEvent(5, "xy"), StatusEvent(6, "completed")),
    ]
    assert kinds(history, 0, rewound) == set()
    assert (
        kinds(history, 3, [batch(RewindEvent(4, 2, 2), TextEvent(5, "xy"), StatusEvent(6, "completed"))])
        == set()
    )
    assert history.check_final("j", 1, "completed", "abxy", 6) == []


def test_a_watch_the_client_cut_back_goes_on_in_the_new_epoch() -> None:
    """The watch showed seq 4 of epoch 1, which the log did not keep: the client cuts it
    back to seq 3 (a batch of one ``rewind``, no entry of the log) and it goes on in epoch 2."""
    history = History()
    cut_back = Batch("j", 2, 4, 3, (RewindEvent(3, to_seq=3, content_length=2),))
    watch = [
        batch(RUN, TextEvent(2, "a"), TextEvent(3, "b")),
        batch(TextEvent(4, "lost")),
        cut_back,
        batch(TextEvent(4, "c"), StatusEvent(5, "completed"), epoch=2),
    ]
    assert kinds(history, 0, watch) == set()
    other = [batch(RUN, TextEvent(3, "ab")), batch(TextEvent(4, "c"), StatusEvent(5, "completed"), epoch=2)]
    assert kinds(history, 0, other) == set()
    assert history.check_final("j", 2, "completed", "abc", 5) == []
    assert {v.kind for v in history.check_final("j", 2, "completed", "ablostc", 5)} == {"content"}
    # Cut to a length the new epoch's watches did not show through seq 3; or past the watch.
    wrong = Batch("j", 2, 4, 3, (RewindEvent(3, to_seq=3, content_length=1),))
    assert "conflict" in kinds(history, 0, [*watch[:2], wrong, *watch[3:]])
    ahead = Batch("j", 2, 6, 5, (RewindEvent(5, to_seq=5, content_length=2),))
    assert "rewind" in kinds(History(), 0, [*watch[:2], ahead])
