"""A reader of the epoch before a takeover: the log kept what the old epoch wrote durably
(``JobRecord.epoch_ends``), so a cursor at or before that point goes on at the new epoch
with no seam; one past it is told exactly which item of its view is the last that stands
(``gone`` with ``valid_through``), on ``/v1``, in the Python client, and through the replay
driver the AI SDK and Responses front doors stream with."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from backstream import Config, GoneError, Store
from backstream.client import open_client
from backstream.protocol.events import Batch, RewindEvent, StatusEvent, TextEvent
from backstream.protocol.offsets import StreamOffset
from backstream.protocol.projections import ResponsesProjection, UIChunkProjection
from backstream.protocol.responses import ResponseSource
from backstream.runtime.server.replay import open_replay
from tests.test_takeover import lorem_request, partial_log, place, plant_orphan, undisturbed
from tests.ws_helpers import check_contiguous, raw_client, served, text_of

__all__ = ["place"]  # the fixture, from the takeover tests

WORDS = 40
KEPT = 11  # the orphan's durable entries: its running status and ten words


async def taken_over(store: Store) -> tuple[str, str]:
    """An orphan with ``KEPT`` durable entries, taken over and continued to its end by the
    runtime ``served`` opens on ``store``; returns its id and the undisturbed answer."""
    request = lorem_request(WORDS)
    answer = await undisturbed(request)
    record = await plant_orphan(store, request, partial_log(answer, KEPT - 1))
    return record.job_id, answer


async def wait_ended(url: str, job_id: str) -> None:
    async with open_client(url, "tok-alice") as client:
        with trio.fail_after(20):
            while not (await client.get(job_id)).job.is_terminal:
                await trio.sleep(0.05)


def kept_length(answer: str) -> int:
    return sum(len(w) + 1 for w in answer.split(" ")[: KEPT - 1])


async def test_the_record_says_where_each_epoch_ended(place: Any) -> None:
    job_id, _ = await taken_over(place())
    async with served(Config(drain_timeout=0), store=place()) as srv:
        await wait_ended(srv.url, job_id)
        record, _ = await srv.runtime.job_log(job_id, user="alice")
    assert record.epoch == 2 and record.epoch_ends == (KEPT,)
    assert record.kept_through(1) == KEPT and record.kept_through(2) is None
    assert record.kept_through(3) is None and record.kept_through(0) is None


async def test_a_cursor_the_log_kept_goes_on_at_the_new_epoch(place: Any) -> None:
    job_id, answer = await taken_over(place())
    async with served(Config(drain_timeout=0), store=place()) as srv:
        await wait_ended(srv.url, job_id)
        async with raw_client(srv.url) as raw:
            await raw.hello()
            reply = await raw.request("job.watch", job_id=job_id, after_seq=KEPT, epoch=1)
            assert reply["type"] == "job.watching"
            batches = await raw.events_until_terminal(job_id)
    check_contiguous(batches, after_seq=KEPT)
    assert {b["epoch"] for b in batches} == {2}
    assert answer[kept_length(answer) :] == text_of(batches)


async def test_a_cursor_past_what_was_kept_is_told_where_its_view_stands(place: Any) -> None:
    job_id, answer = await taken_over(place())
    async with served(Config(drain_timeout=0), store=place()) as srv:
        await wait_ended(srv.url, job_id)
        async with raw_client(srv.url) as raw:
            await raw.hello()
            reply = await raw.request("job.watch", job_id=job_id, after_seq=KEPT + 3, epoch=1)
    assert reply["type"] == "error" and reply["code"] == "gone"
    assert reply["valid_through"] == KEPT and reply["epoch"] == 2
    assert reply["content_length"] == kept_length(answer)
    assert f"2_{KEPT}" in reply["message"]


async def test_the_python_client_cuts_back_and_goes_on(place: Any) -> None:
    """A watch that saw three entries the log lost yields one batch holding a ``rewind`` to
    the kept ``seq``, then the new epoch's batches from there: joined, the whole answer."""
    job_id, answer = await taken_over(place())
    seen = answer[: kept_length(answer)] + "lost words "  # what the reader had
    async with served(Config(drain_timeout=0), store=place()) as srv:
        await wait_ended(srv.url, job_id)
        async with open_client(srv.url, "tok-alice") as client:
            batches: list[Batch] = []
            async with client.watch(job_id, after_seq=KEPT + 3, epoch=1) as watch:
                async for batch in watch:
                    batches.append(batch)
    rewind = batches[0]
    assert (rewind.from_seq, rewind.to_seq, rewind.epoch) == (KEPT + 1, KEPT, 2)
    assert rewind.events == (RewindEvent(seq=KEPT, to_seq=KEPT, content_length=kept_length(answer)),)
    assert batches[1].from_seq == KEPT + 1 and all(b.epoch == 2 for b in batches)
    text = seen[: rewind.events[0].content_length] + "".join(b.text for b in batches[1:])  # type: ignore[union-attr]
    assert text == answer
    assert batches[-1].terminal is not None and batches[-1].terminal.status == "completed"


