"""The watcher's batching rule: a watcher idle for a batch interval sends the next entry at
once (the leading edge); while entries keep coming, batches follow the job's grid, at most
one per ``batch_ms``; nothing is lost or reordered either way."""

from __future__ import annotations

import itertools
import math
import random
import zlib

import trio
import trio.testing

from backstream.actors.joblog import JobLog
from backstream.actors.watcher import LiveSource, Watcher
from backstream.protocol.events import Batch, TextEvent
from tests.helpers import check_contiguous

BATCH = 0.05


def grid_slot_after(job_id: str, t: float) -> float:
    """The first slot of the job's grid at least one interval after ``t`` (the watcher's
    grid: phase from the job id)."""
    phase = (zlib.crc32(job_id.encode()) % 1024) / 1024 * BATCH
    return phase + math.ceil((t + BATCH - phase) / BATCH - 1e-7) * BATCH


def a_job_whose_grid_is_late(after: float, at_least: float) -> str:
    """A job id whose first grid slot an interval after ``after`` comes ``at_least`` later
    than ``after + BATCH``: there, waiting for the grid would show."""
    for n in itertools.count():
        job_id = f"j_edge{n}"
        if grid_slot_after(job_id, after) - (after + BATCH) >= at_least:
            return job_id
    raise AssertionError("unreachable")


async def watch(log: JobLog, job_id: str, writer: object) -> list[tuple[float, Batch]]:
    watcher = Watcher(
        job_id,
        1,
        LiveSource(log),
        after_seq=0,
        batch_seconds=BATCH,
        max_batch_events=1024,
        max_batch_chars=10**6,
    )
    cut: list[tuple[float, Batch]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)  # type: ignore[arg-type]
        async for batch in watcher:
            cut.append((trio.current_time(), batch))
    return cut


def words(cut: list[tuple[float, Batch]]) -> str:
    return "".join(ev.text for _, b in cut for ev in b.events if isinstance(ev, TextEvent))


async def test_the_first_entry_after_an_idle_interval_goes_out_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    t0 = trio.current_time()
    first_cut = t0 + 0.2
    job_id = a_job_whose_grid_is_late(first_cut, at_least=0.02)
    log = JobLog(job_id, 1, max_output_chars=10**6)

    async def write() -> None:
        log.append_status("running")
        await trio.sleep_until(first_cut)
        log.append_text("a ")
        await trio.sleep_until(first_cut + 0.06)  # idle for more than an interval
        log.append_text("b ")
        await trio.sleep_until(first_cut + 1.0)
        log.append_text("c ")
        log.append_status("completed")

    cut = await watch(log, job_id, write)
    check_contiguous([b for _, b in cut])
    sent = {ev.text: t for t, b in cut for ev in b.events if isinstance(ev, TextEvent)}
    assert sent["a "] == first_cut
    # At once, not on the job's next slot (which comes at least 20 ms later).
    assert sent["b "] == first_cut + 0.06
    assert grid_slot_after(job_id, first_cut) >= first_cut + 0.07
    assert sent["c "] == first_cut + 1.0


async def test_an_entry_within_an_interval_of_the_last_batch_waits_for_the_grid(
    autojump_clock: trio.testing.MockClock,
) -> None:
    t0 = trio.current_time()
    first_cut = t0 + 0.2
    job_id = a_job_whose_grid_is_late(first_cut, at_least=0.02)
    log = JobLog(job_id, 1, max_output_chars=10**6)

    async def write() -> None:
        log.append_status("running")
        await trio.sleep_until(first_cut)
        log.append_text("a ")
        await trio.sleep_until(first_cut + 0.03)  # within the interval: not idle
        log.append_text("b ")
        log.append_status("completed")

    cut = await watch(log, job_id, write)
    sent = {ev.text: t for t, b in cut for ev in b.events if isinstance(ev, TextEvent)}
    assert sent["b "] == grid_slot_after(job_id, first_cut)


async def test_a_steady_stream_gets_at_most_one_batch_per_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for spacing in (0.005, 1 / 30, 0.049, 0.051, 0.07):
        log = JobLog("j_steady", 1, max_output_chars=10**6)
        count = int(2 / spacing)

        async def write(log: JobLog = log, spacing: float = spacing, count: int = count) -> None:
            log.append_status("running")
            for k in range(count):
                log.append_text(f"{k} ")
                await trio.sleep(spacing)
            log.append_status("completed")

        cut = await watch(log, "j_steady", write)
        check_contiguous([b for _, b in cut])
        assert words(cut) == "".join(f"{k} " for k in range(count))
        times = [t for t, _ in cut]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) >= BATCH - 1e-9, spacing
        span = times[-1] - times[0]
        assert len(cut) <= span / BATCH + 1, spacing


async def test_nothing_is_lost_or_reordered_whatever_the_gaps(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rng = random.Random(7)
    log = JobLog("j_gaps", 1, max_output_chars=10**6)
    count = 600

    async def write() -> None:
        log.append_status("running")
        for k in range(count):
            log.append_text(f"{k} ")
            if rng.random() < 0.7:  # bursts, pauses shorter and longer than an interval
                await trio.sleep(rng.choice((0.0, 0.001, 0.02, 0.049, 0.05, 0.051, 0.08, 0.12)))
        log.append_status("completed")

    cut = await watch(log, "j_gaps", write)
    check_contiguous([b for _, b in cut])
    assert words(cut) == "".join(f"{k} " for k in range(count))
    times = [t for t, _ in cut]
    assert min(b - a for a, b in itertools.pairwise(times)) >= BATCH - 1e-9
