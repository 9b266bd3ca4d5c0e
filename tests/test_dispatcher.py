"""The dispatcher's totals live on the one object the system supervisor runs again after a
failure: ``run`` keeps nothing else between runs, so a restart loses no count."""

from __future__ import annotations

import trio
import trio.testing

from backstream.actors.clock import WallClock
from backstream.actors.dispatcher import Dispatcher, DispatcherStatistics
from backstream.actors.notifier import Notifier
from backstream.protocol.events import StatusEvent
from backstream.runtime.stores.memory import MemoryStore
from tests.test_handover_and_outbox import end_at
from tests.test_store_conformance import progress, record, texts


async def _run_until_carried_out(dispatcher: Dispatcher, carried_out: int) -> None:
    """Run the dispatcher until its total reaches ``carried_out``, then stop it (a crash
    or a restart of its supervisor, as far as the dispatcher can tell)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run)
        with trio.fail_after(5):
            while dispatcher.statistics().carried_out_total < carried_out:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_totals_outlive_a_restart_and_nothing_stays_in_hand(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store, clock = MemoryStore(), WallClock()
    await store.open()
    notifier = Notifier(store, clock, max_per_user=10)
    dispatcher = Dispatcher(store, store, notifier, clock, instance_id="i_a")
    for job_id in ("j_1", "j_2", "j_3"):
        await store.create_job(record(job_id=job_id, message_id=job_id))
        await store.commit(job_id, [StatusEvent(seq=1, status="running"), *texts(2, "hi")], progress(2))

    await end_at(store, "j_1", "completed")
    await _run_until_carried_out(dispatcher, 1)  # carried out by the first drain, at start
    await end_at(store, "j_2", "completed")
    await end_at(store, "j_3", "aborted")  # an abort is notified too (nobody watched it)
    await _run_until_carried_out(dispatcher, 3)  # a second run of the same dispatcher

    stats = dispatcher.statistics()
    assert stats == DispatcherStatistics(
        carried_out_total=3,
        delivered_total=3,
        failed_total=0,
        retries_total=0,
        rounds_total=stats.rounds_total,
        in_hand=0,
        previews_read_total=3,  # the commits here carried no preview: each was read from its log
    )
    assert stats.rounds_total >= 4  # each run: a batch, then a claim that finds none
    items, _ = await store.list_notifications("alice", unread_only=False, limit=10)
    assert sorted(n.job_id for n in items) == ["j_1", "j_2", "j_3"]
