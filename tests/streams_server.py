"""A real ``backstream serve`` process for the Durable Streams tests: authentication on (a static
token), capability URLs signed, the long-poll timeout short enough for the conformance suite."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import attrs

TOKEN, USER = "streams-token", "streams-user"
SIGNING_KEY = "durable-streams-test-signing-key-0123456789"
PACKAGE = Path(__file__).resolve().parent.parent / "clients" / "durable-streams-tests"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@attrs.frozen
class StreamsServer:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def capability_base(self, prefix: str = "", *, write: bool = True) -> str:
        """A capability base URL (no trailing slash) over the test user's streams."""
        request = urllib.request.Request(
            f"{self.base}/v1/stream-capabilities",
            data=json.dumps({"prefix": prefix, "ttl_s": 86400, "write": write}).encode(),
            headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            path = json.load(reply)["path"]
        return f"{self.base}{path}".rstrip("/")


@contextlib.contextmanager
def streams_server(
    store: str,
    workdir: Path,
    *,
    long_poll_s: float = 0.5,
    tokens: tuple[str, ...] = (),
    args: tuple[str, ...] = (),
    **env: str,
) -> Iterator[StreamsServer]:
    """``backstream serve`` on ``store`` until the block ends (SIGTERM, then SIGKILL)."""
    port = free_port()
    log = workdir / f"serve-{port}.log"
    environment = {
        **os.environ,
        "BACKSTREAM_STREAMS_SIGNING_KEY": SIGNING_KEY,
        "BACKSTREAM_STREAMS_LONG_POLL_TIMEOUT": str(long_poll_s),
        "BACKSTREAM_STREAMS_RATE_PER_S": "100000",
        **env,
    }
    command = [sys.executable, "-m", "backstream", "serve", "--store", store, "--port", "0"]
    command += ["--http-port", str(port), "--token", f"{TOKEN}={USER}"]
    for pair in tokens:
        command += ["--token", pair]
    command += args
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=environment, cwd=workdir
        )
    server = StreamsServer(process, port, log)
    try:
        _wait_healthy(server)
        yield server
    finally:
        stop(server)


def stop(server: StreamsServer, sig: int = signal.SIGTERM) -> None:
    if server.process.poll() is None:
        server.process.send_signal(sig)
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def _wait_healthy(server: StreamsServer) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"serve exited: {server.log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{server.base}/healthz", timeout=1):
                return
        time.sleep(0.2)
    raise RuntimeError(f"serve did not start: {server.log.read_text()[-3000:]}")
