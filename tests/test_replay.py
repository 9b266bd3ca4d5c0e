"""The replay-then-follow driver on its own, with each projection: full streams, resumes from
the middle, epoch fencing, and the long-poll read beside the paced follow."""

from __future__ import annotations

from typing import Any, TypeVar

import pytest
import trio

import backstream
from backstream import Config, open_runtime
from backstream.protocol.errors import GoneError
from backstream.protocol.events import Batch, TextEvent
from backstream.protocol.offsets import StreamOffset
from backstream.protocol.projections import (
    BatchProjection,
    Projection,
    ResponsesProjection,
    UIChunkProjection,
)
from backstream.protocol.responses import ResponseSource
from backstream.runtime.server.replay import open_replay
from tests.helpers import check_contiguous, joined_text
from tests.test_watch import lorem

ItemT = TypeVar("ItemT")


async def drain(
    rt: backstream.Runtime, job_id: str, projection: Projection[ItemT], offset: StreamOffset
) -> list[ItemT]:
    items: list[ItemT] = []
    async with open_replay(rt, job_id, projection, user="alice", offset=offset) as replay:
        async for step in replay:
            items += step
        assert replay.ended
    return items


async def responses_projection(rt: backstream.Runtime, job_id: str) -> ResponsesProjection:
    record, _ = await rt.job_log(job_id, user="alice")
    source = ResponseSource(
        response_id=job_id,
        created_at=record.created_at,
        model=record.model,
        params=record.request.params,
        annotations=record.request.annotations,
        thread_id=record.thread_id,
    )
    return ResponsesProjection(source)


