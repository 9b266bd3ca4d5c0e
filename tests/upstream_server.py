"""A real HTTP/1.1 server on loopback that speaks the OpenAI chat-completions stream.

Each request is answered by the next scripted scenario (or the default one).
A scenario is an async function of a ``Reply``; it can stream SSE events,
answer an error status, stall, drop the connection or send malformed bytes.
The server records every request body and notices when a client closes a
connection, so tests can check that an abort really closed it.
"""

from __future__ import annotations

import json
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import attrs
import trio
import trio.lowlevel


def text_chunk(text: str) -> dict[str, Any]:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}}],
    }


def reasoning_chunk(text: str) -> dict[str, Any]:
    return {"id": "c", "choices": [{"index": 0, "delta": {"reasoning": text}}]}


def finish_chunk(reason: str = "stop") -> dict[str, Any]:
    return {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}


def usage_chunk(prompt: int = 3, completion: int = 5) -> dict[str, Any]:
    return {
        "id": "c",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def tool_chunk(
    index: int, *, call_id: str | None = None, name: str | None = None, arguments: str = ""
) -> dict[str, Any]:
    fragment: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id:
        fragment["id"] = call_id
        fragment["type"] = "function"
    if name:
        fragment["function"]["name"] = name
    return {"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [fragment]}}]}


def sse(obj: Any) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj)
    return f"data: {data}\n\n".encode()


class Reply:
    """The server side of one request."""

    def __init__(self, stream: trio.abc.Stream, body: dict[str, Any]) -> None:
        self.stream = stream
        self.body = body
        self._chunked = False
        self.server_closed = False
        """The scenario closed the connection after its response (not the client)."""

    async def start(
        self, status: int = 200, headers: dict[str, str] | None = None, *, version: str = "1.1"
    ) -> None:
        """Send the status line and headers of a ``text/event-stream`` body: chunked, or
        for ``version="1.0"`` without framing (it ends where the connection does)."""
        reason = {
            200: "OK",
            429: "Too Many Requests",
            500: "Internal Server Error",
            502: "Bad Gateway",
            503: "Service Unavailable",
        }.get(status, "Status")
        self._chunked = version == "1.1"
        lines = [f"HTTP/{version} {status} {reason}", "content-type: text/event-stream"]
        lines += ["transfer-encoding: chunked"] if self._chunked else []
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        await self.stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def send(self, data: bytes) -> None:
        """Send body bytes as one HTTP chunk (the client may still see them split or joined)."""
        if data and not self._chunked:
            await self.stream.send_all(data)
        elif data:
            await self.stream.send_all(b"%x\r\n%s\r\n" % (len(data), data))

    async def event(self, obj: Any) -> None:
        await self.send(sse(obj))

    async def end(self) -> None:
        if self._chunked:
            await self.stream.send_all(b"0\r\n\r\n")

    async def close(self) -> None:
        """Close the connection after a complete response, as a server that said so does."""
        self.server_closed = True
        await self.stream.aclose()

    async def error_status(self, status: int, body: str = "", headers: dict[str, str] | None = None) -> None:
        payload = body.encode()
        lines = [
            f"HTTP/1.1 {status} Error",
            "content-type: application/json",
            f"content-length: {len(payload)}",
        ]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        await self.stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)

    async def drop(self) -> None:
        """Close the connection abruptly, mid-response."""
        await self.stream.aclose()


Scenario = Callable[[Reply], Awaitable[None]]


