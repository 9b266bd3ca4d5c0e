"""Shared test helpers: consuming watches and checking batches against the contract."""

from __future__ import annotations

import trio

from backstream import Batch, Runtime, Store
from backstream.actors.watcher import StoredSource, Watcher
from backstream.protocol.events import StatusEvent


async def collect(rt: Runtime, job_id: str, *, user: str = "alice", after_seq: int = 0) -> list[Batch]:
    async with rt.watch(job_id, user=user, after_seq=after_seq) as batches:
        return [batch async for batch in batches]


def check_contiguous(batches: list[Batch], after_seq: int = 0) -> None:
    """Each batch starts at the previous to_seq + 1 and ends at its last event's seq."""
    expected = after_seq + 1
    for batch in batches:
        assert batch.from_seq == expected, (batch.from_seq, expected)
        assert batch.to_seq == batch.events[-1].seq
        seqs = [ev.seq for ev in batch.events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert batch.from_seq <= seqs[0] <= batch.to_seq
        expected = batch.to_seq + 1


def joined_text(batches: list[Batch]) -> str:
    return "".join(batch.text for batch in batches)


def terminal(batches: list[Batch]) -> StatusEvent:
    last = batches[-1].events[-1]
    assert isinstance(last, StatusEvent) and last.is_terminal
    return last


def store_reader(store: Store, job_id: str, *, batch_seconds: float = 0.0) -> Watcher:
    """A watcher that reads only the store from seq 0, as on an instance that does not run the job."""
    return Watcher(
        job_id,
        1,
        StoredSource(store, job_id),
        after_seq=0,
        batch_seconds=batch_seconds,
        max_batch_events=1024,
        max_batch_chars=1 << 20,
    )


async def run_one_after_another(rt: Runtime, message_ids: list[str], *, model: str = "any/model") -> None:
    """Alice's jobs, each started once the one before has ended, nobody watching."""
    for message_id in message_ids:
        await rt.start_job(
            user="alice",
            thread_id="t",
            message_id=message_id,
            model=model,
            messages=[{"role": "user", "content": "go"}],
        )
        with trio.fail_after(5):
            await rt.wait_idle()