async def test_batches_resume_from_the_middle_at_any_seq(autojump_clock: trio.testing.MockClock) -> None:
    async with open_runtime(Config(drain_timeout=0)) as rt:
        job_id = await lorem(rt, max_tokens=30, tokens_per_s=100)
        full: list[Batch] = await drain(rt, job_id, BatchProjection(tool_call_deltas=False), StreamOffset(0))
        check_contiguous(full)
        last = full[-1].to_seq
        words = [ev for b in full for ev in b.events if isinstance(ev, TextEvent)]
        middle = words[len(words) // 2].seq
        rest: list[Batch] = await drain(
            rt, job_id, BatchProjection(tool_call_deltas=False), StreamOffset(middle, 1)
        )
        check_contiguous(rest, after_seq=middle)
        assert rest[-1].to_seq == last
        assert joined_text(full).endswith(joined_text(rest)) and joined_text(rest)


async def test_ui_chunks_resume_from_the_middle_of_a_running_job(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_runtime(Config(drain_timeout=0)) as rt:
        job_id = await lorem(rt, max_tokens=40, tokens_per_s=20)
        await trio.sleep(0.5)  # part of the log exists: the resume replays it, then follows
        partial = await drain_until(rt, job_id, UIChunkProjection(job_id), count=12)
        full = await drain(rt, job_id, UIChunkProjection(job_id), StreamOffset(-1))
        assert full[: len(partial)] == partial  # the numbering is a pure function of the log
        assert full[0]["type"] == "start" and full[-1]["type"] == "finish"
        rest = await drain(rt, job_id, UIChunkProjection(job_id), StreamOffset(len(partial) - 1))
        assert rest == full[len(partial) :]


async def drain_until(
    rt: backstream.Runtime, job_id: str, projection: Projection[ItemT], *, count: int
) -> list[ItemT]:
    items: list[ItemT] = []
    async with open_replay(rt, job_id, projection, user="alice", offset=StreamOffset(-1)) as replay:
        async for step in replay:
            items += step
            if len(items) >= count:
                break
    return items


async def test_responses_events_resume_from_the_middle(autojump_clock: trio.testing.MockClock) -> None:
    async with open_runtime(Config(drain_timeout=0)) as rt:
        job_id = await lorem(rt, max_tokens=20, tokens_per_s=100)
        projection = await responses_projection(rt, job_id)
        full: list[dict[str, Any]] = await drain(rt, job_id, projection, StreamOffset(-1))
        numbers = [event["sequence_number"] for event in full]
        assert numbers == list(range(len(full)))
        assert full[0]["type"] == "response.created" and full[-1]["type"] == "response.completed"
        resumed = await responses_projection(rt, job_id)
        after = len(full) // 2
        rest = await drain(rt, job_id, resumed, StreamOffset(after, 1))
        assert rest == full[after + 1 :]
        # Resumed past the opening events: none of them again.
        assert resumed.opening() == [] and rest[0]["sequence_number"] == after + 1


@pytest.mark.parametrize("kind", ["batches", "ui", "responses"])
async def test_a_stale_epoch_is_gone_for_every_projection(
    kind: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_runtime(Config(drain_timeout=0)) as rt:
        job_id = await lorem(rt, max_tokens=3)
        projection: Projection[Any]
        if kind == "batches":
            projection = BatchProjection(tool_call_deltas=False)
        elif kind == "ui":
            projection = UIChunkProjection(job_id)
        else:
            projection = await responses_projection(rt, job_id)
        with pytest.raises(GoneError, match="epoch 1"):
            async with open_replay(rt, job_id, projection, user="alice", offset=StreamOffset(1, 2)):
                pass
        # The log's own epoch streams, and every offset given out carries it.
        async with open_replay(rt, job_id, projection, user="alice", offset=StreamOffset(0, 1)) as replay:
            steps = [step async for step in replay]
            assert steps and replay.epoch == 1
            assert replay.offset_of(5) == StreamOffset(5, 1) and replay.offset_of(5).encode() == "1_5"


async def test_another_users_job_is_not_found(autojump_clock: trio.testing.MockClock) -> None:
    async with open_runtime(Config(drain_timeout=0)) as rt:
        job_id = await lorem(rt, max_tokens=3)
        with pytest.raises(backstream.NotFoundError):
            async with open_replay(rt, job_id, UIChunkProjection(job_id), user="bob", offset=StreamOffset()):
                pass


async def test_the_replay_reads_the_log_at_once_then_follows_paced(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_runtime(Config(batch_ms=50, drain_timeout=0)) as rt:
        job_id = await lorem(rt, max_tokens=200, tokens_per_s=1000)
        await rt.wait_idle()  # the job has ended: its whole log is a replay
        projection = UIChunkProjection(job_id)
        started = trio.current_time()
        chunks = await drain(rt, job_id, projection, StreamOffset(-1))
        assert trio.current_time() == started  # unpaced: no batch interval waited
        assert sum(1 for c in chunks if c["type"] == "text-delta") == 200


async def test_long_poll_read_and_wait_beyond(autojump_clock: trio.testing.MockClock) -> None:
    async with open_runtime(Config(drain_timeout=0)) as rt:
        job_id = await lorem(rt, max_tokens=10, tokens_per_s=10)
        projection = BatchProjection(tool_call_deltas=True)
        async with open_replay(rt, job_id, projection, user="alice", offset=StreamOffset(0)) as replay:
            now = await replay.read(0, limit=100)
            last = now[-1].seq if now else 0
            assert [ev.seq for ev in now] == list(range(1, last + 1))  # what is there, at once
            assert await replay.read(last, limit=100) == ()  # nothing more yet: no wait
            with trio.fail_after(5):
                await replay.wait_beyond(last)
            more = await replay.read(last, limit=1)
            assert len(more) == 1 and more[0].seq == last + 1
            # The paced follow is not moved by the long poll: it starts at the offset.
            first = await replay.__anext__()
            assert first[0].from_seq == 1


async def test_long_poll_read_of_a_stored_log(autojump_clock: trio.testing.MockClock) -> None:
    async with open_runtime(Config(drain_timeout=0)) as rt:
        job_id = await lorem(rt, max_tokens=5)
        await rt.wait_idle()  # ended: its log is read from the store
        _, entries = await rt.job_log(job_id, user="alice")
        last = entries[-1].seq
        async with open_replay(
            rt, job_id, UIChunkProjection(job_id), user="alice", offset=StreamOffset()
        ) as replay:
            assert await replay.read(0, limit=2) == entries[:2]
            assert await replay.read(2, limit=100) == entries[2:]
            with pytest.raises(backstream.BadRequestError):  # nothing will ever come after the end
                await replay.read(last, limit=100)
