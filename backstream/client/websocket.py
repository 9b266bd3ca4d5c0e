"""Opening the client's WebSocket, offering permessage-deflate.

trio-websocket's ``connect_websocket_url`` offers no extensions; this is the same, but its
opening request may offer wsproto's ``PerMessageDeflate``. A server that accepts it sends
compressed frames (a backstream server's compression uses a window of 1 KiB to 32 KiB, and
asks the client to compress each message on its own: the client holds no compressor
between requests). A server that does not just answers without it.

It sets the opening request of a connection before its reader task sends it (the library's
``_initial_request``), so pyproject.toml's pin of trio-websocket's minor version covers it.
"""

from __future__ import annotations

import dataclasses
import ssl
import urllib.parse

import trio
from trio_websocket import WebSocketConnection
from wsproto import ConnectionType, WSConnection
from wsproto.extensions import PerMessageDeflate

__all__ = ["connect_websocket_url"]

CLIENT_WINDOW_BITS = 15
"""The window the client's inflater accepts from the server (the server picks its own, at most this)."""


async def connect_websocket_url(
    nursery: trio.Nursery,
    url: str,
    *,
    ssl_context: ssl.SSLContext | None,
    extra_headers: list[tuple[bytes, bytes]] | None,
    message_queue_size: int,
    max_message_size: int,
    deflate: bool,
) -> WebSocketConnection:
    """An open client connection to ``url`` (``ws://`` or ``wss://``), its reader task in
    ``nursery``; with ``deflate``, permessage-deflate is offered.

    Raises as trio-websocket's ``connect_websocket_url`` does (``OSError``,
    ``ConnectionRejected``, ``HandshakeError``). Cancellation: nothing is left open but
    what ``nursery`` owns."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or parts.hostname is None:
        raise ValueError(f"{url!r} is not a ws:// or wss:// URL")
    secure = parts.scheme == "wss"
    if not secure and ssl_context is not None:
        raise ValueError("an SSL context needs a wss:// URL")
    host = parts.hostname
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    stream: trio.SSLStream[trio.SocketStream] | trio.SocketStream
    if secure:
        context = ssl_context or ssl.create_default_context()
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=context, https_compatible=True)
    else:
        stream = await trio.open_tcp_stream(host, port)
    connection = WebSocketConnection(
        stream,
        WSConnection(ConnectionType.CLIENT),
        host=host if port in (80, 443) else f"{host}:{port}",
        path=resource,
        client_extra_headers=extra_headers,
        message_queue_size=message_queue_size,
        max_message_size=max_message_size,
    )
    if deflate:
        request = connection._initial_request
        assert request is not None
        offer = PerMessageDeflate(client_max_window_bits=CLIENT_WINDOW_BITS, client_no_context_takeover=True)
        connection._initial_request = dataclasses.replace(request, extensions=[offer])
    nursery.start_soon(connection._reader_task)
    await connection._open_handshake.wait()
    return connection
