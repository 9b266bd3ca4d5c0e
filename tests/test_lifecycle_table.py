"""The job lifecycle table, and the job log that enforces it."""

from __future__ import annotations

import itertools
from typing import get_args

import pytest

from backstream.actors.joblog import JobLog, LogClosedError
from backstream.protocol.events import JobStatus
from backstream.protocol.lifecycle import (
    INITIAL_STATUS,
    LIVE_STATUSES,
    TERMINAL_STATUSES,
    TRANSITIONS,
    IllegalTransition,
    check_transition,
    interruption,
    sql_terminal_list,
)

ALL: tuple[JobStatus, ...] = get_args(JobStatus)


def test_every_status_is_live_or_terminal_and_has_a_row() -> None:
    assert set(ALL) == set(TRANSITIONS) == LIVE_STATUSES | TERMINAL_STATUSES
    assert not LIVE_STATUSES & TERMINAL_STATUSES
    assert INITIAL_STATUS in LIVE_STATUSES


@pytest.mark.parametrize(("current", "new"), list(itertools.product(ALL, ALL)))
def test_transitions_follow_the_table(current: JobStatus, new: JobStatus) -> None:
    if current in TERMINAL_STATUSES:
        with pytest.raises(IllegalTransition):
            check_transition(current, new)
    else:
        check_transition(current, new)  # from a live status, anything may follow


def test_log_refuses_anything_after_the_terminal_status() -> None:
    log = JobLog("j", 1, max_output_chars=100)
    log.append_status("running")
    log.append_status("awaiting_approval")
    log.append_status("running")
    log.append_status("completed")
    with pytest.raises(LogClosedError):
        log.append_status("running")
    assert [e.status for e in log.read(0, max_events=10, max_chars=100)] == [
        "running",
        "awaiting_approval",
        "running",
        "completed",
    ]  # type: ignore[union-attr]


def test_interruption_goes_after_the_durable_log_and_raises_the_epoch() -> None:
    step = interruption(durable_seq=41, epoch=1)
    assert (step.seq, step.epoch) == (42, 2)
    assert step.status_event.seq == 42 and step.status_event.status == "interrupted"


def test_sql_list_names_each_terminal_status_once() -> None:
    listed = sql_terminal_list().strip("()").replace("'", "").split(", ")
    assert sorted(listed) == sorted(TERMINAL_STATUSES)


def test_redis_scripts_take_statuses_from_the_table() -> None:
    """No Lua script names a status: which are live or terminal, and the interrupted entry,
    come from ``lifecycle`` as arguments."""
    from backstream.protocol.lifecycle import TRANSITIONS
    from backstream.runtime.stores import redis_scripts

    for name in redis_scripts.__all__:
        body = getattr(redis_scripts, name)
        for status in TRANSITIONS:
            assert status not in body, (name, status)