def streams(
    texts: Sequence[str],
    *,
    delay: float = 0.0,
    finish: str | None = "stop",
    usage: bool = True,
    done: bool = True,
    closing: bool = False,
    version: str = "1.1",
    end_after: float = 0.0,
) -> Scenario:
    """Stream ``texts`` as content deltas, ``delay`` seconds apart, then finish. ``closing``:
    answer ``Connection: close`` and close the connection after the response (HTTP/1.0's
    body, never chunked, always ends so). ``end_after``: seconds between ``[DONE]`` and the
    body's end (a client reading up to ``[DONE]`` gets the end in a later read)."""

    async def scenario(reply: Reply) -> None:
        await reply.start(headers={"connection": "close"} if closing else None, version=version)
        for text in texts:
            if delay:
                await trio.sleep(delay)
            await reply.event(text_chunk(text))
        if finish:
            await reply.event(finish_chunk(finish))
        if usage:
            await reply.event(usage_chunk(completion=len(texts)))
        if done:
            await reply.event("[DONE]")
        if end_after:
            await trio.sleep(end_after)
        if closing or version != "1.1":
            reply.server_closed = True  # said so: the client may close first once it has all
            await reply.end()
            await reply.close()
        else:
            await reply.end()

    return scenario


def events(chunks: Sequence[Any], *, delay: float = 0.0) -> Scenario:
    """Stream the given chunk objects (or raw ``str`` data) as SSE events, then end."""

    async def scenario(reply: Reply) -> None:
        await reply.start()
        for chunk in chunks:
            if delay:
                await trio.sleep(delay)
            await reply.event(chunk)
        await reply.end()

    return scenario


def raw(pieces: Sequence[bytes]) -> Scenario:
    """Send exactly these body pieces, each as its own HTTP chunk."""

    async def scenario(reply: Reply) -> None:
        await reply.start()
        for piece in pieces:
            await reply.send(piece)
            await trio.lowlevel.checkpoint()
        await reply.end()

    return scenario


def status(
    code: int, *, body: str = '{"error":{"message":"nope"}}', headers: dict[str, str] | None = None
) -> Scenario:
    async def scenario(reply: Reply) -> None:
        await reply.error_status(code, body, headers)

    return scenario


def stall_after(texts: Sequence[str]) -> Scenario:
    """Send some text, then nothing, forever (until the client goes away)."""

    async def scenario(reply: Reply) -> None:
        await reply.start()
        for text in texts:
            await reply.event(text_chunk(text))
        await trio.sleep_forever()

    return scenario


def stall_before_headers() -> Scenario:
    async def scenario(reply: Reply) -> None:
        await trio.sleep_forever()

    return scenario


def drop_after(texts: Sequence[str]) -> Scenario:
    async def scenario(reply: Reply) -> None:
        if texts:
            await reply.start()
            for text in texts:
                await reply.event(text_chunk(text))
        await reply.drop()

    return scenario


def prefilled(answer: Sequence[str], mode: str, *, instead: Sequence[str] = ()) -> Scenario:
    """Answer ``answer`` (its deltas), or, for a request that ends with an assistant message
    (a prefill), as an upstream of ``mode`` does:

    - ``continue``: the rest of the answer after the prefill (vLLM's ``continue_final_message``);
    - ``echo``: the prefill again, with the next delta, in the first delta (llama.cpp);
    - ``ignore``: a new answer from its start, ``instead`` (a sampled model that ignores it).
    """

    async def scenario(reply: Reply) -> None:
        messages = reply.body.get("messages") or []
        last = messages[-1] if messages else {}
        prefill = last.get("content") if last.get("role") == "assistant" else None
        deltas = list(answer)
        if isinstance(prefill, str):
            whole = "".join(answer)
            assert whole.startswith(prefill), "the prefill is not the start of the answer"
            rest = _after(deltas, len(prefill))
            if mode == "continue":
                deltas = rest
            elif mode == "echo":
                deltas = [prefill + (rest[0] if rest else ""), *rest[1:]]
            else:
                deltas = list(instead)
        await streams(deltas)(reply)

    return scenario


def _after(deltas: list[str], chars: int) -> list[str]:
    """The deltas after the first ``chars`` characters (cutting one in two if it must)."""
    out, at = [], 0
    for delta in deltas:
        if at + len(delta) > chars:
            out.append(delta[max(chars - at, 0) :])
        at += len(delta)
    return out


