"""A job that crashes fails alone; the runtime and other jobs go on."""

from __future__ import annotations

import contextlib

import trio
import trio.lowlevel

from backstream import ChatTurn, Config, OutputSink, TurnCollector, TurnResult, open_runtime
from backstream.protocol.chat_stream import TextDelta
from tests.helpers import collect, joined_text, terminal

MSG = [{"role": "user", "content": "x"}]


class BuggyModel:
    """A model plug-in with a bug: it raises after two tokens."""

    async def run_turn(self, turn: ChatTurn, sink: OutputSink) -> TurnResult:
        sink(TextDelta("one "))
        await trio.sleep(0.1)
        sink(TextDelta("two "))
        await trio.sleep(0.1)
        raise KeyError("a bug")


class SinkBreaker:
    """A model that keeps streaming after it was told the output limit was reached."""

    async def run_turn(self, turn: ChatTurn, sink: OutputSink) -> TurnResult:
        collector = TurnCollector(sink, max_argument_chars=100)
        for _ in range(5):
            # Swallowing the limit is a plug-in bug; the log still refuses more.
            with contextlib.suppress(Exception):
                collector.feed_chunk({"choices": [{"index": 0, "delta": {"content": "xxxxx"}}]})
            await trio.lowlevel.checkpoint()
        collector.feed_chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        return collector.result()


async def test_crashing_job_fails_internal_and_others_complete(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_runtime(Config(drain_timeout=0), models={"buggy": BuggyModel()}) as rt:
        good = await rt.start_job(
            user="a",
            thread_id="t",
            message_id="good",
            model="backstream/lorem",
            messages=MSG,
            params={"max_tokens": 20, "tokens_per_s": 20},
        )
        bad = await rt.start_job(user="a", thread_id="t", message_id="bad", model="buggy", messages=MSG)
        bad_batches = await collect(rt, bad.job_id, user="a")
        end = terminal(bad_batches)
        assert end.status == "failed" and end.error is not None and end.error.code == "internal"
        assert "a bug" not in end.error.message  # no internals leak to clients
        assert joined_text(bad_batches) == "one two "
        good_batches = await collect(rt, good.job_id, user="a")
        assert terminal(good_batches).status == "completed"
        assert len(joined_text(good_batches).split()) == 20
        again = await rt.start_job(
            user="a",
            thread_id="t",
            message_id="after",
            model="backstream/echo",
            messages=[{"role": "user", "content": "still here"}],
        )
        assert joined_text(await collect(rt, again.job_id, user="a")) == "still here"
        stats = rt.statistics()
        assert stats.jobs.finished_total == {"failed": 1, "completed": 2} and stats.jobs.running == 0


async def test_output_limit_holds_even_against_a_misbehaving_model(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_runtime(Config(drain_timeout=0, max_output_chars=12), models={"m": SinkBreaker()}) as rt:
        job = await rt.start_job(user="a", thread_id="t", message_id="m", model="m", messages=MSG)
        batches = await collect(rt, job.job_id, user="a")
        assert joined_text(batches) == "x" * 12
        assert terminal(batches).status == "completed"
