"""conversation_from_log: a job's conversation rebuilt from its request and its log.

The property test runs real jobs (JobActor, built-in models and tools, a memory store) and
checks that every turn the actor asked of its model is what the log says it should be.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backstream.actors.config import Config
from backstream.actors.joblog import JobLog
from backstream.protocol.conversation import (
    DECLINED_OUTPUT,
    assistant_message,
    conversation_from_log,
    tool_message,
)
from backstream.protocol.events import ApprovalRequiredEvent, TextEvent, ToolCallRecord, ToolResultEvent
from backstream.protocol.lifecycle import IllegalOrder, LogState
from backstream.protocol.records import JobRequest
from tests.job_harness import FAST, new_record, run_job

SYSTEM = {"role": "system", "content": "be brief"}


def request(text: str, tools: tuple[str, ...] = ("calculate", "send_note")) -> JobRequest:
    messages = (SYSTEM, {"role": "user", "content": text})
    return JobRequest(model="backstream/tools-demo", messages=messages, params=FAST, tools=tools)


# -- examples ----------------------------------------------------------------------------------


def test_a_new_job_is_its_request() -> None:
    req = request("what is 2+3?")
    empty = conversation_from_log(req, [])
    assert empty.state is LogState.NOT_STARTED and empty.messages == req.messages and empty.turns == 0
    log = JobLog("j", 1, max_output_chars=1000)
    log.append_status("running")
    started = conversation_from_log(req, log.entries())
    assert started.state is LogState.NEXT_TURN and started.messages == req.messages
    assert (started.turn_text, started.turn_output, started.calls, started.turns) == ("", False, (), 0)


def test_a_turn_in_progress_and_its_calls() -> None:
    req = request("what is 2+3? and send a note to Ada")
    log = JobLog("j", 1, max_output_chars=1000)
    log.append_status("running")
    log.append_text("Let me ")
    log.append_reasoning("thinking")
    mid = conversation_from_log(req, log.entries())
    assert (
        mid.state is LogState.MODEL_TURN and mid.turn_text == "Let me " and mid.turn_output and mid.turns == 1
    )
    log.append_tool_call("c1", "calculate", '{"expression": "2+3"}')
    log.append_tool_call("c2", "send_note", "{}")
    log.append_approval_required("c2", "send_note", "{}")
    log.append_status("awaiting_approval")
    waiting = conversation_from_log(req, log.entries())
    assert waiting.messages == req.messages  # no call of the turn is answered yet
    assert waiting.pending_approvals == ("c2",) and [c.call_id for c in waiting.unanswered] == ["c1", "c2"]
    log.append_approval("c2", False)
    log.append_status("running")
    log.append_tool_result("c1", "calculate", "5", False)
    half = conversation_from_log(req, log.entries())
    assert half.state is LogState.TOOLS_ANSWERING and half.pending_approvals == ()
    assert half.calls == (
        ToolCallRecord("c1", "calculate", '{"expression": "2+3"}', output="5", is_error=False),
        ToolCallRecord("c2", "send_note", "{}", approved=False),
    )
    log.append_tool_result("c2", "send_note", DECLINED_OUTPUT, True)
    done = conversation_from_log(req, log.entries())
    assert done.state is LogState.NEXT_TURN and done.calls == () and done.turn_text == ""
    assert done.messages == (
        *req.messages,
        assistant_message(
            "Let me ", [("c1", "calculate", '{"expression": "2+3"}'), ("c2", "send_note", "{}")]
        ),
        tool_message("c1", "5"),
        tool_message("c2", DECLINED_OUTPUT),
    )
    assert done.turns == 1 and done.usage is None
    log.append_status("completed", usage={"total_tokens": 7})
    ended = conversation_from_log(req, log.entries())
    assert ended.turns == 2 and ended.usage == {"total_tokens": 7}  # an empty last turn counts


def test_a_log_out_of_order_is_refused() -> None:
    log = JobLog("j", 1, max_output_chars=1000)
    log.append_status("running")
    entries = [*log.entries(), TextEvent(seq=2, text="a"), ApprovalRequiredEvent(3, "c1", "n", "{}")]
    with pytest.raises(IllegalOrder, match="'approval_required' entry may not follow"):
        conversation_from_log(request("hi"), entries)


# -- the property: the real actor sends what its log implies ------------------------------------

TEXTS = st.lists(
    st.sampled_from(
        ["what is 6*7?", "send a note to Ada", "what is 999999999**20", "what time is it", "hello"]
    ),
    min_size=1,
    max_size=3,
).map(" and ".join)
JOBS = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["backstream/tools-demo", "backstream/tools-demo", "backstream/echo"]),
        "text": TEXTS,
        "tools": st.sampled_from(
            [
                ("calculate", "clock_now", "send_note"),
                ("send_note",),
                ("calculate", "send_note"),
                ("clock_now",),
            ]
        ),
        "max_turns": st.integers(1, 3),
        "max_output_chars": st.sampled_from([10_000, 40, 100, 130, 10_000]),
        "decisions": st.lists(st.sampled_from([True, False, None]), min_size=3, max_size=3),
        "earlier": st.booleans(),  # an earlier exchange in the request
    }
)


def job_request(job: dict[str, Any]) -> JobRequest:
    messages: list[dict[str, Any]] = [SYSTEM]
    if job["earlier"]:
        messages += [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    messages.append({"role": "user", "content": job["text"]})
    return JobRequest(job["model"], tuple(messages), params=FAST, tools=tuple(job["tools"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JOBS)
def test_every_turn_the_actor_asks_is_what_its_log_implies(job: dict[str, Any]) -> None:
    req = job_request(job)
    config = Config(
        max_turns=job["max_turns"], max_output_chars=job["max_output_chars"], approval_timeout=0.02
    )
    actor, model, _ = trio.run(lambda: run_job(new_record(req), config, decisions=job["decisions"]))
    entries = actor.log.entries()
    assert model.turns, "the job asked its model at least once"
    for turn, seq in model.turns:  # each turn, from the log as it stood when it was asked
        assert turn.messages == conversation_from_log(req, entries[:seq]).messages
    final = conversation_from_log(req, entries)
    assert final.state is LogState.ENDED
    terminal = actor.log.terminal
    assert terminal is not None
    if terminal.status == "completed":
        last_turn, _ = model.turns[-1]
        assert final.messages == last_turn.messages
        assert final.turns == len(model.turns) and final.calls == ()
        assert final.turn_text == "".join(
            e.text for e in entries[model.turns[-1][1] :] if isinstance(e, TextEvent)
        )
    elif terminal.error is not None and terminal.error.code == "tool_loop_limit":
        assert final.turns == len(model.turns) == job["max_turns"]
    assert final.usage == terminal.usage


async def test_the_model_reads_a_cut_tool_result_as_the_log_holds_it() -> None:
    """A result over the job's tool budget is cut in the log; the next turn sends the cut
    text, so a job continued from its log says the same to its model."""
    req = request("what is 999999999**20", tools=("calculate",))
    actor, model, _ = await run_job(new_record(req), Config(max_output_chars=100))
    (result,) = [e for e in actor.log.entries() if isinstance(e, ToolResultEvent)]
    assert "[output cut: the job's tool results reached 100 characters]" in result.output
    second, _ = model.turns[1]
    assert second.messages[-1] == tool_message(result.call_id, result.output)
