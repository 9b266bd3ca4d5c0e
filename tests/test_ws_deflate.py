"""permessage-deflate on the WebSocket front doors: real clients that offer it (wsproto's,
the Python client's, the ``websockets`` package's) get whole streams compressed within the
server's bounds; clients that do not get plain frames; a compressed frame cannot inflate
past the message limit; an idle connection holds no compressor. The JavaScript client in
Node and Chromium negotiate it in ``clients/js`` (``tests/test_js_client.py`` runs them)."""

from __future__ import annotations

import json
import zlib
from typing import Any

import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason

from backstream.client import open_client
from backstream.runtime.server.connection import ConnectionLimits
from backstream.runtime.server.deflate import BoundedDeflate, DeflateSettings
from backstream.runtime.server.websocket import ServerWebSocket
from tests.ws_helpers import check_contiguous, served, start_fields, text_of

LOREM_400 = {"max_tokens": 400, "tokens_per_s": 400}


class WireClient:
    """A WebSocket client on wsproto over a bare TCP stream that counts the bytes it reads."""

    def __init__(self, stream: trio.SocketStream, offer: PerMessageDeflate | None) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.offer = offer
        self.wire_bytes = 0
        self.bytes_before_batches = 0
        self.agreed: list[Any] = []
        self.closed: CloseConnection | None = None
        self._messages: list[str] = []
        self._parts: list[str] = []

    @classmethod
    async def open(cls, port: int, path: str, offer: PerMessageDeflate | None) -> WireClient:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port), offer)
        request = Request(host=f"127.0.0.1:{port}", target=path, extensions=[offer] if offer else [])
        await client.stream.send_all(client.ws.send(request))
        while True:
            event = await client._next_event()
            if isinstance(event, AcceptConnection):
                client.agreed = list(event.extensions)
                return client

    async def _next_event(self) -> Any:
        while True:
            for event in self.ws.events():
                if isinstance(event, Ping):  # answered as any client's library does
                    await self.stream.send_all(self.ws.send(event.response()))
                    continue
                return event
            data = await self.stream.receive_some(65536)
            self.wire_bytes += len(data)
            self.ws.receive_data(data or None)

    async def send(self, message: dict[str, Any] | str) -> None:
        text = message if isinstance(message, str) else json.dumps(message)
        await self.stream.send_all(self.ws.send(TextMessage(data=text)))

    async def recv(self) -> dict[str, Any]:
        """The next whole message; raises ``EOFError`` once the server closed."""
        with trio.fail_after(60):
            while True:
                event = await self._next_event()
                if isinstance(event, CloseConnection):
                    self.closed = event
                    raise EOFError(event.code)
                if isinstance(event, TextMessage):
                    self._parts.append(event.data)
                    if event.message_finished:
                        text, self._parts = "".join(self._parts), []
                        return json.loads(text)  # type: ignore[no-any-return]

    async def read_for(self, seconds: float) -> None:
        """Read (answering pings) for ``seconds``; nothing else is expected meanwhile."""
        with trio.move_on_after(seconds):
            message = await self.recv()
            raise AssertionError(f"unexpected {message}")

    async def watch_new_job(self, message_id: str) -> list[dict[str, Any]]:
        """hello, start a lorem job watched, and its batches to the end."""
        await self.send({"type": "hello", "id": "h", "protocol": 1, "token": "tok-alice"})
        await self.send(
            {"type": "job.start", "id": "s", **start_fields(message_id, params=LOREM_400), "watch": True}
        )
        batches: list[dict[str, Any]] = []
        while True:
            message = await self.recv()
            if message["type"] == "job.started":
                self.bytes_before_batches = self.wire_bytes  # replies go uncompressed
            if message["type"] == "job.events":
                batches.append(message)
                last = message["events"][-1]
                if last["kind"] == "status" and last["status"] != "running":
                    return batches


def _offer(**kwargs: Any) -> PerMessageDeflate:
    return PerMessageDeflate(**kwargs)


