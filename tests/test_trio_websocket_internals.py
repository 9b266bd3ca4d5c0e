"""The private parts of trio-websocket and wsproto that backstream builds on.

pyproject.toml pins trio-websocket to one minor version (``>=0.12,<0.13``) because the
client (``backstream/client/websocket.py``) copies its ``connect_websocket`` and sets a
connection's opening request before the reader task sends it. The server
(``runtime/server/websocket.py``) uses only trio-websocket's public ``ConnectionClosed``,
``CloseReason`` and ``Endpoint``; it is built on wsproto, and ``LeanWSConnection`` reaches into
wsproto's handshake. These tests fail when an installed release moves or changes any of
them; then re-read the library's code, update ours to match, and only then move the pin.
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
import wsproto.connection
from trio_websocket import WebSocketConnection
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from backstream.runtime.server.websocket import LeanWSConnection

ROOT = Path(__file__).resolve().parent.parent

# The source of the library methods our code copies or mirrors, as of trio-websocket 0.12.2
# and wsproto 1.3.
METHOD_SOURCES = {
    # The client's connect_websocket_url (backstream/client/websocket.py): the library's, with
    # its opening request's extensions set before the reader task sends it.
    (trio_websocket._impl, "connect_websocket"): "81d287331b80f0f7",
    # LeanWSConnection: wsproto asks its handshake only for events once the connection exists.
    (WSConnection, "events"): "d9e36e535855009e",
    (WSConnection, "send"): "f60c7919e13a958e",
    # LeanWSConnection swaps the frame connection's pending-event deque for a list: wsproto
    # only appends to it, pops its left end and asks whether it is empty.
    (wsproto.connection.Connection, "__init__"): "2aa4c1439d32bd59",
    (wsproto.connection.Connection, "events"): "e4d77be0bfef1af2",
    (wsproto.connection.Connection, "receive_data"): "046f0bbb05b365e3",
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
    assert list(inspect.signature(WebSocketConnection._reader_task).parameters) == ["self"]
    assert inspect.iscoroutinefunction(WebSocketConnection._reader_task)


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
    assert server.connection is not None and isinstance(server.connection._events, list)
    server.receive_data(None)  # the connection lost: wsproto queues a pending event
    assert [(type(e), getattr(e, "code", None)) for e in server.events()] == [(CloseConnection, 1006)]
