"""Client-side tools in the job actor: the calls the client runs are left open, and a job
continued from a rebuilt log leaves them open the same way."""

from __future__ import annotations

from backstream.actors.config import Config
from backstream.protocol.conversation import conversation_from_log
from backstream.protocol.events import StatusEvent, ToolCallEvent, ToolResultEvent
from backstream.protocol.history import History, continue_conversation
from backstream.protocol.lifecycle import LogState
from backstream.protocol.records import JobRequest
from tests.job_harness import FAST, new_record, run_job
from tests.test_job_resume import resumed, upto

CONFIG = Config(max_output_chars=10_000)
CLOCK = {
    "type": "function",
    "function": {"name": "clock_now", "parameters": {"type": "object", "properties": {}}},
}


def request() -> JobRequest:
    messages = ({"role": "user", "content": "what is 6*7, and what time is it now?"},)
    params = {**FAST, "client_tools": [CLOCK]}
    return JobRequest(model="backstream/tools-demo", messages=messages, params=params, tools=("calculate",))


async def test_a_turn_with_a_client_call_runs_the_server_calls_and_ends_completed() -> None:
    record = new_record(request())
    ran = await run_job(record, CONFIG)
    entries = list(ran.actor.log.entries())
    calls = [(e.call_id, e.name) for e in entries if isinstance(e, ToolCallEvent)]
    results = [e.name for e in entries if isinstance(e, ToolResultEvent)]
    assert [name for _, name in calls] == ["calculate", "clock_now"] and results == ["calculate"]
    end = entries[-1]
    assert isinstance(end, StatusEvent) and end.status == "completed" and end.finish_reason == "tool_calls"
    offered = [spec["function"]["name"] for spec in ran.model.turns[0][0].tools]
    assert offered == ["calculate", "clock_now"] and "client_tools" not in ran.model.turns[0][0].params
    assert len(ran.model.turns) == 1  # the model waits for the client
    # The conversation the next job starts from: the call open, the server's result in.
    history = History.of(record.request, entries)
    assert [c.name for c in history.open_calls] == ["clock_now"]
    answer = {"role": "tool", "tool_call_id": calls[1][0], "content": "12:00"}
    messages, chain = continue_conversation(history, [answer], max_depth=5, max_bytes=10_000, param="p")
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert messages[-1] == answer and chain["chain_depth"] == 1 and chain["input_messages"] == 1


async def test_a_job_taken_over_among_its_calls_leaves_the_client_call_open_as_before() -> None:
    record = new_record(request())
    whole = await run_job(record, CONFIG)
    entries = list(whole.actor.log.entries())
    last_call = max(i for i, e in enumerate(entries) if isinstance(e, ToolCallEvent))
    for prefix in (entries[: last_call + 1], upto(entries, LogState.TOOLS_ANSWERING)):
        again = await resumed(record, prefix, whole.model.results[0].usage)  # the store gives it
        assert list(again.actor.log.entries()) == entries
        assert again.model.turns == []  # no model turn: the calls were finished, then it ended
        so_far = conversation_from_log(record.request, again.actor.log.entries())
        assert [c.output is None for c in so_far.calls] == [False, True]