@attrs.define
class FakeUpstream:
    port: int = 0
    requests: list[dict[str, Any]] = attrs.Factory(list)
    heads: list[tuple[str, dict[str, str]]] = attrs.Factory(list)
    """The request line and headers (names in lower case) of each chat request."""
    scenarios: deque[Scenario] = attrs.Factory(deque)
    default: Scenario = attrs.field(factory=lambda: streams(["Hello", " world"]))
    connections: int = 0
    peers: list[tuple[str, int]] = attrs.Factory(list)
    """The client end (address, port) of each connection."""
    client_closes: int = 0
    client_closed: trio.Event = attrs.Factory(trio.Event)
    request_arrived: trio.Event = attrs.Factory(trio.Event)
    models: list[str] = attrs.Factory(lambda: ["upstream/beta", "upstream/alpha"])
    """What ``GET /models`` lists."""

    url_host: str = "127.0.0.1"
    """How URLs name the host: an address (IPv4 or, in brackets, IPv6) or a name."""

    scheme: str = "http"
    """``https`` when it serves TLS."""

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.url_host}:{self.port}/v1"

    def script(self, *scenarios: Scenario) -> None:
        self.scenarios.extend(scenarios)

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        if isinstance(transport, trio.SocketStream):
            self.peers.append(transport.socket.getpeername()[:2])
        try:
            while True:
                request = await _read_request(stream)
                if request is None:
                    return
                request_line, headers, body = request
                if request_line.startswith("GET ") and request_line.split()[1].endswith("/models"):
                    await _send_json(stream, {"object": "list", "data": [{"id": m} for m in self.models]})
                    continue
                self.requests.append(body)
                self.heads.append((request_line, headers))
                self.request_arrived.set()
                self.request_arrived = trio.Event()
                scenario = self.scenarios.popleft() if self.scenarios else self.default
                reply = Reply(stream, body)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._notice_close, reply, nursery.cancel_scope)
                    try:
                        await scenario(reply)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        if not reply.server_closed:
                            self._closed()
                        return
                    nursery.cancel_scope.cancel()
                if reply.server_closed:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._closed()

    async def _notice_close(self, reply: Reply, scope: trio.CancelScope) -> None:
        # A client that is mid-request sends nothing more; EOF here means it closed.
        try:
            data = await reply.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data and not reply.server_closed:
            self._closed()
            scope.cancel()

    def _closed(self) -> None:
        self.client_closes += 1
        self.client_closed.set()
        self.client_closed = trio.Event()


async def _send_json(stream: trio.abc.Stream, obj: Any) -> None:
    payload = json.dumps(obj).encode()
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
    await stream.send_all(head.encode() + payload)


async def _read_request(stream: trio.abc.Stream) -> tuple[str, dict[str, str], dict[str, Any]] | None:
    """The request line, headers and JSON body ({} without one) of the next request."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    headers: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        data = await stream.receive_some(65536)
        if not data:
            return None
        rest += data
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    return request_line, headers, (json.loads(rest[:length]) if length else {})


async def open_fake_upstream(
    nursery: trio.Nursery,
    host: str = "127.0.0.1",
    url_host: str | None = None,
    *,
    tls: ssl.SSLContext | None = None,
) -> FakeUpstream:
    """The server, listening on a free port of ``host``; over TLS with ``tls``."""
    server = FakeUpstream(url_host=url_host or host, scheme="http" if tls is None else "https")
    if tls is None:
        serve = partial(trio.serve_tcp, server.handle, 0, host=host)
    else:
        serve = partial(trio.serve_ssl_over_tcp, server.handle, 0, tls, host=host, https_compatible=True)
    listeners = await nursery.start(serve)
    port = (listeners[0].transport_listener if tls is not None else listeners[0]).socket.getsockname()[1]
    server.port = port
    return server
