"""gzip on the HTTP listener, read by real clients (httpx, the ``openai`` SDK): event streams
arrive event by event while the job runs, JSON replies arrive whole, and a client that does
not ask (or a server with ``http_gzip`` off) gets plain bodies."""

from __future__ import annotations

import json
import time
import zlib
from typing import Any

import httpx
import pytest

from backstream.runtime.server.http_gzip import GzipStream, accepts_gzip
from tests.test_responses_api import in_thread, served
from tests.upstream_server import FakeUpstream, streams

WORDS = [f"word{i} " for i in range(30)]


def _auth(**more: str) -> dict[str, str]:
    return {"authorization": "Bearer tok-alice", **more}


def _create(base_url: str) -> str:
    answer = httpx.post(
        f"{base_url}/responses",
        json={"model": "gpt-test", "input": "hi", "background": True},
        headers=_auth(),
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["id"])


def _status(base_url: str, response_id: str) -> str:
    reply = httpx.get(f"{base_url}/responses/{response_id}", headers=_auth(), timeout=10)
    return str(reply.json()["status"])


def _read_gzip_stream(base_url: str, response_id: str) -> dict[str, Any]:
    """Read a stream's raw bytes, inflating each read on its own as it comes: what each read
    decoded to, the job's status when the first event had arrived, and the byte counts."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    url = f"{base_url}/responses/{response_id}?stream=true"
    text, raw_bytes, status_at_first = "", 0, None
    with httpx.stream("GET", url, headers=_auth(**{"accept-encoding": "gzip"}), timeout=30) as response:
        assert response.status_code == 200
        headers = dict(response.headers)
        for raw in response.iter_raw():
            raw_bytes += len(raw)
            text += inflater.decompress(raw).decode()
            if status_at_first is None and "\n\n" in text:
                status_at_first = _status(base_url, response_id)
    assert inflater.eof and not inflater.unused_data  # the trailer came: a whole gzip member
    return {"headers": headers, "text": text, "raw_bytes": raw_bytes, "status_at_first": status_at_first}


def _events(sse_text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in sse_text.splitlines() if line.startswith("data: ")]


async def test_a_gzip_event_stream_arrives_event_by_event_while_the_job_runs(upstream: FakeUpstream) -> None:
    upstream.script(streams(WORDS, delay=0.1))  # 3 s
    async with served(upstream) as server:
        response_id = await in_thread(lambda: _create(server.base_url))
        got = await in_thread(lambda: _read_gzip_stream(server.base_url, response_id))
    assert got["headers"]["content-encoding"] == "gzip"
    assert "accept-encoding" in got["headers"]["vary"]
    assert got["status_at_first"] == "in_progress"  # the first event came long before the end
    events = _events(got["text"])
    assert events[-1]["type"] == "response.completed"
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == "".join(WORDS)
    assert got["raw_bytes"] < 0.5 * len(got["text"].encode()), (got["raw_bytes"], len(got["text"]))


def _sdk_stream(base_url: str) -> tuple[dict[str, str], str | None, str]:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="tok-alice", max_retries=0, timeout=30)
    status_at_first, text = None, ""
    with client.responses.with_streaming_response.create(model="gpt-test", input="hi", stream=True) as reply:
        headers = dict(reply.headers)
        for event in reply.parse():
            if status_at_first is None:
                status_at_first = _status(base_url, event.response.id)  # type: ignore[union-attr]
            if event.type == "response.output_text.delta":
                text += event.delta
    return headers, status_at_first, text


async def test_the_openai_sdk_reads_a_gzip_stream_live(upstream: FakeUpstream) -> None:
    upstream.script(streams(WORDS, delay=0.1))
    async with served(upstream) as server:
        headers, status_at_first, text = await in_thread(lambda: _sdk_stream(server.base_url))
    assert "gzip" in httpx.Client().headers["accept-encoding"]  # what the SDK's httpx sends
    assert headers["content-encoding"] == "gzip"
    assert status_at_first == "in_progress"
    assert text == "".join(WORDS)


async def test_json_replies_are_gzipped_for_clients_that_ask_and_plain_for_others(
    upstream: FakeUpstream,
) -> None:
    upstream.script(streams(WORDS))
    async with served(upstream) as server:
        response_id = await in_thread(lambda: _create(server.base_url))
        url = f"{server.base_url}/responses/{response_id}"

        def fetch(encoding: str) -> httpx.Response:
            for _ in range(100):
                reply = httpx.get(url, headers=_auth(**{"accept-encoding": encoding}), timeout=10)
                if reply.json()["status"] == "completed":
                    return reply
                time.sleep(0.05)
            raise AssertionError("the response did not complete")

        zipped = await in_thread(lambda: fetch("gzip"))
        plain = await in_thread(lambda: fetch("identity"))
        refused = await in_thread(lambda: fetch("gzip;q=0, *;q=1"))
    assert zipped.headers["content-encoding"] == "gzip"
    assert int(zipped.headers["content-length"]) < int(plain.headers["content-length"])
    assert zipped.json() == plain.json()  # httpx inflates it
    assert "content-encoding" not in plain.headers and "content-encoding" not in refused.headers
    for reply in (zipped, plain, refused):
        assert reply.headers["vary"] == "accept-encoding"


async def test_with_gzip_off_a_stream_that_asks_is_plain(upstream: FakeUpstream) -> None:
    upstream.script(streams(WORDS[:5]))
    async with served(upstream, http_gzip=False) as server:
        response_id = await in_thread(lambda: _create(server.base_url))

        def read() -> tuple[httpx.Headers, str]:
            url = f"{server.base_url}/responses/{response_id}?stream=true"
            with httpx.stream("GET", url, headers=_auth(**{"accept-encoding": "gzip"}), timeout=30) as r:
                return r.headers, b"".join(r.iter_raw()).decode()

        headers, body = await in_thread(read)
    assert "content-encoding" not in headers
    assert _events(body)[-1]["type"] == "response.completed"


@pytest.mark.parametrize(
    ("header", "accepted"),
    [
        ("gzip", True),
        ("gzip, deflate, br, zstd", True),
        ("deflate;q=1, GZIP;q=0.5", True),
        ("x-gzip", True),
        ("*", True),
        ("gzip;q=0", False),
        ("gzip;q=0, *", False),  # the explicit entry wins
        ("*;q=0", False),
        ("identity", False),
        ("br", False),
        ("gzip;q=nonsense", False),
        ("", False),
        (None, False),
    ],
)
def test_accept_encoding_is_read_as_rfc_9110_says(header: str | None, accepted: bool) -> None:
    assert accepts_gzip(header) is accepted


def test_every_stream_chunk_inflates_whole_on_its_own() -> None:
    stream = GzipStream(10)
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    chunks = [f'data: {{"sequence_number":{i},"delta":"word{i} "}}\n\n'.encode() for i in range(200)]
    for chunk in chunks:
        assert inflater.decompress(stream.chunk(chunk)) == chunk
    assert inflater.decompress(stream.end()) == b"" and inflater.eof