async def test_a_client_offering_deflate_gets_the_whole_stream_compressed_and_one_not_offering_plain(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with served() as srv:
        compressed = await WireClient.open(srv.door.port, "/v1", _offer())
        plain = await WireClient.open(srv.door.port, "/v1", None)
        assert [repr(e) for e in compressed.agreed] == [
            "<PerMessageDeflate client_max_window_bits=10; client_no_context_takeover; "
            "server_max_window_bits=10>"
        ]
        assert plain.agreed == []
        zipped = await compressed.watch_new_job("m1")
        unzipped = await plain.watch_new_job("m2")
        check_contiguous(zipped)
        check_contiguous(unzipped)
        jobs = {b["job_id"] for b in zipped} | {b["job_id"] for b in unzipped}
        contents = [(await srv.runtime.get_job(j, user="alice", include_content=True)).content for j in jobs]
        assert sorted(contents) == sorted([text_of(zipped), text_of(unzipped)])
        assert len(text_of(zipped).split()) == 400
        # The same kind of stream, a fraction of the bytes (the JSON envelope repeats).
        zipped_bytes = compressed.wire_bytes - compressed.bytes_before_batches
        plain_bytes = plain.wire_bytes - plain.bytes_before_batches
        assert zipped_bytes < 0.5 * plain_bytes, (zipped_bytes, plain_bytes)


async def test_the_window_is_bounded_by_the_setting_whatever_the_client_offers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with served(deflate=DeflateSettings(window_bits=12)) as srv:
        wide = await WireClient.open(
            srv.door.port, "/v1", _offer(client_max_window_bits=15, server_max_window_bits=15)
        )
        narrow = await WireClient.open(srv.door.port, "/v1", _offer(server_max_window_bits=9))
        assert [(e.server_max_window_bits, e.client_max_window_bits) for e in wide.agreed] == [(12, 12)]
        assert [(e.server_max_window_bits, e.client_max_window_bits) for e in narrow.agreed] == [(9, 12)]
        for client, message_id in ((wide, "m1"), (narrow, "m2")):
            batches = await client.watch_new_job(message_id)
            check_contiguous(batches)
            assert len(text_of(batches).split()) == 400


async def test_with_deflate_off_an_offer_gets_plain_frames(autojump_clock: trio.testing.MockClock) -> None:
    async with served(deflate=None) as srv:
        client = await WireClient.open(srv.door.port, "/v1", _offer())
        assert client.agreed == []
        batches = await client.watch_new_job("m1")
        check_contiguous(batches)
        assert len(text_of(batches).split()) == 400


async def test_the_python_client_negotiates_deflate_unless_told_not_to(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with served() as srv:
        for compression in (True, False):
            async with open_client(srv.url, "tok-alice", compression=compression) as client:
                started = await client.start_job(
                    thread_id="t", message_id=f"m-{compression}", model="backstream/lorem",
                    messages=[{"role": "user", "content": "hi"}], params=LOREM_400,
                )  # fmt: skip
                text = ""
                async with client.watch(started.job.job_id) as batches:
                    async for batch in batches:
                        text += "".join(e.text for e in batch.events if e.kind == "text")
                info = await client.get(started.job.job_id, include_content=True)
                assert text == info.content and len(text.split()) == 400
                (connection,) = srv.door.connections
                ws = connection._ws
                assert isinstance(ws, ServerWebSocket)
                assert (ws.deflate is not None) is compression


async def test_a_compressed_frame_that_inflates_past_the_limit_closes_1009(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = ConnectionLimits(max_message_bytes=64 * 1024)
    async with served(limits=limits) as srv:
        # The hello, read before authentication, may be 8 KiB: 100 KB of spaces is 100 bytes deflated.
        client = await WireClient.open(srv.door.port, "/v1", _offer())
        await client.send(" " * 100_000)
        with pytest.raises(EOFError):
            await client.recv()
        assert client.closed is not None and client.closed.code == CloseReason.MESSAGE_TOO_BIG
        # After the hello, the message limit holds the same way.
        client = await WireClient.open(srv.door.port, "/v1", _offer())
        await client.send({"type": "hello", "id": "h", "protocol": 1, "token": "tok-alice"})
        assert (await client.recv())["type"] == "welcome"
        await client.send({"type": "ping", "id": "p", "pad": "x" * 60_000})
        assert (await client.recv())["type"] == "pong"  # under the limit, inflated whole
        await client.send({"type": "ping", "id": "p", "pad": "x" * 70_000})
        with pytest.raises(EOFError):
            await client.recv()
        assert client.closed is not None and client.closed.code == CloseReason.MESSAGE_TOO_BIG


async def test_replies_go_plain_and_an_idle_connection_drops_its_compressor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = ConnectionLimits(ping_interval=5.0)
    async with served(limits=limits) as srv:
        client = await WireClient.open(srv.door.port, "/v1", _offer())
        await client.send({"type": "hello", "id": "h", "protocol": 1, "token": "tok-alice"})
        assert (await client.recv())["type"] == "welcome"
        await client.send({"type": "ping", "id": "p1"})
        assert (await client.recv())["type"] == "pong"
        (connection,) = srv.door.connections
        deflate = connection._ws.deflate  # type: ignore[attr-defined]
        assert isinstance(deflate, BoundedDeflate)
        assert not deflate.holds_compressor  # the welcome and the pong went uncompressed
        first = await client.watch_new_job("m1")  # batches compress (hello again: refused, harmless)
        assert len(text_of(first).split()) == 400 and deflate.holds_compressor
        await client.read_for(12.0)  # two looks of the heartbeat, the second with nothing sent
        assert not deflate.holds_compressor
        second = await client.watch_new_job("m2")  # a fresh compressor; the client decodes it
        check_contiguous(second)
        assert len(text_of(second).split()) == 400 and deflate.holds_compressor


@pytest.mark.parametrize(
    ("offer", "agreed"),
    [
        ("permessage-deflate", "client_no_context_takeover"),
        (
            "permessage-deflate; client_max_window_bits",
            "client_no_context_takeover; client_max_window_bits=10",
        ),
        (
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=15",
            "client_no_context_takeover; server_no_context_takeover; server_max_window_bits=10",
        ),
        ("permessage-deflate; server_max_window_bits=8", None),  # zlib cannot
        ("permessage-deflate; server_max_window_bits", None),  # a value is required
        ("permessage-deflate; client_max_window_bits=16", None),
        ("permessage-deflate; x_unknown", None),
        ("permessage-deflate; client_max_window_bits; client_max_window_bits", None),
    ],
)
def test_offers_are_answered_within_the_bounds_or_declined(offer: str, agreed: str | None) -> None:
    extension = BoundedDeflate(DeflateSettings(), lambda: 1024)
    assert extension.accept(offer) == agreed
    assert extension.enabled() is (agreed is not None)
    if agreed is not None:
        assert extension.accept(offer) is None  # a second offer of the same is not taken too


def test_window_bits_out_of_range_are_refused() -> None:
    for bits in (8, 16):
        with pytest.raises(ValueError, match=r"window_bits must be in \[9, 15\]"):
            DeflateSettings(window_bits=bits)
    assert zlib.MAX_WBITS == 15


async def test_the_ai_sdk_endpoint_compresses_for_a_client_that_offers_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from tests.test_ai_sdk_server import send_frame

    words = " ".join(f"word{i}" for i in range(200))
    async with served() as srv:
        for offer in (_offer(), None):
            client = await WireClient.open(srv.door.port, "/v1/ai-sdk?token=tok-alice", offer)
            assert len(client.agreed) == (1 if offer else 0)
            await client.send(send_frame("r1", f"chat-{offer is None}", words))
            deltas = []
            while True:
                frame = await client.recv()
                if frame["type"] == "chunk" and frame["chunk"]["type"] == "text-delta":
                    deltas.append(frame["chunk"]["delta"])
                if frame["type"] in ("end", "error"):
                    break
            assert frame["type"] == "end" and "".join(deltas) == words
