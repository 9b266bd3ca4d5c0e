"""Notifications: exactly once, never for a muted thread or a watched job, pushed everywhere."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import trio

from backstream import ChatTurn, Config, OutputSink, Runtime, Store, TurnCollector, TurnResult, open_runtime
from backstream.protocol.records import JobRecord, JobRequest
from backstream.runtime.stores.redis import RedisStore
from backstream.runtime.stores.sqlite import SqliteStore
from tests.conftest import delete_prefix, redis_url, require_redis
from tests.helpers import collect

MSG = [{"role": "user", "content": "x"}]
CONFIG = Config(drain_timeout=0, flush_ms=20)


async def lorem(
    rt: Runtime, message_id: str, *, thread: str = "t1", tokens: int = 30, rate: float = 300
) -> str:
    started = await rt.start_job(
        user="alice",
        thread_id=thread,
        message_id=message_id,
        model="backstream/lorem",
        messages=MSG,
        params={"max_tokens": tokens, "tokens_per_s": rate},
    )
    return started.job_id


async def finished(rt: Runtime, job_id: str) -> None:
    with trio.fail_after(20):
        while not (await rt.get_job(job_id, user="alice")).job.is_terminal:
            await trio.sleep(0.02)
        await rt.wait_idle()


async def inbox(rt: Runtime) -> list[Any]:
    items, _ = await rt.notifications_list(user="alice")
    return items


async def test_unwatched_completion_notifies_once(unopened_store: Store) -> None:
    async with open_runtime(CONFIG, store=unopened_store) as rt:
        job_id = await lorem(rt, "m1")
        await finished(rt, job_id)
        items, unread = await rt.notifications_list(user="alice")
        assert [(n.type, n.job_id, n.title) for n in items] == [
            ("ai.message.received", job_id, "Response ready")
        ]
        content = (await rt.get_job(job_id, user="alice", include_content=True)).content or ""
        assert items[0].body == content[:200] and unread == 1 and not items[0].read
        # the text came with the job's end (its outbox entry), not read back from its log
        assert rt.statistics().dispatcher.previews_read_total == 0
        # never twice for the same job and type, however often it is asked
        assert not await rt.notifier.job_ended(
            job_id=job_id, user="alice", thread_id="t1", status="completed", content="again", error=None
        )
        assert len(await inbox(rt)) == 1
        assert await rt.notifications_read(user="alice", ids=[items[0].notification_id]) == 0
        assert (await rt.notifications_list(user="alice", unread_only=True))[0] == []
        assert (await rt.notifications_list(user="bob"))[0] == []


async def test_watched_completion_does_not_notify(unopened_store: Store) -> None:
    async with open_runtime(CONFIG, store=unopened_store) as rt:
        job_id = await lorem(rt, "m1")
        await collect(rt, job_id)  # watching to the end (and leaving right after)
        await finished(rt, job_id)
        assert await inbox(rt) == []


async def test_watcher_that_leaves_before_completion_is_notified(unopened_store: Store) -> None:
    async with open_runtime(CONFIG, store=unopened_store) as rt:
        job_id = await lorem(rt, "m1", tokens=60, rate=60)
        async with rt.watch(job_id, user="alice") as batches:
            await batches.__anext__()
        await finished(rt, job_id)
        assert [n.type for n in await inbox(rt)] == ["ai.message.received"]


async def test_failed_warns_and_an_unwatched_abort_tells_the_user(unopened_store: Store) -> None:
    """Stopped from one device with nobody watching (e.g. through the HTTP API): the user's
    other devices learn of it."""
    async with open_runtime(
        Config(drain_timeout=0, flush_ms=20, max_output_chars=20), store=unopened_store
    ) as rt:
        failed = await lorem(rt, "m1", tokens=100)
        await finished(rt, failed)
        aborted = await lorem(rt, "m2", tokens=1000, rate=20)
        await rt.abort(aborted, user="alice")
        await finished(rt, aborted)
        items = await inbox(rt)
        assert [(n.type, n.job_id, n.title) for n in items] == [
            ("system.warning", aborted, "Response stopped"),
            ("system.warning", failed, "Response failed"),
        ]
        assert "max_output_chars" in items[1].body


async def test_an_abort_by_someone_watching_the_job_makes_no_notification(unopened_store: Store) -> None:
    async with open_runtime(Config(drain_timeout=0, flush_ms=20), store=unopened_store) as rt:
        job_id = await lorem(rt, "m1", tokens=1000, rate=20)
        async with rt.watch(job_id, user="alice") as batches:
            await batches.__anext__()
            await rt.abort(job_id, user="alice")
            async for _ in batches:  # to the end: the watch delivered it
                pass
        await finished(rt, job_id)
        assert await inbox(rt) == []


async def test_mute_then_unmute(unopened_store: Store) -> None:
    async with open_runtime(CONFIG, store=unopened_store) as rt:
        await rt.mute_thread(user="alice", thread_id="quiet")
        muted = await lorem(rt, "m1", thread="quiet")
        other = await lorem(rt, "m2", thread="loud")
        await finished(rt, muted)
        await finished(rt, other)
        assert [n.job_id for n in await inbox(rt)] == [other]
        await rt.mute_thread(user="alice", thread_id="quiet", muted=False)
        later = await lorem(rt, "m3", thread="quiet")
        await finished(rt, later)
        assert [n.job_id for n in await inbox(rt)] == [later, other]


async def test_inbox_keeps_the_newest(autojump_clock: trio.testing.MockClock) -> None:
    async with open_runtime(Config(drain_timeout=0, max_notifications_per_user=3)) as rt:
        ids = []
        for i in range(5):
            ids.append(await lorem(rt, f"m{i}", tokens=3))
            await finished(rt, ids[-1])
        assert [n.job_id for n in await inbox(rt)] == ids[::-1][:3]


class ToolBot:
    """A model that asks for an approved tool, then answers."""

    async def run_turn(self, turn: ChatTurn, sink: OutputSink) -> TurnResult:
        collector = TurnCollector(sink, max_argument_chars=1000)
        if not any(m.get("role") == "tool" for m in turn.messages):
            fragment = {"index": 0, "id": "c1", "function": {"name": "delete_files", "arguments": '{"a": 1}'}}
            collector.feed_chunk({"choices": [{"index": 0, "delta": {"tool_calls": [fragment]}}]})
            collector.feed_chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        else:
            collector.feed_chunk(
                {"choices": [{"index": 0, "delta": {"content": "done"}, "finish_reason": "stop"}]}
            )
        await trio.lowlevel.checkpoint()
        return collector.result()


async def test_approval_wait_notifies(autojump_clock: trio.testing.MockClock) -> None:
    from backstream.runtime.tools.registry import ToolRegistry
    from tests import sample_tools

    tools = ToolRegistry.with_builtins()
    tools.register(sample_tools.delete_files)
    async with open_runtime(Config(drain_timeout=0), models={"toolbot": ToolBot()}, tools=tools) as rt:
        started = await rt.start_job(
            user="alice", thread_id="t", message_id="m", model="toolbot", messages=MSG, tools=["delete_files"]
        )
        while not (items := await inbox(rt)):  # it follows the awaiting_approval status
            await trio.sleep(0.01)
        assert (await rt.get_job(started.job_id, user="alice")).job.status == "awaiting_approval"
        assert [n.type for n in items] == ["ai.tool.approval_required"] and "delete_files" in items[0].body
        await rt.approve(started.job_id, "c1", True, user="alice")
        await finished(rt, started.job_id)
        assert [n.type for n in await inbox(rt)] == ["ai.message.received", "ai.tool.approval_required"]


async def test_interrupted_after_a_crash_warns(tmp_path: Any) -> None:
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    record = JobRecord(
        job_id="j_dead",
        user="alice",
        thread_id="t",
        message_id="m",
        request=JobRequest("backstream/echo", tuple(MSG)),
        status="running",
        seq=0,
        epoch=1,
        content_length=0,
        created_at=1.0,
        updated_at=1.0,
        owner="i_gone",
    )
    await store.create_job(record)
    await store.aclose()
    async with open_runtime(CONFIG, store=SqliteStore(tmp_path / "jobs.db")) as rt:
        items = await inbox(rt)
        assert [(n.type, n.job_id, n.title) for n in items] == [
            ("system.warning", "j_dead", "Response interrupted")
        ]
        # its end was written by the recovery, with no text of the job's: read from its log
        assert rt.statistics().dispatcher.previews_read_total == 1


async def test_pushes_through_the_front_door(autojump_clock: trio.testing.MockClock) -> None:
    from tests.ws_helpers import raw_client, served, start_fields

    async with served() as srv, raw_client(srv.url) as phone, raw_client(srv.url) as laptop:
        assert (await phone.hello())["features"]["notifications"] is True
        await laptop.hello()
        started = await laptop.request(
            "job.start", **start_fields(params={"max_tokens": 20, "tokens_per_s": 10}), watch=True
        )
        job_id = started["job"]["job_id"]
        await laptop.ws.aclose()  # dropped without job.unwatch: counts as leaving
        push = await phone.recv()
        assert push["type"] == "notification" and push["notification"]["job_id"] == job_id
        assert push["notification"]["type"] == "ai.message.received" and push["notification"]["read"] is False
        listed = await phone.request("notifications.list", unread_only=True)
        assert listed["type"] == "notifications.result" and listed["unread"] == 1
        assert listed["notifications"][0] == push["notification"]
        read = await phone.request("notifications.read", all=True)
        assert read == {"type": "notifications.read.result", "id": read["id"], "unread": 0}
        muted = await phone.request("thread.mute", thread_id="t1", muted=True)
        assert muted["thread_id"] == "t1" and muted["muted"] is True
        assert (await phone.request("notifications.read"))["code"] == "bad_request"


async def test_across_two_instances_on_redis() -> None:
    require_redis()
    prefix = f"bstest:{uuid.uuid4().hex[:12]}"
    try:
        async with (
            open_runtime(CONFIG, store=RedisStore(redis_url(), prefix=prefix)) as a,
            open_runtime(CONFIG, store=RedisStore(redis_url(), prefix=prefix)) as b,
        ):
            with b.subscribe_notifications("alice") as pushes:
                unwatched = await lorem(a, "m1")
                with trio.fail_after(10):
                    pushed = await pushes.receive()  # created on A, pushed on B
                assert pushed.job_id == unwatched and pushed.type == "ai.message.received"
            watched = await lorem(a, "m2", tokens=60, rate=100)
            await collect(b, watched)  # watched through B to the end: no notification
            await finished(a, watched)
            await trio.sleep(0.3)
            items, unread = await b.notifications_list(user="alice")
            assert [n.job_id for n in items] == [unwatched] and unread == 1
    finally:
        await delete_prefix(prefix)


@pytest.mark.parametrize("approved", [True])
async def test_store_notify_is_atomic_and_unique(store: Store, approved: bool) -> None:
    from backstream.protocol.records import NotificationRecord

    def record(n: str, kind: str = "ai.message.received") -> NotificationRecord:
        return NotificationRecord(
            notification_id=n,
            user="u",
            type=kind,
            job_id="j",
            thread_id="t",
            title="x",
            body="y",
            created_at=float(len(n)),
        )

    await store.watch_started("j", "w1", until=2e9)
    assert not await store.notify_unwatched(record("n1"), 1e9, 10)  # watched
    await store.watch_ended("j", "w1", saw_end=False)
    assert await store.notify_unwatched(record("n2"), 1e9, 10)
    assert not await store.notify_unwatched(record("n3"), 1e9, 10)  # one per type per job
    assert await store.notify_unwatched(record("n44", "system.warning"), 1e9, 10)
    await store.set_thread_muted("u", "t", True)
    assert not await store.notify_unwatched(record("n555", "ai.tool.approval_required"), 1e9, 10)
    items, unread = await store.list_notifications("u", unread_only=False, limit=10)
    assert [n.notification_id for n in items] == ["n44", "n2"] and unread == 2


async def test_sqlite_keeps_notifications_and_mutes_across_restarts(tmp_path: Any) -> None:
    path = tmp_path / "jobs.db"
    async with open_runtime(CONFIG, store=SqliteStore(path)) as rt:
        job_id = await lorem(rt, "m1")
        await finished(rt, job_id)
        await rt.mute_thread(user="alice", thread_id="quiet")
    async with open_runtime(CONFIG, store=SqliteStore(path)) as rt:
        items, unread = await rt.notifications_list(user="alice")
        assert [n.job_id for n in items] == [job_id] and unread == 1
        assert not await rt.notifier.job_ended(
            job_id=job_id, user="alice", thread_id="t1", status="completed", content="", error=None
        )  # still never twice
        muted = await lorem(rt, "m2", thread="quiet")
        await finished(rt, muted)
        assert [n.job_id for n in await inbox(rt)] == [job_id]


async def test_python_client_notification_calls(autojump_clock: trio.testing.MockClock) -> None:
    from backstream.client import open_client
    from tests.ws_helpers import served

    async with served() as srv, open_client(srv.url, "tok-alice") as client:
        started = await client.start_job(
            thread_id="t",
            message_id="m",
            model="backstream/lorem",
            messages=MSG,
            params={"max_tokens": 5, "tokens_per_s": 50},
        )
        pushed = await client.next_notification()  # pushed: nobody watched it
        assert pushed.job_id == started.job.job_id and pushed.type == "ai.message.received"
        listed = await client.notifications_list(unread_only=True)
        assert [n.notification_id for n in listed.notifications] == [
            pushed.notification_id
        ] and listed.unread == 1
        assert (await client.notifications_read([pushed.notification_id])).unread == 0
        muted = await client.mute_thread("t")
        assert muted.muted and muted.thread_id == "t"