async def test_an_epoch_the_job_never_had_is_plain_gone(place: Any) -> None:
    job_id, _ = await taken_over(place())
    async with served(Config(drain_timeout=0), store=place()) as srv:
        await wait_ended(srv.url, job_id)
        async with open_client(srv.url, "tok-alice") as client:
            with pytest.raises(GoneError) as caught:
                async with client.watch(job_id, after_seq=2, epoch=3) as watch:
                    await watch.__anext__()
    assert "valid_through" not in caught.value.extra


def kept_items(projection: Any) -> int:
    """How many items ``projection`` numbers from the kept entries of the log."""
    entries = [StatusEvent(seq=1, status="running")]
    answer = " ".join(f"w{i}" for i in range(KEPT - 1))
    entries += [TextEvent(seq=i + 2, text=w) for i, w in enumerate(answer.split(" "))]
    projection.begin(-1)
    projection.project(Batch("j", 1, 1, KEPT, tuple(entries)))
    return int(projection.next_number)


@pytest.mark.parametrize("kind", ["ui", "responses"])
async def test_numbered_items_of_the_old_epoch_go_on_or_are_told(place: Any, kind: str) -> None:
    """The AI SDK's chunks and the Responses events are numbered by the replay: a client
    whose last item was made of kept entries resumes at the new epoch; one whose last item
    came after them gets ``gone`` naming the last item that stands."""
    job_id, _ = await taken_over(place())

    def projection() -> Any:
        if kind == "ui":
            return UIChunkProjection(job_id)
        source = ResponseSource(job_id, 0.0, "backstream/lorem", {}, {}, "t")
        return ResponsesProjection(source)

    # The chunks/events of the kept entries are numbered the same whatever the words: count them.
    kept = kept_items(projection())
    async with served(Config(drain_timeout=0), store=place()) as srv:
        await wait_ended(srv.url, job_id)
        whole: list[Any] = []
        async with open_replay(
            srv.runtime, job_id, projection(), user="alice", offset=StreamOffset()
        ) as replay:
            async for items in replay:
                whole += items
        resumed: list[Any] = []
        offset = StreamOffset(kept - 1, 1)
        async with open_replay(srv.runtime, job_id, projection(), user="alice", offset=offset) as replay:
            async for items in replay:
                resumed += items
            assert replay.epoch == 2
        assert resumed == whole[kept:]
        with pytest.raises(GoneError) as caught:
            offset = StreamOffset(kept, 1)
            async with open_replay(srv.runtime, job_id, projection(), user="alice", offset=offset) as replay:
                async for _ in replay:
                    pass
    assert caught.value.extra["valid_through"] == kept - 1 and caught.value.extra["epoch"] == 2
