"""The server's direct send path: frames written straight to the socket, and what did not fit.

A real trio-websocket client over loopback; the server side is ``WebSocketServer``
with its ``ServerWebSocket`` connections, as the front door runs it.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, open_websocket_url

from backstream.runtime.server.websocket import ServerWebSocket, send_text
from backstream.runtime.server.wsserver import HandshakeRequest, WebSocketServer

Handler = Callable[[ServerWebSocket], Awaitable[None]]


@asynccontextmanager
async def served(handler: Handler) -> AsyncIterator[str]:
    """A server that runs ``handler`` on each accepted connection; yields its URL."""

    async def accept(request: HandshakeRequest) -> None:
        ws = await request.accept()
        assert isinstance(ws, ServerWebSocket)
        await handler(ws)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    for listener in listeners:  # a small send buffer: big frames cannot go at once
        listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    async with trio.open_nursery() as nursery:
        server = WebSocketServer(accept, listeners, handler_nursery=nursery, max_message_size=2**24)
        await nursery.start(server.run)
        port = listeners[0].socket.getsockname()[1]
        yield f"ws://127.0.0.1:{port}/"
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def silent_client(url: str) -> AsyncIterator[trio.SocketStream]:
    """A WebSocket client that completes the handshake, then reads nothing, with a small
    receive buffer fixed before it connects (the kernel would otherwise grow it to tens of
    MB on loopback and take a big frame whole)."""
    port = int(url.rsplit(":", 1)[1].strip("/"))
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(1)  # the handshake's answer, not a byte more
    assert head.startswith(b"HTTP/1.1 101")
    try:
        yield stream
    finally:
        await stream.aclose()


def frame(i: int) -> str:
    # Sizes from a few bytes to 400 KB: most fit in the buffer, some cannot.
    return f"{i:05d}:" + "x" * (i * 7919 % 400_000 if i % 5 == 0 else i % 97)


async def test_frames_from_concurrent_senders_arrive_whole_and_in_each_senders_order() -> None:
    sent_all = trio.Event()

    async def handler(ws: ServerWebSocket) -> None:
        async def sender(first: int) -> None:
            for i in range(first, 200, 2):
                assert await send_text(ws, frame(i), 30)

        async with trio.open_nursery() as nursery:  # two tasks share the connection
            nursery.start_soon(sender, 0)
            nursery.start_soon(sender, 1)
        sent_all.set()
        with pytest.raises(ConnectionClosed):  # the handler reads: the client's close ends it
            await ws.get_message()

    async with served(handler) as url, open_websocket_url(url, max_message_size=2**24) as client:
        got = []
        for _ in range(200):
            got.append(await client.get_message())
            if len(got) % 10 == 0:
                await trio.sleep(0.01)  # a client a little slower than the server
        await sent_all.wait()
    assert sorted(got) == sorted(frame(i) for i in range(200))  # whole: not one byte lost or mixed
    for parity in (0, 1):
        mine = [m for m in got if int(str(m)[:5]) % 2 == parity]
        assert mine == [frame(i) for i in range(parity, 200, 2)]


async def test_a_frame_the_socket_cannot_take_waits_for_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    outcomes: list[bool] = []
    done = trio.Event()

    async def handler(ws: ServerWebSocket) -> None:
        t0 = trio.current_time()
        big = "y" * 4_000_000  # more than both sockets' buffers hold
        outcomes.append(await send_text(ws, big, 5))
        outcomes.append(4.99 < trio.current_time() - t0 < 6)
        done.set()

    async with served(handler) as url, silent_client(url):
        await done.wait()  # the client reads nothing
    assert outcomes == [False, True]


async def test_sending_on_a_closed_connection_raises_and_writes_nothing() -> None:
    result: list[str] = []

    async def handler(ws: ServerWebSocket) -> None:
        with trio.fail_after(5), pytest.raises(ConnectionClosed):
            await ws.get_message()  # the client's close, read by the handler
        assert ws.closed is not None
        with pytest.raises(ConnectionClosed):
            ws.try_send_message("after the close")
        result.append("raised")

    async with served(handler) as url:
        async with open_websocket_url(url):
            pass
        with trio.fail_after(5):
            while not result:
                await trio.sleep(0.01)
    assert result == ["raised"]
