"""The job lifecycle table, and the job log that enforces it."""

from __future__ import annotations

import itertools
from typing import get_args

import pytest

from backstream.actors.joblog import JobLog, LogClosedError
from backstream.protocol.events import (
    LIVE_STATUSES,
    ApprovalEvent,
    ApprovalRequiredEvent,
    JobStatus,
    LogEvent,
    ReasoningEvent,
    RewindEvent,
    StatusEvent,
    StepEvent,
    TextEvent,
    ToolCallDeltaEvent,
    ToolCallEvent,
    ToolResultEvent,
)
from backstream.protocol.lifecycle import (
    INITIAL_STATUS,
    LOG_ORDER,
    STATE_TRIGGERED,
    STATUS_OF_STATE,
    TERMINAL_STATUSES,
    TRANSITIONS,
    IllegalOrder,
    IllegalTransition,
    LogOrder,
    LogState,
    check_transition,
    entry_key,
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
    log.append_tool_call("c1", "send_note", "{}")
    log.append_approval_required("c1", "send_note", "{}")
    log.append_status("awaiting_approval")
    log.append_approval("c1", True)
    log.append_status("running")
    log.append_tool_result("c1", "send_note", "sent", False)
    log.append_status("completed")
    with pytest.raises(LogClosedError):
        log.append_status("running")
    statuses = [e.status for e in log.entries() if isinstance(e, StatusEvent)]
    assert statuses == ["running", "awaiting_approval", "running", "completed"]


# -- the order of a log --------------------------------------------------------------------------

KINDS = {
    "text",
    "reasoning",
    "tool_call_delta",
    "tool_call",
    "approval_required",
    "approval",
    "tool_result",
    "rewind",
    "step:started",
    "step:finished",
}


def test_the_order_table_covers_every_state_and_entry() -> None:
    assert set(LOG_ORDER) == set(LogState)
    keys = {key for row in LOG_ORDER.values() for key in row}
    assert keys == KINDS | {f"status:{status}" for status in ALL}
    assert LOG_ORDER[LogState.ENDED] == {}
    assert set(STATUS_OF_STATE) == set(LogState) - {LogState.ENDED}


def test_every_state_is_reached_from_a_new_log_and_can_end() -> None:
    def reachable(start: LogState) -> set[LogState]:
        seen, todo = {start}, [start]
        while todo:
            for after in [*LOG_ORDER[todo.pop()].values(), *STATE_TRIGGERED.values()]:
                if after not in seen:
                    seen.add(after)
                    todo.append(after)
        return seen

    assert reachable(LogState.NOT_STARTED) == set(LogState)
    for state in LogState:
        assert LogState.ENDED in reachable(state)
        if state is not LogState.ENDED:  # a job may be interrupted wherever it is
            assert LOG_ORDER[state]["status:interrupted"] is LogState.ENDED


def test_the_status_transitions_are_derived_from_the_order() -> None:
    for live in LIVE_STATUSES:
        assert TRANSITIONS[live] == LIVE_STATUSES | TERMINAL_STATUSES
    for state, status in STATUS_OF_STATE.items():
        for key, after in LOG_ORDER[state].items():
            if key.startswith("status:"):
                assert key.removeprefix("status:") in TRANSITIONS[status], (state, key, after)


RUN = StatusEvent(0, "running")
CALL = ToolCallEvent(0, "c1", "send_note", "{}")
ASK = ApprovalRequiredEvent(0, "c1", "send_note", "{}")
WAIT = StatusEvent(0, "awaiting_approval")
YES = ApprovalEvent(0, "c1", True)
RESULT = ToolResultEvent(0, "c1", "send_note", "sent", False)
TEXT = TextEvent(0, "a")
DONE = StatusEvent(0, "completed")


@pytest.mark.parametrize(
    ("before", "entry", "message"),
    [
        ([], TEXT, "'text' entry may not follow a log in state 'not_started'"),
        ([], DONE, "'status:completed' entry may not follow a log in state 'not_started'"),
        ([RUN], ASK, "'approval_required' entry may not follow a log in state 'next_turn'"),
        ([RUN], RESULT, "'tool_result' entry may not follow"),
        ([RUN], WAIT, "'status:awaiting_approval' entry may not follow a log in state 'next_turn'"),
        ([RUN, TEXT], RUN, "'status:running' entry may not follow a log in state 'model_turn'"),
        ([RUN, CALL, ASK], DONE, "'status:completed' entry may not follow a log in state 'approval_requested'"),
        ([RUN], RewindEvent(0, 1, 0), "'rewind' entry may not follow a log in state 'next_turn'"),
        ([RUN, CALL], RewindEvent(0, 1, 0), "'rewind' entry may not follow a log in state 'calls_announced'"),
        ([RUN, CALL], ApprovalRequiredEvent(0, "c9", "x", "{}"), "the turn announced no call 'c9'"),
        ([RUN, CALL, ASK], TEXT, "'text' entry may not follow a log in state 'approval_requested'"),
        ([RUN, CALL, ASK, WAIT], TEXT, "'text' entry may not follow a log in state 'awaiting_approval'"),
        ([RUN, CALL, ASK, WAIT], ApprovalEvent(0, "c9", True), "the call waiting is 'c1'"),
        (
            [RUN, CALL, ASK, WAIT, YES],
            RESULT,
            "'tool_result' entry may not follow a log in state 'approval_decided'",
        ),
        ([RUN, CALL, CALL, RESULT], TEXT, "'text' entry may not follow a log in state 'tools_answering'"),
        ([RUN, CALL, RESULT], RESULT, "'tool_result' entry may not follow a log in state 'next_turn'"),
        (
            [RUN, DONE],
            StatusEvent(0, "failed"),
            "'status:failed' entry may not follow a log in state 'ended'",
        ),
    ],
)
def test_an_entry_out_of_order_is_refused_and_changes_nothing(
    before: list[LogEvent], entry: LogEvent, message: str
) -> None:
    order = LogOrder()
    order.advance_all(before)
    state = order.state
    with pytest.raises(IllegalOrder, match=message):
        order.advance(entry)
    assert order.state is state


def test_a_turn_after_its_calls_are_answered() -> None:
    order = LogOrder()
    steps: list[LogEvent] = [RUN, TEXT, CALL, ToolCallEvent(0, "c2", "calculate", "{}"), RESULT]
    assert [order.advance(e) for e in steps][-1] is LogState.TOOLS_ANSWERING
    assert order.advance(ToolResultEvent(0, "c2", "calculate", "3", False)) is LogState.NEXT_TURN
    assert order.advance(ReasoningEvent(0, "r")) is LogState.MODEL_TURN
    assert order.advance(ToolCallDeltaEvent(0, "c3", "calculate", "{")) is LogState.MODEL_TURN
    assert order.advance(TEXT) is LogState.MODEL_TURN
    assert order.advance(DONE) is LogState.ENDED


def test_a_workflow_log_holds_steps_text_between_them_and_approvals_inside_one() -> None:
    order = LogOrder()
    started = StepEvent(0, 1, "approve", "started")
    ask = ApprovalRequiredEvent(0, "step_1", "approve", "{}")
    steps: list[LogEvent] = [RUN, TEXT, started, ask, WAIT, ApprovalEvent(0, "step_1", True), RUN]
    assert [order.advance(e) for e in steps][-1] is LogState.IN_STEP
    with pytest.raises(IllegalOrder, match="'text' entry may not follow a log in state 'in_step'"):
        order.advance(TEXT)
    assert order.advance(StepEvent(0, 1, "approve", "finished")) is LogState.NEXT_TURN
    assert order.advance(TEXT) is LogState.MODEL_TURN
    assert order.advance(StepEvent(0, 2, "sleep", "started")) is LogState.IN_STEP
    with pytest.raises(IllegalOrder, match="the turn announced no call 'step_1'"):
        order.advance(ask)  # a step asks only about itself
    with pytest.raises(IllegalOrder, match="'status:completed' entry may not follow"):
        order.advance(DONE)  # a step under way is finished first
    assert order.advance(StatusEvent(0, "failed")) is LogState.ENDED


def test_a_log_refuses_an_entry_out_of_order_in_one_place() -> None:
    log = JobLog("j", 1, max_output_chars=100)
    with pytest.raises(IllegalOrder):
        log.append_text("early")
    log.append_status("running")
    log.append_tool_call("c1", "send_note", "{}")
    with pytest.raises(IllegalOrder):
        log.append_approval("c1", True)
    log.append_approval_required("c1", "send_note", "{}")
    with pytest.raises(IllegalOrder):
        log.append_text("x" * 60)  # the job waits for a decision: no model turn runs
    assert log.last_seq == 3 and log.content_length == 0 and log.state is LogState.APPROVAL_REQUESTED
    log.append_status("awaiting_approval")
    log.append_approval("c1", False)
    log.append_status("running")
    log.append_tool_result("c1", "send_note", "declined", True)
    log.append_text("y" * 98)  # the refused text charged nothing: 98 + the call's 2 fit
    assert log.content_length == 98


def test_entry_keys() -> None:
    assert entry_key(TEXT) == "text" and entry_key(DONE) == "status:completed"


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
