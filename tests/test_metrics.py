"""Metrics an operator alerts on: job endings by status and error code, bytes as bytes, tool
threads, the outbox's dispatcher and the upstream's connections."""

from __future__ import annotations

import json
import threading

import trio

from backstream import Config, open_runtime
from backstream.runtime.server.metrics import metrics_text
from backstream.runtime.tools.registry import ToolRegistry, tool
from tests.helpers import run_one_after_another
from tests.upstream_server import FakeUpstream, streams
from tests.ws_helpers import raw_client, served


async def test_endings_bytes_and_abandoned_threads() -> None:
    release = threading.Event()

    def hang() -> str:
        """Block until released."""
        release.wait(30)
        return "late"

    tools = ToolRegistry([tool(hang, timeout=0.05)], max_threads=2)
    config = Config(job_timeout=0.5, drain_timeout=0)
    try:
        async with served(config, tools=tools) as srv, raw_client(srv.url) as c:
            received = 0
            await c.ws.send_message(
                json.dumps({"type": "hello", "id": "h", "protocol": 1, "token": "tok-alice"})
            )
            received += len((await c.ws.get_message()).encode())
            jobs = [
                ("m1", "backstream/echo", {}, "héllo wörld ✓ ünïcode"),  # completes, non-ASCII
                ("m2", "backstream/lorem", {"max_tokens": 1000, "tokens_per_s": 10}, "x"),  # times out
            ]
            for message_id, model, params, content in jobs:
                start = {
                    "type": "job.start",
                    "id": message_id,
                    "thread_id": "t",
                    "message_id": message_id,
                    "model": model,
                    "messages": [{"role": "user", "content": content}],
                    "params": params,
                    "watch": True,
                }
                await c.ws.send_message(json.dumps(start))
                while True:
                    frame = await c.ws.get_message()
                    received += len(frame.encode())
                    message = json.loads(frame)
                    events = message.get("events", [])
                    if events and events[-1]["kind"] == "status" and events[-1]["status"] != "running":
                        break
            assert (await tools.run("hang", "{}")).is_error  # abandoned on its thread
            text = metrics_text(srv.runtime, srv.door)().decode()
            assert srv.door.statistics().bytes_sent == received  # bytes, not characters
    finally:
        release.set()
    assert 'backstream_job_endings_total{error_code="",status="completed"} 1.0' in text
    assert 'backstream_job_endings_total{error_code="timeout",status="failed"} 1.0' in text
    assert "backstream_tool_threads_abandoned 1.0" in text
    assert "backstream_tool_calls_abandoned_total 1.0" in text
    assert "backstream_tool_threads_max 2.0" in text
    assert f"backstream_bytes_sent_total {float(received)}" in text
    with trio.fail_after(5):
        while tools.statistics().abandoned:
            await trio.sleep(0.01)


async def test_outbox_and_upstream_connections_after_jobs_end(upstream: FakeUpstream) -> None:
    """Two jobs end unwatched, one after the other: each end is carried out of the outbox
    with its notification, and the second request went over the first one's connection."""
    upstream.script(streams(["one"]), streams(["two"]))
    async with open_runtime(Config(upstream_url=upstream.url, drain_timeout=0)) as rt:
        await run_one_after_another(rt, ["m1", "m2"])
        with trio.fail_after(5):
            while rt.statistics().dispatcher.carried_out_total < 2:
                await trio.sleep(0.01)
        text = metrics_text(rt, None)().decode()
        notifications, _ = await rt.notifications_list(user="alice")
    assert len(notifications) == 2
    assert "backstream_outbox_carried_out_total 2.0" in text
    assert "backstream_outbox_notifications_total 2.0" in text
    assert "backstream_outbox_failed_total 0.0" in text
    assert "backstream_outbox_retries_total 0.0" in text
    assert "backstream_outbox_in_hand 0.0" in text
    assert len(upstream.requests) == 2 and upstream.connections == 1
    assert "backstream_upstream_connections_opened_total 1.0" in text
    assert "backstream_upstream_connections_reused_total 1.0" in text
    assert "backstream_upstream_connections_kept_total 2.0" in text
    assert "backstream_upstream_connections_closed_total 0.0" in text
    assert "backstream_upstream_connections_idle 1.0" in text


async def test_no_upstream_no_connection_metrics() -> None:
    async with open_runtime(Config(drain_timeout=0)) as rt:
        assert rt.statistics().upstream_pool is None
        text = metrics_text(rt, None)().decode()
    assert "backstream_upstream_connections" not in text
    assert "backstream_outbox_carried_out_total 0.0" in text
