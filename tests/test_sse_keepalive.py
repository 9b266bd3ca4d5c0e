"""HTTP event streams stay open through idle proxies, and end when their token expires."""

from __future__ import annotations

import json
import time

import httpx
import jwt

from tests.test_responses_api import in_thread, served
from tests.upstream_server import FakeUpstream, streams

SECRET = "0123456789abcdef0123456789abcdef"


def _read_stream(url: str, token: str, seconds: float) -> tuple[list[str], float]:
    """Every line of a response's event stream for at most ``seconds``, and how long it ran."""
    lines: list[str] = []
    began = time.monotonic()
    with httpx.stream(
        "GET", url, headers={"authorization": f"Bearer {token}"}, timeout=seconds + 5
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            lines.append(line)
            if time.monotonic() - began > seconds:
                break
    return lines, time.monotonic() - began


def _create(base_url: str, token: str) -> str:
    answer = httpx.post(
        f"{base_url}/responses",
        json={"model": "gpt-test", "input": "hi", "background": True},
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["id"])


async def test_a_silent_stream_gets_comment_lines(upstream: FakeUpstream) -> None:
    # Two words 1.2 s apart: the stream is silent in between, longer than the keep-alive.
    upstream.script(streams(["a ", "b"], delay=1.2))
    async with served(upstream, sse_keepalive=0.3) as server:
        job_id = await in_thread(lambda: _create(server.base_url, "tok-alice"))
        url = f"{server.base_url}/responses/{job_id}?stream=true"
        lines, _ = await in_thread(lambda: _read_stream(url, "tok-alice", 10))
    comments = [line for line in lines if line.startswith(":")]
    assert comments and set(comments) == {": keep-alive"}
    assert any('"response.completed"' in line for line in lines)  # the events all came


async def test_a_stream_whose_token_expires_ends_with_an_error_event(upstream: FakeUpstream) -> None:
    upstream.script(streams([f"w{i} " for i in range(200)], delay=0.05))  # about 10 s
    async with served(upstream, token=(), jwt_secret=SECRET) as server:
        long_lived = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
        short_lived = jwt.encode({"sub": "alice", "exp": int(time.time()) + 2}, SECRET, algorithm="HS256")
        job_id = await in_thread(lambda: _create(server.base_url, long_lived))
        url = f"{server.base_url}/responses/{job_id}?stream=true"
        lines, took = await in_thread(lambda: _read_stream(url, short_lived, 20))
    assert took < 6  # ended at the token's expiry, long before the job
    last = json.loads([line for line in lines if line.startswith("data: ")][-1].removeprefix("data: "))
    assert (last["type"], last["code"]) == ("error", "unauthorized")
    assert not any('"response.completed"' in line for line in lines)
