"""A real HTTP receiver of webhooks for the tests (and the bench): trio + h11 on loopback.

It records every request it answers (headers and body), answers with ``status`` (or the
next of ``statuses``), can hang without answering, and can be stopped and started again
on the same port (a receiver that is down refuses connections).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any

import attrs
import h11
import trio


@attrs.define
class Received:
    headers: dict[str, str]
    body: bytes
    at: float
    """trio.current_time() when it was read."""


@attrs.define
class Receiver:
    port: int
    status: int = 200
    statuses: list[int] = attrs.field(factory=list)
    """Answered first, one each, before ``status``."""
    hang: bool = False
    """Read the request, never answer (until the connection is cut)."""
    delay: float = 0.0
    received: list[Received] = attrs.field(factory=list)
    connections_open: int = 0
    on_request: Callable[[Received], None] | None = None
    ssl_context: ssl.SSLContext | None = None
    """Serve https:// with it."""
    _scope: trio.CancelScope | None = None
    arrived: trio.Event = attrs.field(factory=trio.Event)

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}/hook"

    def ids(self) -> list[str]:
        return [r.headers["webhook-id"] for r in self.received]

    async def start(self, nursery: trio.Nursery) -> None:
        """Listen (again) on ``port``."""
        self._scope = await nursery.start(self._serve)

    def stop(self) -> None:
        """Close the listener and every connection: from now on, connections are refused."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        with trio.fail_after(timeout):
            while len(self.received) < count:
                self.arrived = trio.Event()
                await self.arrived.wait()

    async def _serve(self, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            listeners: list[Any] = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            if self.ssl_context is not None:
                listeners = [trio.SSLListener(lst, self.ssl_context) for lst in listeners]
            async with trio.open_nursery() as nursery:
                task_status.started(scope)
                await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)

    async def _connection(self, stream: Any) -> None:
        self.connections_open += 1
        conn = h11.Connection(h11.SERVER)
        try:
            async with stream:
                while True:
                    request, body = await _read_request(conn, stream)
                    if request is None:
                        return
                    got = Received(
                        {k.decode().lower(): v.decode() for k, v in request.headers},
                        body,
                        trio.current_time(),
                    )
                    if self.hang:
                        await trio.sleep_forever()
                    if self.delay:
                        await trio.sleep(self.delay)
                    self.received.append(got)
                    self.arrived.set()
                    if self.on_request is not None:
                        self.on_request(got)
                    status = self.statuses.pop(0) if self.statuses else self.status
                    headers = [("content-length", "2"), ("content-type", "text/plain")]
                    if 300 <= status < 400:
                        headers.append(("location", "http://127.0.0.1:1/elsewhere"))
                    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
                    await stream.send_all(conn.send(h11.Data(data=b"ok")))
                    await stream.send_all(conn.send(h11.EndOfMessage()))
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            return
        finally:
            self.connections_open -= 1


async def _read_request(conn: h11.Connection, stream: Any) -> tuple[h11.Request | None, bytes]:
    request: h11.Request | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            if not data and request is None:
                return None, b""
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return request, body
        elif isinstance(event, h11.ConnectionClosed):
            return None, b""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def open_receiver(nursery: trio.Nursery, **kw: object) -> Receiver:
    receiver = Receiver(free_port(), **kw)  # type: ignore[arg-type]
    await receiver.start(nursery)
    return receiver
