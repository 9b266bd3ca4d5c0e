"""Watchers: batching, cursors, replay and consumers that are slow or never read."""

from __future__ import annotations

import gc
import itertools
import tracemalloc

import pytest
import trio

import backstream
from backstream import Config, open_runtime
from backstream.actors.joblog import JobLog
from backstream.actors.watcher import LiveSource, Watcher
from backstream.protocol.events import Batch, TextEvent
from tests.helpers import check_contiguous, collect, joined_text, terminal

MSG = [{"role": "user", "content": "x"}]


async def lorem(rt: backstream.Runtime, message_id: str = "m", **params: object) -> str:
    started = await rt.start_job(
        user="alice",
        thread_id="t",
        message_id=message_id,
        model="backstream/lorem",
        messages=MSG,
        params=params,
    )
    return started.job_id


async def test_batches_are_rate_limited_while_events_keep_coming(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_runtime(Config(batch_ms=50, drain_timeout=0)) as rt:
        job_id = await lorem(rt, max_tokens=1000, tokens_per_s=1000)
        times = []
        async with rt.watch(job_id, user="alice") as batches:
            collected = []
            async for batch in batches:
                times.append(trio.current_time())
                collected.append(batch)
        check_contiguous(collected)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) >= 0.05 - 1e-9  # never more than one batch per batch_ms
        assert 18 <= len(collected) <= 23  # about one per 50 ms over one second
        assert len(joined_text(collected).split()) == 1000


async def test_watchers_of_a_job_that_keep_up_cut_the_same_batches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Watchers that join a job at different moments fall onto its shared grid: after
    their first batches they cut the same ranges at the same times (so the log merges
    each range once and its frame is encoded once), each still one per batch_ms at most."""
    async with open_runtime(Config(batch_ms=50, drain_timeout=0)) as rt:
        job_id = await lorem(rt, max_tokens=1000, tokens_per_s=1000)
        cuts: dict[int, list[tuple[float, int, int]]] = {}

        async def watch_timed(k: int, delay: float) -> None:
            await trio.sleep(delay)
            cuts[k] = []
            async with rt.watch(job_id, user="alice") as batches:
                async for batch in batches:
                    cuts[k].append((trio.current_time(), batch.from_seq, batch.to_seq))

        async with trio.open_nursery() as nursery:
            for k, delay in enumerate((0.0, 0.013, 0.031, 0.2)):
                nursery.start_soon(watch_timed, k, delay)
        for k, batches in cuts.items():
            times = [t for t, _f, _t in batches]
            assert min(b - a for a, b in itertools.pairwise(times)) >= 0.05 - 1e-9, k
        late = [{(t, f, to) for t, f, to in batches if t > 0.4} for batches in cuts.values()]
        assert late[0] and all(cut == late[0] for cut in late), [
            sorted(c ^ late[0]) for c in late
        ]  # same ranges, same times


async def test_idle_watcher_gets_a_batch_at_once(autojump_clock: trio.testing.MockClock) -> None:
    async with open_runtime(Config(batch_ms=50, drain_timeout=0)) as rt:
        t0 = trio.current_time()
        job_id = await lorem(rt, max_tokens=4, tokens_per_s=1)  # word k is logged at t0 + k seconds
        arrivals = []
        async with rt.watch(job_id, user="alice") as batches:
            async for batch in batches:
                arrivals.append((trio.current_time() - t0, batch))
        check_contiguous([b for _, b in arrivals])
        # Words 1..3 reach an idle watcher the moment they are logged, not on a 50 ms grid.
        for k in (1, 2, 3):
            when = next(
                t for t, b in arrivals if any(ev.kind == "text" and ev.seq == k + 2 for ev in b.events)
            )
            assert when == pytest.approx(k, abs=1e-9)


async def test_replay_from_any_cursor_after_completion(autojump_clock: trio.testing.MockClock) -> None:
    async with open_runtime(Config(drain_timeout=0)) as rt:
        job_id = await lorem(rt, max_tokens=50, tokens_per_s=100)
        full = await collect(rt, job_id)
        content = (await rt.get_job(job_id, user="alice", include_content=True)).content
        assert joined_text(full) == content
        last = terminal(full).seq
        for cursor in (0, 1, 7, last - 1):
            part = await collect(rt, job_id, after_seq=cursor)
            check_contiguous(part, after_seq=cursor)
            assert terminal(part).status == "completed"
            words_after = sum(1 for b in full for ev in b.events if ev.kind == "text" and ev.seq > cursor)
            assert words_after <= 50
        assert await collect(rt, job_id, after_seq=last) == []  # nothing left to send: the watch just ends
        with pytest.raises(backstream.BadRequestError):
            await collect(rt, job_id, after_seq=last + 1)


async def test_epoch_mismatch_is_gone(autojump_clock: trio.testing.MockClock) -> None:
    async with open_runtime(Config(drain_timeout=0)) as rt:
        job_id = await lorem(rt, max_tokens=2)
        with pytest.raises(backstream.GoneError):
            async with rt.watch(job_id, user="alice", epoch=2):
                pass
        async with rt.watch(job_id, user="alice", epoch=1) as batches:
            assert terminal([b async for b in batches]).status == "completed"


async def test_cursor_ahead_of_a_running_job_waits(autojump_clock: trio.testing.MockClock) -> None:
    async with open_runtime(Config(drain_timeout=0)) as rt:
        job_id = await lorem(rt, max_tokens=20, tokens_per_s=10)
        batches = await collect(rt, job_id, after_seq=10)
        check_contiguous(batches, after_seq=10)
        assert terminal(batches).status == "completed"


async def test_watch_counts(autojump_clock: trio.testing.MockClock) -> None:
    async with open_runtime(Config(drain_timeout=0)) as rt:
        job_id = await lorem(rt, max_tokens=100)
        async with rt.watch(job_id, user="alice"), rt.watch(job_id, user="alice"):
            assert (await rt.get_job(job_id, user="alice")).job.watchers == 2
            assert rt.statistics().watchers == 2
        assert (await rt.get_job(job_id, user="alice")).job.watchers == 0
        assert rt.statistics().jobs_watched == 0


async def test_large_backlog_is_split_into_bounded_batches(autojump_clock: trio.testing.MockClock) -> None:
    async with open_runtime(Config(max_batch_chars=1000, max_batch_events=50, drain_timeout=0)) as rt:
        job_id = await lorem(rt, max_tokens=2000, tokens_per_s=100_000)
        await trio.sleep(1)
        batches = await collect(rt, job_id)
        check_contiguous(batches)
        assert all(len(b.text) <= 1000 + 20 and len(b.events) <= 50 for b in batches)
        assert len(joined_text(batches).split()) == 2000


async def test_a_consumer_that_never_reads_costs_nothing_and_slows_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def run(stuck_watchers: int, tokens: int) -> tuple[float, int]:
        async with open_runtime(Config(drain_timeout=0)) as rt:
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            t0 = trio.current_time()
            job_id = await lorem(rt, max_tokens=tokens, tokens_per_s=1000)
            async with trio.open_nursery() as nursery:
                for _ in range(stuck_watchers):

                    async def stuck() -> None:
                        async with rt.watch(job_id, user="alice") as batches:
                            await batches.__anext__()  # reads one batch, then never again
                            await trio.sleep_forever()

                    nursery.start_soon(stuck)
                reader = await collect(rt, job_id)
                elapsed = trio.current_time() - t0
                await rt.wait_idle()  # let the job's last write land first
                gc.collect()
                grown = tracemalloc.get_traced_memory()[0] - before
                nursery.cancel_scope.cancel()
            tracemalloc.stop()
            assert terminal(reader).status == "completed"
            return elapsed, grown

    await run(20, 1000)  # warm-up: module caches created on first use are not the watchers'
    alone_time, _ = await run(0, 10_000)
    costs = {}
    for tokens in (1000, 10_000):
        time_10, mem_10 = await run(10, tokens)
        time_30, mem_30 = await run(30, tokens)
        costs[tokens] = (mem_30 - mem_10) / 20  # what one more stuck watcher costs
        if tokens == 10_000:
            # The job did not wait for anyone.
            assert time_10 == pytest.approx(alone_time, abs=0.06)
            assert time_30 == pytest.approx(alone_time, abs=0.06)
    # One more stuck watcher costs the same whether the job wrote 6 KB or 60 KB since it
    # stopped reading: it holds a cursor, not a copy (a copy would add about 54 KB each).
    assert abs(costs[10_000] - costs[1000]) < 1_000, costs
    assert costs[10_000] < 8_000, costs


async def test_a_cursor_past_the_end_of_a_running_job_ends_when_the_job_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Served once the log reaches it; if the job ends first, the watch ends with
    bad_request instead of waiting forever and keeping the job's log in memory."""
    async with open_runtime(Config(drain_timeout=0)) as rt:
        job_id = await lorem(rt, max_tokens=20, tokens_per_s=10)
        with trio.fail_after(60), pytest.raises(backstream.BadRequestError, match="beyond"):
            await collect(rt, job_id, after_seq=500)
        assert (await rt.get_job(job_id, user="alice")).job.status == "completed"


