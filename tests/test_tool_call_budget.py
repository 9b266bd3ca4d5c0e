"""``max_tool_calls``: the budget (sans-IO) and a job actor that keeps to it, also when it
continues from a stored log."""

from __future__ import annotations

import attrs
import pytest

from backstream.protocol.events import LogEvent, StatusEvent, TextEvent, ToolCallEvent, ToolResultEvent
from backstream.protocol.job_params import TOOL_CALL_LIMIT_OUTPUT, ToolCallBudget, check_max_tool_calls
from backstream.protocol.lifecycle import LogState
from tests.job_harness import FAST, new_record, run_job
from tests.test_job_resume import CONFIG, ask, resumed, upto


def test_the_budget_lets_the_first_calls_run_and_counts_every_call() -> None:
    budget = ToolCallBudget.for_params({"max_tool_calls": 3})
    assert budget.take(2) == 2 and not budget.exhausted
    assert budget.take(2) == 1 and budget.exhausted  # the fourth call of the job does not run
    assert budget.take(1) == 0 and budget.spent == 5
    unlimited = ToolCallBudget.for_params({})
    assert unlimited.take(100) == 100 and not unlimited.exhausted


def test_model_params_leave_out_job_params_and_ask_for_no_tools_once_spent() -> None:
    params = {"temperature": 0.5, "max_tool_calls": 1, "tool_choice": "required"}
    budget = ToolCallBudget.for_params(params)
    assert budget.model_params(params, has_tools=True) == {"temperature": 0.5, "tool_choice": "required"}
    budget.take(1)
    assert budget.model_params(params, has_tools=True) == {"temperature": 0.5, "tool_choice": "none"}
    assert budget.model_params(params, has_tools=False) == {"temperature": 0.5, "tool_choice": "required"}


def test_a_budget_from_a_log_counts_the_calls_of_earlier_turns_only() -> None:
    entries: list[LogEvent] = [
        StatusEvent(1, "running"),
        ToolCallEvent(2, "c1", "calculate", "{}"),
        ToolResultEvent(3, "c1", "calculate", "1", False),
        TextEvent(4, "x"),
        ToolCallEvent(5, "c2", "calculate", "{}"),
        ToolCallEvent(6, "c3", "calculate", "{}"),
    ]
    budget = ToolCallBudget.from_log({"max_tool_calls": 2}, entries, open_calls=2)
    assert budget.spent == 1 and budget.take(2) == 1  # the open turn is decided again


@pytest.mark.parametrize("value", [-1, 1.5, "2", True, None])
def test_max_tool_calls_is_a_non_negative_integer(value: object) -> None:
    with pytest.raises(ValueError, match="max_tool_calls"):
        check_max_tool_calls(value)


TIME_AND_SUM = "what is 6*7, and what time is it now?"


async def test_calls_past_max_tool_calls_are_not_run_and_the_model_is_told() -> None:
    request = ask(TIME_AND_SUM, ("calculate", "clock_now"))
    record = new_record(attrs.evolve(request, params={**FAST, "max_tool_calls": 1}))
    whole = await run_job(record, CONFIG)
    results = [e for e in whole.actor.log.entries() if isinstance(e, ToolResultEvent)]
    assert [(r.name, r.output, r.is_error) for r in results] == [
        ("calculate", "42", False),
        ("clock_now", TOOL_CALL_LIMIT_OUTPUT, True),
    ]
    first, second = (turn for turn, _ in whole.model.turns)
    assert "max_tool_calls" not in first.params and "tool_choice" not in first.params
    assert second.params == {**FAST, "tool_choice": "none"}
    assert second.messages[-1]["content"] == TOOL_CALL_LIMIT_OUTPUT
    assert whole.actor.log.status == "completed"
    # Continued from its stored log, after both calls or after the first result: every
    # call decided alike.
    entries = list(whole.actor.log.entries())
    for stop_at, nth in ((LogState.CALLS_ANNOUNCED, 2), (LogState.TOOLS_ANSWERING, 1)):
        again = await resumed(record, upto(entries, stop_at, nth), whole.model.results[0].usage)
        assert list(again.actor.log.entries()) == entries
        assert [turn for turn, _ in again.model.turns] == [second]
