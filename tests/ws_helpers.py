"""Test helpers: a server on loopback in the test's own trio run, and a bare protocol client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from backstream import Config, Runtime, Store, open_runtime
from backstream.runtime.server.auth import Authenticator, StaticTokens
from backstream.runtime.server.connection import ConnectionLimits
from backstream.runtime.server.frontdoor import FrontDoor, FrontDoorConfig
from backstream.runtime.tools.registry import ToolRegistry

TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}


@attrs.define
class Served:
    runtime: Runtime
    door: FrontDoor

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.door.port}/v1"


@asynccontextmanager
async def served(
    config: Config | None = None,
    *,
    limits: ConnectionLimits | None = None,
    auth: Authenticator | None = None,
    store: Store | None = None,
    tools: ToolRegistry | None = None,
    **door: Any,
) -> AsyncIterator[Served]:
    config = config or Config(drain_timeout=0)
    async with open_runtime(config, store=store, tools=tools) as rt, trio.open_nursery() as nursery:
        front = FrontDoor(
            rt,
            auth or StaticTokens(TOKENS),
            FrontDoorConfig(port=0, limits=limits or ConnectionLimits(), **door),
        )
        await nursery.start(front.run)
        yield Served(rt, front)
        nursery.cancel_scope.cancel()


class Raw:
    """A bare client: sends what it is told, collects replies and pushes."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.pushes: list[dict[str, Any]] = []
        self._ids = 0

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        await self.ws.send_message(message if isinstance(message, str | bytes) else json.dumps(message))

    async def recv(self) -> dict[str, Any]:
        with trio.fail_after(60):
            return json.loads(await self.ws.get_message())  # type: ignore[no-any-return]

    async def request(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Send a request and return its reply; pushes meanwhile go to ``pushes``."""
        self._ids += 1
        request_id = fields.pop("id", f"q{self._ids}")
        await self.send({"type": kind, "id": request_id, **fields})
        while True:
            message = await self.recv()
            if message.get("id") == request_id:
                return message
            self.pushes.append(message)

    async def hello(self, token: str = "tok-alice", **fields: Any) -> dict[str, Any]:
        return await self.request("hello", id="h", protocol=1, token=token, **fields)

    async def close_code(self) -> int | None:
        """Read until the server closes; return its close code."""
        try:
            with trio.fail_after(60):
                while True:
                    self.pushes.append(json.loads(await self.ws.get_message()))
        except ConnectionClosed as exc:
            return exc.reason.code if exc.reason else None

    async def events_until_terminal(self, job_id: str) -> list[dict[str, Any]]:
        """The job.events pushes of ``job_id`` (already received ones first) up to the terminal one."""
        batches = [p for p in self.pushes if p.get("type") == "job.events" and p["job_id"] == job_id]
        self.pushes = [p for p in self.pushes if p not in batches]
        while not (batches and _terminal(batches[-1])):
            message = await self.recv()
            if message.get("type") == "job.events" and message["job_id"] == job_id:
                batches.append(message)
            else:
                self.pushes.append(message)
        return batches


def _terminal(batch: dict[str, Any]) -> bool:
    last = batch["events"][-1]
    return last["kind"] == "status" and last["status"] in ("completed", "failed", "aborted", "interrupted")


def text_of(batches: list[dict[str, Any]]) -> str:
    return "".join(ev["text"] for b in batches for ev in b["events"] if ev["kind"] == "text")


def check_contiguous(batches: list[dict[str, Any]], after_seq: int = 0) -> None:
    expected = after_seq + 1
    for batch in batches:
        assert batch["from_seq"] == expected
        assert batch["to_seq"] == batch["events"][-1]["seq"]
        expected = batch["to_seq"] + 1


@asynccontextmanager
async def raw_client(url: str, **kwargs: Any) -> AsyncIterator[Raw]:
    async with open_websocket_url(url, **kwargs) as ws:
        yield Raw(ws)


def start_fields(message_id: str = "m1", **extra: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "thread_id": "t1",
        "message_id": message_id,
        "model": "backstream/lorem",
        "messages": [{"role": "user", "content": "hi"}],
        "params": {"max_tokens": 20, "tokens_per_s": 100},
    }
    fields.update(extra)
    return fields