@pytest.mark.parametrize(("late_by", "interval"), [(0.005, 0.05), (0.02, 0.10)])
async def test_a_watcher_woken_late_keeps_its_slots_unless_more_than_a_quarter_interval_late(
    autojump_clock: trio.testing.MockClock, late_by: float, interval: float
) -> None:
    """A loop that wakes a watcher a little late keeps the grid (one batch per slot); one
    that wakes it later than a quarter interval, an overloaded process, makes it skip
    slots: fewer, larger batches, nothing lost."""
    log = JobLog("j_late", 1, max_output_chars=10**6)

    async def late(when: float) -> None:
        await trio.sleep_until(when + late_by)

    watcher = Watcher(
        "j_late",
        1,
        LiveSource(log),
        after_seq=0,
        batch_seconds=0.05,
        max_batch_events=1024,
        max_batch_chars=10**6,
        sleep_until=late,
    )
    cut: list[tuple[float, Batch]] = []

    async def write() -> None:
        log.append_status("running")
        for _ in range(400):  # a token every 5 ms for 2 s
            log.append_text("w ")
            await trio.sleep(0.005)
        log.append_status("completed")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        async for batch in watcher:
            cut.append((trio.current_time(), batch))
    check_contiguous([b for _, b in cut])
    assert sum(len(ev.text) for _, b in cut for ev in b.events if isinstance(ev, TextEvent)) == 800
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(cut[1:-1])]
    assert min(gaps) >= interval - 1e-6
    assert max(gaps) <= interval + 0.001
