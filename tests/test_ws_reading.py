"""The server's connection is read by the task that serves it: no reader task, no queue.

A wsproto client over loopback talks to ``WebSocketServer``; what it sends arrives in the
handler's ``get_message``, pings and the client's close are answered on the way there.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Event, Ping, Pong, Request, TextMessage

from backstream.runtime.server.websocket import ServerWebSocket
from backstream.runtime.server.wsserver import HandshakeRequest, WebSocketServer

Handler = Callable[[ServerWebSocket], Awaitable[None]]


@asynccontextmanager
async def served(handler: Handler, **settings: Any) -> AsyncIterator[int]:
    """A server that accepts every handshake and runs ``handler``; yields its port."""

    async def accept(request: HandshakeRequest) -> None:
        await handler(await request.accept())

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        server = WebSocketServer(
            accept, listeners, handler_nursery=nursery, max_message_size=1024, **settings
        )
        await nursery.start(server.run)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)

    @classmethod
    async def open(cls, port: int, *, then: list[Event] | None = None) -> Client:
        """Connect; ``then``: frames sent in the same write as the handshake's request."""
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        data = client.ws.send(Request(host="127.0.0.1", target="/"))
        await client.stream.send_all(data)
        assert isinstance(await client.next_event(), AcceptConnection)
        for event in then or []:
            await client.send(event)
        return client

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next_event(self) -> Event | None:
        """The next event; None once the server closed the TCP connection."""
        with trio.fail_after(10):
            while True:
                for event in self.ws.events():
                    return event
                data = await self.stream.receive_some(65536)
                if not data:
                    return None
                self.ws.receive_data(data)


async def test_messages_pings_and_the_close_reach_the_reading_task_in_order() -> None:
    got: list[str | bytes] = []
    ended = trio.Event()

    async def handler(ws: ServerWebSocket) -> None:
        try:
            while True:
                got.append(await ws.get_message())
        except ConnectionClosed as exc:
            assert exc.reason is not None and exc.reason.code == 4000
        ended.set()

    async with served(handler) as port:
        client = await Client.open(port)
        await client.stream.send_all(  # several frames in one write
            client.ws.send(TextMessage(data="one"))
            + client.ws.send(Ping(payload=b"p1"))
            + client.ws.send(TextMessage(data="two", message_finished=False))
            + client.ws.send(TextMessage(data="+three"))
        )
        event = await client.next_event()
        assert isinstance(event, Pong) and event.payload == b"p1"
        await client.send(CloseConnection(code=4000, reason="bye"))
        event = await client.next_event()
        assert isinstance(event, CloseConnection) and event.code == 4000  # the close answered
        assert await client.next_event() is None  # then the server closes the socket
        await ended.wait()
    assert got == ["one", "two+three"]


async def test_a_handler_that_reads_nothing_leaves_the_clients_frames_unread() -> None:
    """Without a reader task, nothing reads the socket until the handler asks for a message."""
    asked = trio.Event()
    got: list[str | bytes] = []

    async def handler(ws: ServerWebSocket) -> None:
        await asked.wait()
        got.append(await ws.get_message())

    async with served(handler) as port:
        client = await Client.open(port)
        await client.send(Ping(payload=b"unanswered"))
        await client.send(TextMessage(data="hello"))
        with trio.move_on_after(0.3):
            event = await client.next_event()
            raise AssertionError(f"nothing is answered before the handler reads: {event}")
        asked.set()
        event = await client.next_event()
        assert isinstance(event, Pong) and event.payload == b"unanswered"
        with trio.fail_after(5):
            while not got:
                await trio.sleep(0.01)
    assert got == ["hello"]


async def test_a_second_reader_is_refused() -> None:
    outcome: list[str] = []

    async def handler(ws: ServerWebSocket) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ws.get_message)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await ws.get_message()
            outcome.append("refused")
            nursery.cancel_scope.cancel()
        await ws.aclose()

    async with served(handler) as port:
        client = await Client.open(port)  # kept open while the handler runs
        with trio.fail_after(5):
            while not outcome:
                await trio.sleep(0.01)
        await client.stream.aclose()
    assert outcome == ["refused"]


async def test_closing_waits_for_the_clients_close_and_drops_its_messages_meanwhile() -> None:
    closed = trio.Event()

    async def handler(ws: ServerWebSocket) -> None:
        await ws.aclose(4001, "done")
        closed.set()

    async with served(handler) as port:
        client = await Client.open(port)
        event = await client.next_event()
        assert isinstance(event, CloseConnection) and event.code == 4001
        assert not closed.is_set()  # the server waits for the client's close
        await client.stream.send_all(client.ws.send(CloseConnection(code=4001)))
        assert await client.next_event() is None
        with trio.fail_after(5):
            await closed.wait()


async def test_a_message_past_the_limit_closes_1009_as_it_arrives() -> None:
    reasons: list[int] = []

    async def handler(ws: ServerWebSocket) -> None:
        try:
            await ws.get_message()
        except ConnectionClosed as exc:
            assert exc.reason is not None
            reasons.append(exc.reason.code)

    async with served(handler) as port:
        client = await Client.open(port)
        await client.send(TextMessage(data="x" * 600, message_finished=False))
        await client.send(TextMessage(data="x" * 600, message_finished=False))  # 1,200 > 1,024
        event = await client.next_event()
        assert isinstance(event, CloseConnection) and event.code == 1009
        with trio.fail_after(5):
            while not reasons:
                await trio.sleep(0.01)
    assert reasons == [1009]


async def test_a_malformed_handshake_is_answered_400_at_once() -> None:
    async def handler(ws: ServerWebSocket) -> None:
        raise AssertionError("never accepted")

    async with served(handler, connect_timeout=60) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # no Upgrade
        answer = b""
        with trio.fail_after(5):  # not after the 60 s the handshake may take
            while chunk := await stream.receive_some(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400")


async def test_a_client_reset_during_the_handshake_ends_only_its_connection() -> None:
    got: list[str | bytes] = []

    async def handler(ws: ServerWebSocket) -> None:
        got.append(await ws.get_message())

    async with served(handler) as port:
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        await sock.send(b"GET / HTTP/1.1\r\nHost: x\r\n")  # half a request, then a reset
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        client = await Client.open(port)  # the server still serves the next one
        await client.send(TextMessage(data="still here"))
        with trio.fail_after(5):
            while not got:
                await trio.sleep(0.01)
        await client.stream.aclose()
    assert got == ["still here"]
