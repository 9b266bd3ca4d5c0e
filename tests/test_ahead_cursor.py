"""A reader that comes back before the takeover, with a cursor past what the log kept: it
saw entries live on the instance that then died, and reconnects to another one while the
store still holds only what that instance wrote durably, at the same epoch. Its cursor is
ahead, so it waits; when the new epoch writes, it must be told ``gone`` with
``valid_through`` (what it has up to there stands, the rest was lost), exactly as a reader
coming back after the takeover is, never handed the new epoch's entries after a cursor that
named lost ones. On ``/v1`` (and so in the Python client, which rewinds), and through the
replay driver the AI SDK and Responses front doors stream with.

The job is taken over either by the instance the reader waits on (its watch reads the
store, as it did when the job ran elsewhere), or, on Redis, by another instance. The
instance the reader waits on never looks for orphans by itself during a test (its keeper's
round is an hour away), so the order is fixed: the job's instance dies, the reader waits
at its cursor, then the job is taken over and continued.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from backstream import Config, GoneError, Store, open_runtime
from backstream.actors.watcher import StoredSource, Watcher
from backstream.client import open_client
from backstream.protocol.events import Batch, RewindEvent
from backstream.protocol.offsets import StreamOffset
from backstream.protocol.projections import ResponsesProjection, UIChunkProjection
from backstream.protocol.responses import ResponseSource
from backstream.runtime.server.replay import open_replay
from tests.test_stale_cursor import KEPT, WORDS, kept_items, kept_length
from tests.test_store_conformance import recover_orphans
from tests.test_takeover import (
    CONFIG,
    lorem_request,
    opened,
    partial_log,
    place,
    plant_orphan_in,
    stores_on,
    undisturbed,
)
from tests.ws_helpers import Served, raw_client, served

__all__ = ["place"]  # the fixture, from the takeover tests

LOST = 2  # entries the reader saw that the dying instance never wrote durably
QUIET = Config(drain_timeout=0, lease_ttl=1.0, lease_renew_interval=3600.0)
"""The instance the reader comes back to: no orphan recovery of its own accord during a
test. (On Redis, an instance that looked for orphans keeps others from looking in the same
shards for a third of its lease: a short one, so that another instance soon may.)"""


async def orphan(store: Store) -> tuple[str, str]:
    """A job whose instance died with ``KEPT`` entries durable (epoch 1, nobody has taken
    it over yet), planted through ``store`` (open); its id and the undisturbed answer."""
    request = lorem_request(WORDS)
    answer = await undisturbed(request)
    record = await plant_orphan_in(store, request, partial_log(answer, KEPT - 1))
    return record.job_id, answer


@asynccontextmanager
async def taken_over(srv: Served, place: Any, job_id: str, by: str) -> AsyncIterator[None]:
    """The job taken over at epoch 2 and continued, ``here`` (by the served instance's
    keeper, asked once) or ``elsewhere`` (by another instance: at once if the job's shard
    is in its share, else once the served one's announcement lapses, which QUIET does not
    renew); the block runs meanwhile, and the job has ended after it."""
    rt = srv.runtime
    async with contextlib.AsyncExitStack() as stack:
        if by == "here":
            [record] = await rt._keeper.recover_orphans()
            assert record.epoch == 2
        else:
            rt = await stack.enter_async_context(open_runtime(CONFIG, store=place()))
            with trio.fail_after(10):
                while not rt.statistics().keeper.continued_total:  # the shards free again
                    await trio.sleep(0.05)
                    await rt._keeper.recover_orphans()
        try:
            yield
        finally:
            with trio.fail_after(20):
                await (await rt._lookup(job_id, "alice")).wait_until_ended()


CASES = [("sqlite", "here"), ("redis", "here"), ("redis", "elsewhere")]
"""Where the job lives and who takes it over: the instance the reader waits on, or another
one (a SQLite file serves one process, so only Redis has another)."""


@pytest.fixture(params=CASES, ids=["-".join(case) for case in CASES])
async def case(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[tuple[Any, str]]:
    """A maker of stores on the job's place (``stores_on``), and who takes the job over."""
    kind, by = request.param
    async with stores_on(kind, tmp_path) as make:
        yield make, by


