"""The Python client's transport on its own: how it routes what a server sends.

The server here is a scripted WebSocket server over loopback that speaks the protocol
through the real codec: after ``welcome`` it waits for a ``ping``, then sends exactly the
pushes a test gives it, then the ``pong``. So each test controls the order of frames.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from backstream.client.transport import INBOX_SIZE, ConnectSettings, Transport, WatchItem
from backstream.protocol.codec import decode_client, encode
from backstream.protocol.errors import NotFoundError
from backstream.protocol.events import TextEvent
from backstream.protocol.messages import (
    ErrorMessage,
    Hello,
    JobEvents,
    JobGet,
    Notification,
    NotificationPush,
    Ping,
    Pong,
    ServerInfo,
    ServerMessage,
    Welcome,
)


def welcome() -> Welcome:
    return Welcome(
        id="hello",
        protocol=1,
        user="alice",
        session_id="s1",
        server=ServerInfo("scripted", "0"),
        features={},
        limits={},
    )


@asynccontextmanager
async def scripted_server(pushes: Sequence[ServerMessage]) -> AsyncIterator[str]:
    """A server that welcomes, answers ``ping`` after sending ``pushes``, and answers
    ``job.get`` with ``not_found`` (naming the job)."""

    async def handle(request: WebSocketRequest) -> None:
        ws = await request.accept()
        with suppress(ConnectionClosed):  # the client closes when its test is done
            assert isinstance(decode_client(await ws.get_message()), Hello)
            await ws.send_message(encode(welcome()))
            while True:
                message = decode_client(await ws.get_message())
                if isinstance(message, Ping):
                    for push in pushes:
                        await ws.send_message(encode(push))
                    await ws.send_message(encode(Pong(id=message.id)))
                elif isinstance(message, JobGet):
                    error = ErrorMessage(message.id, "not_found", "no such job", job_id=message.job_id)
                    await ws.send_message(encode(error))

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handle, "127.0.0.1", 0, None)
        yield f"ws://127.0.0.1:{server.port}/v1"
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_transport(url: str) -> AsyncIterator[Transport]:
    settings = ConnectSettings(
        url,
        "tok",
        client_name="test",
        token_in_header=False,
        request_timeout=10,
        connect_timeout=10,
        reconnect_base=0.1,
        reconnect_max=1,
        max_reconnect_attempts=2,
    )
    async with trio.open_nursery() as nursery:
        transport = Transport(nursery, settings)
        await transport.open()
        try:
            yield transport
        finally:
            await transport.aclose()
            nursery.cancel_scope.cancel()


def batch(job_id: str, seq: int) -> JobEvents:
    return JobEvents(job_id=job_id, epoch=1, from_seq=seq, to_seq=seq, events=[TextEvent(seq, "x")])


def drain(channel: trio.MemoryReceiveChannel[WatchItem]) -> list[WatchItem]:
    """What ``channel`` holds now, and that it is closed (raises ``WouldBlock`` if still open)."""
    items: list[WatchItem] = []
    while True:
        try:
            items.append(channel.receive_nowait())
        except trio.EndOfChannel:
            return items


async def test_each_watch_gets_its_batches_and_only_the_error_that_names_it(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    ended = ErrorMessage(None, "gone", "watch of j2 ended: the log is no longer kept", job_id="j2")
    stray = ErrorMessage(None, "internal", "something without a job")
    pushes = [batch("j1", 1), batch("j2", 1), ended, batch("j2", 2), stray, batch("j1", 2)]
    caplog.set_level(logging.WARNING, logger="backstream.client")
    async with scripted_server(pushes) as url, open_transport(url) as transport:
        session = await transport.session()
        channels = {}
        for job_id in ("j1", "j2"):
            send, channels[job_id] = trio.open_memory_channel[WatchItem](8)
            session.watches[job_id] = send
        await transport.request(Ping(id=transport.next_id()), Pong)
        assert drain(channels["j2"]) == [batch("j2", 1), ended]  # closed after its error
        assert "j2" not in session.watches  # its batch after the error went nowhere
        assert "j1" in session.watches
        assert [channels["j1"].receive_nowait() for _ in range(2)] == [batch("j1", 1), batch("j1", 2)]
        assert [r.getMessage() for r in caplog.records] == ["server error: internal: something without a job"]
        assert transport.reconnects == 0 and not session.closed.is_set()


async def test_a_request_error_raises_typed_and_notifications_keep_the_newest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    notes = [
        NotificationPush(
            Notification(
                f"n{i}", "ai.message.received", "j1", "t", "title", "body", "2026-01-01T00:00:00Z", False
            )
        )
        for i in range(INBOX_SIZE + 3)
    ]
    async with scripted_server(notes) as url, open_transport(url) as transport:
        with pytest.raises(NotFoundError, match="no such job"):
            await transport.request(JobGet(id=transport.next_id(), job_id="j_x"), object)
        await transport.request(Ping(id=transport.next_id()), Pong)
        kept = [(await transport.next_notification()).notification_id for _ in range(INBOX_SIZE)]
        assert kept == [f"n{i}" for i in range(3, INBOX_SIZE + 3)]  # the oldest three dropped
        with trio.move_on_after(1) as waited:
            await transport.next_notification()
        assert waited.cancelled_caught  # nothing more
