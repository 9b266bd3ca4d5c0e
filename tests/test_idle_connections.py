"""What an idle connection holds no task for. Keep-alive: the front door's one ``Heartbeat``
pings every connection each interval after its last pong; one that answers stays open, one
that stops answering is closed after the idle timeout, and the heap holds at most
``timeout / interval + 1`` entries per connection. Notifications: they wait in a bounded
list, and a task pushes them only while some wait."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage

from backstream.runtime.server.connection import ConnectionLimits
from tests.ws_helpers import served

HELLO = json.dumps({"type": "hello", "id": "h", "protocol": 1, "token": "tok-alice"})


class PingCounter:
    """A bare wsproto client that says hello, counts pings and answers them while ``answering``."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pings: list[float] = []
        self.answering = True
        self.closed: CloseConnection | None = None

    async def run(self, port: int) -> None:
        await self.stream.send_all(self.ws.send(Request(host="127.0.0.1", target="/v1")))
        while self.closed is None:
            self.ws.receive_data(await self.stream.receive_some(65536) or None)
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    await self.stream.send_all(self.ws.send(TextMessage(data=HELLO)))
                elif isinstance(event, Ping):
                    self.pings.append(trio.current_time())
                    if self.answering:
                        await self.stream.send_all(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    self.closed = event


async def test_connections_that_answer_stay_open_and_one_that_stops_is_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = ConnectionLimits(ping_interval=5, idle_timeout=10, max_connections_per_user=100)
    async with served(limits=limits) as srv, trio.open_nursery() as nursery:
        clients = [PingCounter(await trio.open_tcp_stream("127.0.0.1", srv.door.port)) for _ in range(50)]
        t0 = trio.current_time()
        for client in clients:
            nursery.start_soon(client.run, srv.door.port)
        await trio.sleep(52)
        # A ping 5 s after each pong: ten in 52 s, every connection still open.
        assert [(len(c.pings), c.closed) for c in clients] == [(10, None)] * 50
        assert all(c.closed is None for c in clients)
        assert len(srv.door.connections) == 50
        assert len(srv.door._heartbeat) <= (10 / 5 + 1) * 50  # stale deadlines wait their turn
        quiet = clients[0]
        quiet.answering = False
        last_ping = quiet.pings[-1]
        await trio.sleep(20)
        assert quiet.closed is not None and quiet.closed.code == 1000
        assert "pong" in (quiet.closed.reason or "")
        # Its next ping came 5 s after its last pong; the close 10 s after that ping.
        assert quiet.pings[-1] - last_ping == 5
        assert all(c.closed is None for c in clients[1:])
        assert len(srv.door.connections) == 49
        assert t0 < last_ping
        nursery.cancel_scope.cancel()


async def test_notifications_wait_in_a_bounded_list_and_one_task_pushes_them_in_order() -> None:
    from backstream.actors.notifier import SUBSCRIBER_BUFFER
    from backstream.protocol.records import NotificationRecord
    from backstream.runtime.server.connection import _NotificationPusher

    pushed: list[str] = []
    release = trio.Event()
    running = 0

    async def push(record: NotificationRecord) -> bool:
        nonlocal running
        running += 1
        assert running == 1  # one pushing task at a time
        await release.wait()
        pushed.append(record.notification_id)
        running -= 1
        return True

    def record(i: int) -> NotificationRecord:
        return NotificationRecord(
            notification_id=f"n{i}", user="alice", type="ai.message.received", job_id="j", thread_id="t",
            title="done", body="", created_at=0.0,
        )  # fmt: skip

    async with trio.open_nursery() as nursery:
        pusher = _NotificationPusher(nursery, push)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(SUBSCRIBER_BUFFER + 1):  # one being pushed, the buffer full behind it
            pusher.send_nowait(record(i))
            await trio.testing.wait_all_tasks_blocked()
        try:
            pusher.send_nowait(record(999))
        except trio.WouldBlock:
            dropped = True
        else:
            dropped = False
        assert dropped
        release.set()
        await trio.testing.wait_all_tasks_blocked()
    assert pushed == [f"n{i}" for i in range(SUBSCRIBER_BUFFER + 1)]


async def test_a_ping_due_on_a_connection_closing_meanwhile_raises_nothing_past_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from trio_websocket import ConnectionClosed, open_websocket_url

    from backstream.runtime.server.websocket import ServerWebSocket

    async with served() as srv:
        async with open_websocket_url(srv.url) as client:
            await client.send_message(HELLO)
            await client.get_message()
            (connection,) = srv.door.connections
            ws = connection._ws
            assert isinstance(ws, ServerWebSocket)
            beat = srv.door._heartbeat.add(ws, connection.close_soon)  # a second beat, kept after the close
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(ConnectionClosed):
            await ws.send_ping()
        await srv.door._heartbeat._ping(beat)  # what the heartbeat does: nothing escapes
