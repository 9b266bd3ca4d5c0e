"""The Python client's connections: one that breaks while closing ends alone.

A server's keep-alive ping can cross the client's close frame on the wire. trio-websocket
then answers the ping in a state where wsproto forbids it (``LocalProtocolError``, raised
in trio-websocket's reader task). That must end this one connection, whose watches resume
on a new one, not the whole client.

The server is the real front door; between it and the client sits a TCP proxy that,
when it sees the client's close frame, first sends the client a ping as if from the server
(or, in one test, instead keeps the close from the server, which then never answers it).
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import pytest
import trio
import trio.testing

from backstream.client import CLOSE_TIMEOUT, Client, open_client
from tests.ws_helpers import served

PING = b"\x89\x04ping"  # FIN + ping, unmasked (server to client), 4-byte payload
CLOSE_OPCODE = 0x8


def take_frames(buffer: bytearray) -> list[bytes]:
    """The whole WebSocket frames at the front of ``buffer``, removed from it."""
    frames: list[bytes] = []
    while len(buffer) >= 2:
        length, head = buffer[1] & 0x7F, 2
        if length == 126:
            length, head = int.from_bytes(buffer[2:4], "big"), 4
        elif length == 127:
            length, head = int.from_bytes(buffer[2:10], "big"), 10
        head += 4 if buffer[1] & 0x80 else 0  # the client's masking key
        if len(buffer) < head + length:
            break
        frames.append(bytes(buffer[: head + length]))
        del buffer[: head + length]
    return frames


class CloseTrap:
    """A loopback TCP proxy to ``upstream_port`` that acts when the client sends a close frame:
    it sends the client a ping first, then passes the close on; with ``swallow_close`` it
    keeps the close frame from the server instead."""

    def __init__(self, upstream_port: int, *, swallow_close: bool = False) -> None:
        self.upstream_port = upstream_port
        self.swallow_close = swallow_close
        self.port = 0
        self.pings = 0
        self.closes = 0
        self.connections = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        self.connections += 1
        to_client = trio.StrictFIFOLock()  # whole frames only: a ping never lands inside one
        async with client, await trio.open_tcp_stream("127.0.0.1", self.upstream_port) as server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, server, client, to_client, False, nursery.cancel_scope)
                nursery.start_soon(self._pump, client, server, to_client, True, nursery.cancel_scope)

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        to_client: trio.StrictFIFOLock,
        from_client: bool,
        done: trio.CancelScope,
    ) -> None:
        client = source if from_client else sink
        buffer, in_head = bytearray(), True
        try:
            async for chunk in source:
                buffer += chunk
                if in_head:  # the HTTP upgrade request or response passes as it is
                    end = buffer.find(b"\r\n\r\n")
                    if end < 0:
                        continue
                    await self._send(sink, bytes(buffer[: end + 4]), None if from_client else to_client)
                    del buffer[: end + 4]
                    in_head = False
                for frame in take_frames(buffer):
                    if from_client and frame[0] & 0x0F == CLOSE_OPCODE:
                        self.closes += 1
                        if self.swallow_close:
                            continue
                        await self._send(client, PING, to_client)
                        self.pings += 1
                    await self._send(sink, frame, None if from_client else to_client)
        except trio.BrokenResourceError:
            pass
        finally:
            done.cancel()

    @staticmethod
    async def _send(sink: trio.SocketStream, data: bytes, lock: trio.StrictFIFOLock | None) -> None:
        if lock is None:
            await sink.send_all(data)
            return
        async with lock:
            await sink.send_all(data)


async def start_lorem(client: Client, message_id: str, max_tokens: int = 200) -> str:
    started = await client.start_job(
        thread_id="t",
        message_id=message_id,
        model="backstream/lorem",
        messages=[{"role": "user", "content": "x"}],
        params={"max_tokens": max_tokens, "tokens_per_s": 100},
    )
    return started.job.job_id


async def watch_all(client: Client, job_id: str, seen: dict[str, Any], drop_after: int | None) -> None:
    """Collect the job's batches; past ``drop_after`` drop the connection (once)."""
    seqs, text = [], ""
    async with client.watch(job_id) as batches:
        async for batch in batches:
            seqs.append((batch.from_seq, batch.to_seq))
            text += batch.text
            if drop_after is not None and batch.to_seq > drop_after:
                drop_after = None
                with trio.fail_after(3 * CLOSE_TIMEOUT):  # bounded, however the close goes
                    await client.drop_connection()
    seen[job_id] = (seqs, text)


async def check_whole(client: Client, seen: dict[str, Any]) -> None:
    for job_id, (seqs, text) in seen.items():
        assert seqs[0][0] == 1 and all(b[0] == a[1] + 1 for a, b in itertools.pairwise(seqs))
        info = await client.get(job_id, include_content=True)
        assert info.content == text and info.job.status == "completed"


async def test_a_ping_crossing_the_clients_close_ends_that_connection_only(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="backstream.client")
    async with served() as srv, trio.open_nursery() as nursery:
        trap = CloseTrap(srv.door.port)
        await nursery.start(trap.run)
        async with open_client(trap.url, "tok-alice") as client:
            jobs = [await start_lorem(client, f"m{i}") for i in range(2)]
            seen: dict[str, Any] = {}
            async with trio.open_nursery() as watches:  # two watches share the connection
                watches.start_soon(watch_all, client, jobs[0], seen, 50)
                watches.start_soon(watch_all, client, jobs[1], seen, None)
            assert trap.pings == 1 and trap.connections == 2 and client.reconnects == 1
            assert "LocalProtocolError" in caplog.text  # the ping did break the closing connection
            await check_whole(client, seen)  # both watches resumed: no gap, no repeat
        nursery.cancel_scope.cancel()


async def test_closing_the_client_while_a_ping_crosses_its_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with served() as srv, trio.open_nursery() as nursery:
        trap = CloseTrap(srv.door.port)
        await nursery.start(trap.run)
        with trio.fail_after(3 * CLOSE_TIMEOUT):
            async with open_client(trap.url, "tok-alice") as client:
                await client.ping()
        assert trap.pings == 1
        nursery.cancel_scope.cancel()


async def test_a_close_the_server_never_answers_is_given_up_after_a_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with served() as srv, trio.open_nursery() as nursery:
        trap = CloseTrap(srv.door.port, swallow_close=True)
        await nursery.start(trap.run)
        async with open_client(trap.url, "tok-alice") as client:
            job_id = await start_lorem(client, "m1")
            seen: dict[str, Any] = {}
            await watch_all(client, job_id, seen, 50)
            assert trap.closes == 1 and trap.pings == 0 and client.reconnects == 1
            await check_whole(client, seen)
        nursery.cancel_scope.cancel()
