"""The private parts of trio-websocket that ``runtime/server/websocket.py`` builds on.

pyproject.toml pins trio-websocket to one minor version (``>=0.12,<0.13``) because
``ServerWebSocket`` and ``FailingWebSocketServer`` reach into the library: its send
lock, close reason, stream, wsproto connection, abort and send methods, the close-event
and message-event handlers the reader task dispatches to, the message size limit, a
handshake request's connection, and the server's connection handler (copied from 0.12). These tests fail when an installed release moves or changes any of them; then
re-read the library's code, update websocket.py to match, and only then move the pin.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import tomllib
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import trio
import trio.testing
import trio_websocket
from trio_websocket import WebSocketConnection, WebSocketServer
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, Request, TextMessage

from backstream.runtime.server.websocket import (
    FailingWebSocketServer,
    LeanWSConnection,
    ServerWebSocket,
    cap_first_message_of,
)

ROOT = Path(__file__).resolve().parent.parent

# The source of the library methods that websocket.py copies or mirrors, as of 0.12.2.
# ``_handle_connection``: FailingWebSocketServer's copy. ``_send``: UnsentFrame.send's
# model. ``_handle_close_connection_event``: what ServerWebSocket's override calls on.
# ``_reader_task``: dispatches CloseConnection to the method ServerWebSocket overrides.
# ``_handle_message_event``: checks ``_max_message_size``, which ServerWebSocket lowers
# around it for a capped first message.
METHOD_SOURCES = {
    (WebSocketServer, "_handle_connection"): "8410285aa857d6c4",
    (WebSocketConnection, "_send"): "2c6048dd9c0d1f1f",
    (WebSocketConnection, "_handle_close_connection_event"): "6d4c481a35db5699",
    (WebSocketConnection, "_reader_task"): "69826f541cb0278a",
    (WebSocketConnection, "_handle_message_event"): "dac74dc105d7a42e",
    # ServerWebSocket._accept: the library's, with permessage-deflate offered.
    (WebSocketConnection, "_accept"): "f25c53f608884034",
    # The client's connect_websocket_url (backstream/client/websocket.py): the library's, with
    # its opening request's extensions set before the reader task sends it.
    (trio_websocket._impl, "connect_websocket"): "81d287331b80f0f7",
    # ServerWebSocket._handle_pong_event tells the heartbeat, then calls the library's.
    (WebSocketConnection, "_handle_pong_event"): "5e2ece13cfd1e9ba",
    # LeanWSConnection: wsproto asks its handshake only for events once the connection exists.
    (WSConnection, "events"): "d9e36e535855009e",
    (WSConnection, "send"): "f60c7919e13a958e",
}


def _digest(function: Callable[..., Any]) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def test_the_dependency_is_pinned_to_the_installed_minor_version() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in dependencies if re.match(r"trio-websocket\b", d)]
    installed = version("trio-websocket")
    major, minor = (int(part) for part in installed.split(".")[:2])
    assert pins == [f"trio-websocket>={major}.{minor},<{major}.{minor + 1}"]
    assert trio_websocket.__version__ == installed


def test_the_copied_and_mirrored_library_methods_are_unchanged() -> None:
    changed = {
        f"{owner.__name__}.{name}": _digest(getattr(owner, name))
        for (owner, name), digest in METHOD_SOURCES.items()
        if _digest(getattr(owner, name)) != digest
    }
    assert changed == {}, "re-read these methods and update websocket.py (then these digests)"


def test_the_private_methods_used_exist_with_their_signatures() -> None:
    expected = {
        (WebSocketConnection, "_abort_web_socket"): ["self"],
        (WebSocketConnection, "_send"): ["self", "event"],
        (WebSocketConnection, "_handle_close_connection_event"): ["self", "event"],
        (WebSocketConnection, "_reader_task"): ["self"],
        (WebSocketConnection, "_handle_message_event"): ["self", "event"],
        (WebSocketConnection, "_get_request"): ["self"],
        (WebSocketServer, "_handle_connection"): ["self", "stream"],
        (WebSocketConnection, "_accept"): ["self", "request", "subprotocol", "extra_headers"],
    }
    for (owner, name), parameters in expected.items():
        method = getattr(owner, name)
        assert inspect.iscoroutinefunction(method), name
        assert list(inspect.signature(method).parameters) == parameters, name
    # ServerWebSocket passes these on to the library's constructor by name.
    init = inspect.signature(WebSocketConnection.__init__).parameters
    assert list(init)[:3] == ["self", "stream", "ws_connection"]
    for keyword in ("message_queue_size", "max_message_size", "receive_buffer_size"):
        assert init[keyword].kind is inspect.Parameter.KEYWORD_ONLY


def _server_websocket(stream: trio.abc.Stream) -> ServerWebSocket:
    return ServerWebSocket(
        stream,
        WSConnection(ConnectionType.SERVER),
        message_queue_size=1,
        max_message_size=1024,
        receive_buffer_size=4096,
    )


async def test_a_connection_has_the_private_state_used() -> None:
    stream, _peer = trio.testing.memory_stream_pair()
    ws = _server_websocket(stream)
    assert isinstance(ws, WebSocketConnection)
    assert isinstance(ws._stream_lock, trio.StrictFIFOLock)
    assert ws._close_reason is None
    assert ws._stream is stream
    assert isinstance(ws._wsproto, WSConnection)
    assert ws._socket is None  # not a SocketStream: the library's send path
    assert ws._max_message_size == 1024


def test_a_client_connection_holds_its_opening_request_until_the_reader_sends_it() -> None:
    stream, _peer = trio.testing.memory_stream_pair()
    ws = WebSocketConnection(stream, WSConnection(ConnectionType.CLIENT), host="h", path="/v1")
    assert isinstance(ws._initial_request, Request) and ws._initial_request.extensions == []
    assert isinstance(ws._open_handshake, trio.Event)
    assert inspect.iscoroutinefunction(ws._reader_task)


def test_a_lean_connection_lets_go_of_its_handshake_once_accepted_and_still_speaks() -> None:
    server, client = LeanWSConnection(ConnectionType.SERVER), WSConnection(ConnectionType.CLIENT)
    server.receive_data(client.send(Request(host="h", target="/v1")))
    assert [type(e) for e in server.events()] == [Request]
    assert server.handshake._events is not None  # the attribute LeanWSConnection checks
    client.receive_data(server.send(AcceptConnection()))
    assert server.handshake is None and server.state is ConnectionState.OPEN
    assert [type(e) for e in client.events()] == [AcceptConnection]
    server.receive_data(client.send(TextMessage(data="hi")))
    assert [(type(e), e.data) for e in server.events()] == [(TextMessage, "hi")]
    client.receive_data(server.send(TextMessage(data="yes")))
    assert [e.data for e in client.events()] == ["yes"]


def test_a_handshake_request_holds_its_connection() -> None:
    stream, _peer = trio.testing.memory_stream_pair()
    ws = _server_websocket(stream)
    request = trio_websocket.WebSocketRequest(ws, Request(host="h", target="/v1"))
    assert request._connection is ws
    cap_first_message_of(request, 10)
    assert ws._first_message_cap == 10


async def test_a_server_has_the_private_settings_used() -> None:
    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        raise AssertionError("never called")

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        server = FailingWebSocketServer(
            handler,
            listeners,
            message_queue_size=3,
            max_message_size=5,
            receive_buffer_size=7,
            connect_timeout=11.0,
            disconnect_timeout=13.0,
        )
        assert server._handler is handler
        assert (server._message_queue_size, server._max_message_size, server._receive_buffer_size) == (
            3,
            5,
            7,
        )
        assert (server._connect_timeout, server._disconnect_timeout) == (11.0, 13.0)
    finally:
        for listener in listeners:
            await listener.aclose()
