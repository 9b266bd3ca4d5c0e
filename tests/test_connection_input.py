"""Input a client sends that the server must refuse cheaply and clearly."""

from __future__ import annotations

import json
import os
import socket
import struct

import trio

from backstream.protocol.codec import peek_request_id
from backstream.runtime.server.connection import ConnectionLimits
from tests.ws_helpers import raw_client, served


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, final WebSocket frame, built by hand (no library would send bad UTF-8)."""
    mask = os.urandom(4)
    size = len(payload)
    length = bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + struct.pack(">H", size)
    return bytes([0x80 | opcode]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _read_frame(sock: socket.socket) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed without a frame")
            data += chunk
        return data

    first, second = exactly(2)
    size = second & 0x7F
    if size == 126:
        size = struct.unpack(">H", exactly(2))[0]
    elif size == 127:
        size = struct.unpack(">Q", exactly(8))[0]
    return first & 0x0F, exactly(size)


def _invalid_utf8_close_code(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"GET /v1 HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        response = b""
        while b"\r\n\r\n" not in response:
            response += sock.recv(1024)
        assert response.startswith(b"HTTP/1.1 101")
        hello = {"type": "hello", "id": "h", "protocol": 1, "token": "tok-alice"}
        sock.sendall(_client_frame(0x1, json.dumps(hello).encode()))
        opcode, payload = _read_frame(sock)
        assert opcode == 0x1 and json.loads(payload)["type"] == "welcome"
        sock.sendall(_client_frame(0x1, b'{"type":"ping","id":"\xff\xfe"}'))
        opcode, payload = _read_frame(sock)
        assert opcode == 0x8, "expected a close frame"
        return int(struct.unpack(">H", payload[:2])[0])


async def test_invalid_utf8_gets_close_code_1007() -> None:
    async with served() as srv:
        code = await trio.to_thread.run_sync(_invalid_utf8_close_code, srv.door.port)
    assert code == 1007


async def test_the_rate_limit_is_charged_before_decoding(autojump_clock: trio.testing.MockClock) -> None:
    limits = ConnectionLimits(rate_per_s=1, rate_burst=5, abuse_limit=1000)
    deep = '{"type":"ping","id":"d","x":' + "[" * 100 + "]" * 100 + "}"  # refused by the depth scan
    async with served(limits=limits) as srv, raw_client(srv.url) as c:
        await c.hello()
        for _ in range(8):
            await c.send(deep)
        replies = [await c.recv() for _ in range(8)]
    codes = [r.get("code", r["type"]) for r in replies]
    # Past the burst, the scan and the decoding are not even tried.
    assert codes == ["bad_request"] * 5 + ["rate_limited"] * 3
    assert all(r["id"] == "d" for r in replies)  # the refusal still names the request


def test_peek_request_id_reads_only_top_level_fields() -> None:
    assert peek_request_id('{"type":"ping","id":"r1"}') == "r1"
    assert peek_request_id('{"id" : "r2", "messages": [{"id": "inner"}]}') == "r2"
    assert peek_request_id('{"messages": [{"id": "inner"}], "id": "late"}') is None
    assert peek_request_id('{"id": "' + "x" * 65 + '"}') is None
    assert peek_request_id(b'{"id": "r3"}') is None
