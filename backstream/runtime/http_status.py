"""A small HTTP/1.1 server (h11) for ``/healthz``, ``/readyz``, ``/metrics`` and static files."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial

import h11
import trio

from backstream.runtime.web_assets import Asset

__all__ = ["Route", "serve_status"]

log = logging.getLogger("backstream.http")

Route = Callable[[], Awaitable[tuple[int, str, bytes]]]
"""Returns (status, content type, body)."""
Assets = Callable[[str], Asset | None]
"""Static files by path, for the paths that are not routes."""

_REQUEST_TIMEOUT = 10.0
_MAX_REQUEST_BYTES = 16 * 1024


async def serve_status(
    routes: dict[str, Route],
    host: str,
    port: int,
    *,
    assets: Assets = lambda _path: None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` and ``assets`` (GET only) until cancelled. Reports the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(trio.serve_listeners, partial(_handle, routes, assets), listeners))
        task_status.started(bound)


async def _handle(routes: dict[str, Route], assets: Assets, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_BYTES)
    with trio.move_on_after(_REQUEST_TIMEOUT):
        try:
            request = await _read_request(conn, stream)
            if request is None:
                return
            target = request.target.decode("latin-1").split("?", 1)[0]
            route = routes.get(target)
            asset = assets(target) if route is None else None
            extra: tuple[tuple[str, str], ...] = ()
            if request.method not in (b"GET", b"HEAD"):
                status, kind, body = 405, "text/plain", b"method not allowed\n"
            elif asset is not None:
                status, kind, body, extra = 200, asset.content_type, asset.body, asset.headers
            elif route is None:
                status, kind, body = 404, "text/plain", b"not found\n"
            else:
                try:
                    status, kind, body = await route()
                except Exception:
                    log.exception("status route %s failed", target)
                    status, kind, body = 500, "text/plain", b"internal error\n"
            headers = [("content-type", kind), ("content-length", str(len(body))), ("connection", "close")]
            headers += extra
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
            if request.method != b"HEAD":
                await stream.send_all(conn.send(h11.Data(data=body)) or b"")
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    with trio.move_on_after(1):
        await stream.aclose()


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            conn.receive_data(data)
            if not data and conn.their_state is not h11.SEND_BODY:
                return None
            continue
        if isinstance(event, h11.Request):
            return event
        return None