async def test_v1_a_waiting_cursor_past_what_was_kept_gets_gone(case: tuple[Any, str]) -> None:
    place, by = case
    async with served(QUIET, store=place()) as srv:
        job_id, answer = await orphan(srv.runtime.store)
        async with raw_client(srv.url) as raw:
            await raw.hello()
            reply = await raw.request("job.watch", job_id=job_id, after_seq=KEPT + LOST, epoch=1)
            assert reply["type"] == "job.watching" and reply["job"]["epoch"] == 1
            assert reply["job"]["seq"] == KEPT  # the cursor is ahead: the watch waits
            async with taken_over(srv, place, job_id, by):
                with trio.fail_after(20):
                    message = await raw.recv()
                    while message["type"] == "notification":
                        # QUIET renews nothing: the watch's presence lapses after lease_ttl,
                        # and a job that ends after that notifies its user, as it should.
                        message = await raw.recv()
    assert message["type"] == "error" and message["id"] is None and message["job_id"] == job_id
    assert message["code"] == "gone"
    assert (message["valid_through"], message["epoch"]) == (KEPT, 2)
    assert message["content_length"] == kept_length(answer)


async def test_the_python_client_rewinds_a_waiting_watch(case: tuple[Any, str]) -> None:
    """The client's watch yields one batch holding a ``rewind`` to the kept ``seq``, then the
    new epoch's batches from there: its text is the answer, not the lost words."""
    place, by = case
    async with served(QUIET, store=place()) as srv:
        job_id, answer = await orphan(srv.runtime.store)
        seen = answer[: kept_length(answer)] + "lost words "  # what the reader had
        batches: list[Batch] = []
        async with open_client(srv.url, "tok-alice") as client:
            async with client.watch(job_id, after_seq=KEPT + LOST, epoch=1) as watch:
                watch.content = seen
                async with trio.open_nursery() as nursery:

                    async def read() -> None:
                        async for batch in watch:
                            batches.append(batch)

                    nursery.start_soon(read)
                    with trio.fail_after(20):
                        while srv.runtime.statistics().remote_tails.watchers == 0:
                            await trio.sleep(0.01)  # the server's watch is open, and waits
                    async with taken_over(srv, place, job_id, by):
                        pass
                content = watch.content
    rewind = batches[0]
    assert (rewind.from_seq, rewind.to_seq, rewind.epoch) == (KEPT + 1, KEPT, 2)
    assert rewind.events == (RewindEvent(seq=KEPT, to_seq=KEPT, content_length=kept_length(answer)),)
    assert batches[1].from_seq == KEPT + 1 and all(b.epoch == 2 for b in batches)
    assert content == answer
    assert batches[-1].terminal is not None and batches[-1].terminal.status == "completed"


@pytest.mark.parametrize("kind", ["ui", "responses"])
async def test_numbered_items_past_what_was_kept_get_gone_while_waiting(
    case: tuple[Any, str], kind: str
) -> None:
    """The AI SDK's chunks and the Responses events: a client whose offset is beyond the
    items the kept entries make waits at the log's end; the new epoch's entries end its
    stream with ``gone`` naming the last item that stands."""
    place, by = case
    async with served(QUIET, store=place()) as srv:
        job_id, _ = await orphan(srv.runtime.store)

        def projection() -> Any:
            if kind == "ui":
                return UIChunkProjection(job_id)
            return ResponsesProjection(ResponseSource(job_id, 0.0, "backstream/lorem", {}, {}, "t"))

        kept = kept_items(projection())
        offset = StreamOffset(kept + LOST, 1)
        with pytest.raises(GoneError) as caught:
            async with open_replay(srv.runtime, job_id, projection(), user="alice", offset=offset) as replay:
                assert await replay.__anext__() == []  # the kept entries: all before the offset
                async with taken_over(srv, place, job_id, by):
                    with trio.fail_after(20):
                        async for items in replay:
                            assert items == [], "an item after an offset that named lost ones"
    assert caught.value.extra["valid_through"] == kept - 1 and caught.value.extra["epoch"] == 2


async def test_a_stored_log_reader_ahead_is_told_what_was_kept(place: Any) -> None:
    """The same for a watcher that reads the store itself (``StoredSource``): the job is
    taken over and ended (``interrupted``) while the reader waits past what was kept."""
    store = place()
    async with opened(store):
        job_id, answer = await orphan(store)
        reader = Watcher(
            job_id,
            1,
            StoredSource(store, job_id, 1, durable_seq=KEPT),
            after_seq=KEPT + LOST,
            batch_seconds=0.0,
            max_batch_events=100,
            max_batch_chars=10_000,
        )
        caught: list[GoneError] = []

        async def read() -> None:
            with pytest.raises(GoneError) as gone:
                await reader.__anext__()
            caught.append(gone.value)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()  # the reader waits at its cursor
                [recovered] = await recover_orphans(store, "i_b", time.time())
                assert (recovered.epoch, recovered.status) == (2, "interrupted")
    extra = caught[0].extra
    assert (extra["valid_through"], extra["epoch"], extra["content_length"]) == (KEPT, 2, kept_length(answer))
