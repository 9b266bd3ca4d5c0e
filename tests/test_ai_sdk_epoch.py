"""/v1/ai-sdk's ``resume`` is fenced by the log's epoch, as ``job.watch`` and the Responses
API's offsets are: a ``lastSequence`` counted before a recovery is refused, never answered
with the recovered log's tail."""

from __future__ import annotations

import json
from pathlib import Path

import trio
from trio_websocket import open_websocket_url

from backstream import Config
from backstream.protocol.events import StatusEvent
from backstream.runtime.stores.sqlite import SqliteStore
from tests.test_ai_sdk import ai_sdk_server
from tests.test_ai_sdk_server import chunks_of, response, resume_frame, send_frame, url
from tests.test_handover_and_outbox import CAPACITY
from tests.test_store_conformance import NOW, progress, record, texts


def fenced_resume(request_id: str, chat_id: str, last_sequence: int, epoch: int) -> str:
    frame = json.loads(resume_frame(request_id, chat_id, last_sequence=last_sequence))
    return json.dumps({**frame, "epoch": epoch})


async def test_start_frames_carry_the_epoch() -> None:
    async with ai_sdk_server() as server, open_websocket_url(url(server)) as ws:
        await ws.send_message(send_frame("s", "c", "hi", {"model": "backstream/echo"}))
        sent = await response(ws, "s")
        assert sent[0] == {"type": "start", "requestId": "s", "epoch": 1}
        await ws.send_message(fenced_resume("r", "c", 1, 1))
        assert chunks_of(await response(ws, "r")) == chunks_of(sent)[2:]


async def test_a_resume_after_a_recovery_is_fenced_by_the_epoch(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "jobs.db"))
    config = Config(drain_timeout=0, lease_renew_interval=0.1, continuations={"*": "interrupt"})
    async with ai_sdk_server(config, store=store) as server:
        # A job of alice's chat "t1" that another instance wrote at epoch 1 and left running:
        # this server's keeper recovers it (epoch 2, interrupted after what was durable: its
        # model's policy says so).
        await store.create_job(record(lease_until=NOW + 15), CAPACITY)
        await store.commit(
            "j_1", [StatusEvent(seq=1, status="running"), *texts(2, "one ", "two ")], progress(3)
        )
        with trio.fail_after(10):
            while (job := await store.get_job("j_1")) is None or job.epoch != 2 or job.finished_at is None:
                await trio.sleep(0.05)
        async with open_websocket_url(url(server)) as ws:
            await ws.send_message(resume_frame("whole", "t1"))
            whole = await response(ws, "whole")
            assert whole[0] == {"type": "start", "requestId": "whole", "epoch": 2}
            replayed = chunks_of(whole)
            assert [seq for seq, _ in replayed] == list(range(len(replayed)))
            text = "".join(chunk["delta"] for _, chunk in replayed if chunk["type"] == "text-delta")
            assert text == "one two "  # the whole current log, once
            assert replayed[-1][1] == {"type": "finish", "finishReason": "interrupted"}
            cursor = 3  # a chunk made of entries the recovery kept
            lost = len(replayed) - 1  # one made of the new epoch's end: at epoch 1, not the same
            for request_id, frame in (
                ("stale", fenced_resume("stale", "t1", lost, 1)),
                ("bare", resume_frame("bare", "t1", cursor)),  # counted without saying where
            ):
                await ws.send_message(frame)
                [error] = await response(ws, request_id)
                assert error["type"] == "error" and "epoch 2" in error["errorText"], error
            await ws.send_message(fenced_resume("kept", "t1", cursor, 1))
            kept = await response(ws, "kept")
            assert kept[0]["epoch"] == 2 and chunks_of(kept) == replayed[cursor + 1 :]
            await ws.send_message(fenced_resume("current", "t1", cursor, 2))
            current = await response(ws, "current")
            assert current[0]["epoch"] == 2 and chunks_of(current) == replayed[cursor + 1 :]
