"""After retention, 1,000 jobs leave nothing behind."""

from __future__ import annotations

import trio
import trio.testing

from backstream import Config, MemoryStore, open_runtime
from tests.helpers import collect, terminal


async def test_thousand_jobs_leave_no_jobs_watchers_or_tasks(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    config = Config(max_jobs=200, retention=30, sweep_interval=5, drain_timeout=0)
    async with open_runtime(config, store=store) as rt:
        await trio.sleep(0.1)
        baseline = trio.lowlevel.current_statistics().tasks_living
        statuses: dict[str, int] = {}

        async def one(i: int) -> None:
            started = await rt.start_job(
                user=f"u{i % 50}",
                thread_id=f"t{i % 7}",
                message_id=f"m{i}",
                model="backstream/lorem",
                messages=[{"role": "user", "content": "x"}],
                params={"max_tokens": 20, "tokens_per_s": 50},
            )
            async with rt.watch(started.job_id, user=f"u{i % 50}") as batches:
                async for batch in batches:
                    if i % 3 == 0 and batch.to_seq >= 3:
                        await rt.abort(started.job_id, user=f"u{i % 50}")
                    if batch.terminal is not None:
                        statuses[batch.terminal.status] = statuses.get(batch.terminal.status, 0) + 1
            if i % 5 == 0:  # a second, late watcher replays the finished job
                assert terminal(await collect(rt, started.job_id, user=f"u{i % 50}")).is_terminal

        for wave in range(5):
            async with trio.open_nursery() as nursery:
                for i in range(wave * 200, wave * 200 + 200):
                    nursery.start_soon(one, i)
        assert statuses == {"aborted": 334, "completed": 666}
        stats = rt.statistics()
        assert stats.jobs.running == 0 and stats.watchers == 0 and stats.jobs_watched == 0
        assert stats.job_tasks.children == 0 and stats.jobs.started_total == 1000
        assert store.job_count() == 1000
        await trio.sleep(config.retention + 2 * config.sweep_interval)
        assert store.job_count() == 0 and rt.statistics().keeper.swept_total == 1000
        empty = store.statistics()
        assert (empty.jobs, empty.entries, empty.message_keys, empty.users, empty.expiry_rows) == (
            0,
            0,
            0,
            0,
            0,
        )
        assert empty.notification_marks == 0  # the never-twice marks of swept jobs are gone too
        assert await rt.list_jobs(user="u1") == []
        assert trio.lowlevel.current_statistics().tasks_living == baseline
