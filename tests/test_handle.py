"""The job handle: a job running here (its actor) and a job seen through the store answer
alike; through the store, an abort or a decision reaches the job that runs elsewhere, and
the wait for its effect is bounded."""

from __future__ import annotations

import pytest
import trio

import backstream
from backstream import Config, MemoryStore, open_runtime
from backstream.protocol.records import JobRecord, JobRequest, SharedCapacity
from backstream.runtime.handle import JobHandles, LiveJob, StoredJob
from backstream.runtime.tools.demo import DEMO_TOOLS
from backstream.runtime.tools.registry import ToolRegistry

NOTE = [{"role": "user", "content": "What is 6 * 7? Then send a note to Ada."}]


def elsewhere(store: backstream.Store, remote_wait: float = 5.0) -> JobHandles:
    """Handles as another instance sharing ``store`` has them: no job runs there."""
    return JobHandles(store, lambda _job_id: None, lambda _job_id: 0, remote_wait=remote_wait)


async def stored_status(store: backstream.Store, job_id: str, status: str) -> None:
    while (record := await store.get_job(job_id)) is None or record.status != status:
        await trio.sleep(0.01)


async def test_live_and_stored_handles_answer_alike_and_a_decision_goes_through_the_store() -> None:
    # A real clock: the tools run on worker threads, which a jumping clock would time out.
    tools = ToolRegistry.with_builtins()
    for item in DEMO_TOOLS:
        tools.register(item)
    async with open_runtime(Config(drain_timeout=0), tools=tools) as rt:
        started = await rt.start_job(
            user="u",
            thread_id="t",
            message_id="m",
            model="backstream/tools-demo",
            messages=NOTE,
            params={"tokens_per_s": 2000},
            tools=["calculate", "send_note"],
        )
        job_id = started.job_id
        live = await rt._lookup(job_id, "u")
        assert isinstance(live, LiveJob)
        with trio.fail_after(10):
            await stored_status(rt.store, job_id, "awaiting_approval")
        assert live.summary().status == "awaiting_approval"
        far = await elsewhere(rt.store).lookup(job_id, "u")
        assert isinstance(far, StoredJob) and far.summary().status == "awaiting_approval"
        with pytest.raises(backstream.ConflictError):
            await far.approve("no-such-call", True)
        _, entries = await far.log()
        [call_id] = [e.call_id for e in entries if e.kind == "approval_required"]
        with trio.fail_after(10):
            decided = await far.approve(call_id, True)  # the actor here takes it from the store
            assert decided.status != "awaiting_approval"
            ended = await live.wait_until_ended()
        assert ended.status == "completed"
        with pytest.raises(backstream.ConflictError):
            await live.approve(call_id, False)  # decided already
        await rt.wait_idle()
        after = await rt._lookup(job_id, "u")  # the actor has left: its record is final
        assert isinstance(after, StoredJob)
        live_info = await live.info(include_content=True, offset=3)
        stored_info = await after.info(include_content=True, offset=3)
        assert live_info.content == stored_info.content and live_info.content
        assert live_info.tool_calls == stored_info.tool_calls and len(live_info.tool_calls) == 2
        for field in ("status", "seq", "content_length", "epoch"):
            assert getattr(live_info.job, field) == getattr(stored_info.job, field), field
        assert (await live.log())[1] == (await after.log())[1]
        live_view, stored_view = live.log_view(), after.log_view()
        assert (live_view.epoch, live_view.last_seq, live_view.finished) == (
            stored_view.epoch,
            stored_view.last_seq,
            True,
        )
        aborted = await after.abort()
        assert not aborted.aborted and aborted.job.status == "completed"


async def test_an_abort_through_the_store_stops_the_job_where_it_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_runtime(Config(drain_timeout=0, remote_abort_wait=5)) as rt:
        started = await rt.start_job(
            user="u",
            thread_id="t",
            message_id="m",
            model="backstream/lorem",
            messages=NOTE,
            params={"max_tokens": 10_000, "tokens_per_s": 10},
        )
        await trio.sleep(1)
        far = await elsewhere(rt.store).lookup(started.job_id, "u")
        t0 = trio.current_time()
        result = await far.abort()
        assert trio.current_time() - t0 < 1  # the actor heard it, well before the bound
        assert result.aborted and result.job.status == "aborted"
        assert (await rt.get_job(started.job_id, user="u")).job.status == "aborted"


async def test_the_wait_for_an_instance_that_does_not_answer_is_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    request = JobRequest(model="backstream/lorem", messages=({"role": "user", "content": "x"},))
    record = JobRecord(
        job_id="j_nobody_runs_it",
        user="u",
        thread_id="t",
        message_id="m",
        request=request,
        status="running",
        seq=0,
        epoch=1,
        content_length=0,
        created_at=0.0,
        updated_at=0.0,
        owner="i_gone",
        lease_until=1e9,
    )
    _, created = await store.create_job(
        record, SharedCapacity(now=0.0, lease_until=1e9, max_jobs=1, max_jobs_per_user=1)
    )
    assert created
    handles = elsewhere(store, remote_wait=3)
    handle = await handles.lookup(record.job_id, "u")
    t0 = trio.current_time()
    result = await handle.abort()
    assert trio.current_time() - t0 == pytest.approx(3)
    assert not result.aborted and result.job.status == "running"
    stored = await store.get_job(record.job_id)
    assert stored is not None and stored.abort_requested  # asked; the owner would act on it
    with pytest.raises(backstream.ConflictError):
        await handle.approve("c1", True)  # nothing waits for approval


async def test_another_users_job_is_not_found_like_a_missing_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_runtime(Config(drain_timeout=0)) as rt:
        started = await rt.start_job(
            user="alice",
            thread_id="t",
            message_id="m",
            model="backstream/lorem",
            messages=NOTE,
            params={"max_tokens": 10_000, "tokens_per_s": 10},
        )
        messages = []
        for handles in (rt._handles, elsewhere(rt.store)):
            for job_id in (started.job_id, "j_missing", ""):
                with pytest.raises(backstream.NotFoundError) as caught:
                    await handles.lookup(job_id, "bob")
                messages.append(str(caught.value))
        assert len(set(messages)) == 1
        assert isinstance(await rt._handles.lookup(started.job_id, "alice"), LiveJob)
