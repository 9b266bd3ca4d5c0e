"""The server against a hostile page or peer: the auth cookie counts only from a listed
Origin (cross-site WebSocket hijacking), TLS covers the WebSocket and the HTTP port alike,
and the hello read before authentication is capped small."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
import trustme
from trio_websocket import ConnectionRejected, open_websocket_url

from backstream.client import open_client
from backstream.runtime.server.connection import MAX_HELLO_BYTES
from backstream.runtime.server.serve import ServeHandle, serve
from backstream.runtime.server.settings import ServeSettings, check_server_settings
from tests.test_ai_sdk import AiSdkServer, ai_sdk_server, ended, only_job
from tests.test_ai_sdk_server import response, resume_frame, send_frame
from tests.ws_helpers import served

EVIL = "https://evil.example"
APP = "https://app.example"


# -- the auth cookie and the Origin -------------------------------------------------------


async def handshake_status(url: str, headers: list[tuple[str, str]]) -> int:
    """The HTTP status the server answers a WebSocket handshake with (101: accepted)."""
    try:
        async with open_websocket_url(url, extra_headers=headers):
            return 101
    except ConnectionRejected as rejected:
        return rejected.status_code


async def nothing_started(server: AiSdkServer) -> None:
    assert await server.runtime.list_jobs(user="alice") == []
    stats = server.door.statistics()
    assert (stats.connections, stats.requests) == (0, 0)


async def test_a_cookie_from_a_foreign_origin_is_refused_with_any_origin_allowed() -> None:
    # No allow_origins: any Origin may connect, but none may authenticate by the cookie.
    async with ai_sdk_server(auth_cookie="bs") as server:
        for headers in (
            [("Cookie", "bs=tok-alice"), ("Origin", EVIL)],
            [("Cookie", "bs=tok-alice")],  # a browser always sends an Origin: no cookie without one
        ):
            assert await handshake_status(server.url, headers) == 403
        await nothing_started(server)


async def test_a_cookie_counts_only_from_a_listed_origin() -> None:
    async with ai_sdk_server(auth_cookie="bs", allow_origins=(APP,)) as server:
        assert await handshake_status(server.url, [("Cookie", "bs=tok-alice"), ("Origin", EVIL)]) == 403
        assert await handshake_status(server.url, [("Cookie", "bs=tok-alice")]) == 403
        await nothing_started(server)
        headers = [("Cookie", "bs=tok-alice"), ("Origin", APP)]
        async with open_websocket_url(server.url, extra_headers=headers) as ws:
            await ws.send_message(send_frame("s", "chat-1", "hello"))
            frames = await response(ws, "s")
            assert frames[0]["type"] == "start" and frames[-1]["type"] == "end"
            await ws.send_message(resume_frame("r", "chat-1"))
            assert (await response(ws, "r"))[-1]["type"] in ("end", "no-active")
        job = await only_job(server.runtime, "chat-1", user="alice")
        assert (await ended(server.runtime, job.job_id)).job.status == "completed"


async def test_a_token_not_sent_by_the_browser_is_not_bound_to_an_origin() -> None:
    # A bearer header or ?token= is not ambient: a foreign page cannot make the browser send it.
    async with ai_sdk_server(auth_cookie="bs") as server:
        for target, headers in [
            (server.url, [("Authorization", "Bearer tok-alice"), ("Origin", EVIL)]),
            (f"{server.url}?token=tok-alice", [("Origin", EVIL)]),
            (server.url, [("Authorization", "Bearer tok-alice"), ("Cookie", "bs=tok-bob"), ("Origin", EVIL)]),
        ]:
            async with open_websocket_url(target, extra_headers=headers) as ws:
                await ws.send_message(resume_frame("r", "nothing-here"))
                assert await response(ws, "r") == [{"type": "no-active", "requestId": "r"}]
    async with (
        served(auth_cookie="bs") as srv,
        open_websocket_url(srv.url, extra_headers=[("Origin", EVIL)]) as ws,
    ):
        await ws.send_message(json.dumps({"type": "hello", "id": "h", "protocol": 1, "token": "tok-alice"}))
        assert json.loads(await ws.get_message())["type"] == "welcome"


def test_serve_refuses_an_auth_cookie_without_allowed_origins() -> None:
    with pytest.raises(ValueError, match=r"--auth-cookie .*needs --allow-origin") as refused:
        check_server_settings(ServeSettings.defaults(auth_cookie="bs"))
    assert "\n" not in str(refused.value)
    check_server_settings(ServeSettings.defaults(auth_cookie="bs", allow_origin=(APP,)))
    done = subprocess.run(
        [sys.executable, "-m", "backstream", "serve", "--auth-cookie", "bs", "--store", "memory"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("backstream serve: --auth-cookie") and "--allow-origin" in line


# -- TLS --------------------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """A CA's certificate, and a server certificate and key for 127.0.0.1 signed by it."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"
    ca.cert_pem.write_to_path(str(paths[0]))
    cert.private_key_pem.write_to_path(str(paths[2]))
    paths[1].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    yield paths


@asynccontextmanager
async def serving(**settings: Any) -> AsyncIterator[ServeHandle]:
    values: dict[str, Any] = {
        "port": 0,
        "http_port": 0,
        "token": ("tok-alice=alice",),
        "drain_timeout": 0.0,
        "store": "memory",
        **settings,
    }
    async with trio.open_nursery() as nursery:
        handle: ServeHandle = await nursery.start(
            lambda task_status: serve(
                ServeSettings.defaults(**values),
                handle_signals=False,
                announce=lambda _: None,
                task_status=task_status,
            )
        )
        yield handle
        handle.shutdown.set()


async def test_tls_serves_wss_and_https_with_one_certificate(tls_files: tuple[Path, Path, Path]) -> None:
    ca_path, cert, key = tls_files
    async with serving(tls_cert=str(cert), tls_key=str(key)) as handle:
        trusted = ssl.create_default_context(cafile=str(ca_path))
        url = f"wss://127.0.0.1:{handle.port}/v1"
        async with open_client(url, "tok-alice", ssl_context=trusted) as client:
            started = await client.start_job(
                thread_id="t",
                message_id="m",
                model="backstream/echo",
                messages=[{"role": "user", "content": "hi"}],
            )
            with trio.fail_after(30):
                while (
                    info := await client.get(started.job.job_id, include_content=True)
                ).job.status != "completed":
                    await trio.sleep(0.05)
            assert info.content == "hi"

        def over_https() -> tuple[str | None, str]:
            with httpx.Client(verify=ssl.create_default_context(cafile=str(ca_path))) as http:
                sdk = openai.OpenAI(
                    base_url=f"https://127.0.0.1:{handle.http_port}/v1",
                    api_key="tok-alice",
                    http_client=http,
                    max_retries=0,
                    timeout=30,
                )
                created = sdk.responses.create(model="backstream/echo", input="over tls", background=True)
                found = sdk.responses.retrieve(created.id)
                while found.status in ("queued", "in_progress"):
                    found = sdk.responses.retrieve(created.id)
                return found.status, found.output_text

        with trio.fail_after(60):
            assert await trio.to_thread.run_sync(over_https) == ("completed", "over tls")

        def in_clear_text() -> None:
            with httpx.Client() as http:
                http.get(f"http://127.0.0.1:{handle.http_port}/healthz", timeout=5)

        with pytest.raises(httpx.HTTPError):  # the HTTP port speaks TLS only
            await trio.to_thread.run_sync(in_clear_text)


def test_an_unreadable_certificate_or_key_names_the_setting(
    tls_files: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, cert, key = tls_files
    missing = str(tmp_path / "nowhere.pem")
    cases = [
        ({"tls_cert": missing, "tls_key": str(key)}, "--tls-cert (BACKSTREAM_TLS_CERT): cannot read"),
        ({"tls_cert": str(cert), "tls_key": missing}, "--tls-key (BACKSTREAM_TLS_KEY): cannot read"),
        ({"tls_cert": str(key), "tls_key": str(cert)}, "not a PEM certificate with its matching"),
        ({"tls_key": str(key)}, "--tls-key (BACKSTREAM_TLS_KEY): a key without a certificate"),
    ]
    for settings, expected in cases:
        with pytest.raises(ValueError) as refused:
            check_server_settings(ServeSettings.defaults(**settings))
        assert expected in str(refused.value) and "\n" not in str(refused.value)
    done = subprocess.run(
        [sys.executable, "-m", "backstream", "serve", "--tls-cert", missing, "--store", "memory"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("backstream serve: --tls-cert (BACKSTREAM_TLS_CERT): cannot read")


# -- the hello before authentication ---------------------------------------------------------


async def raw_upgrade(port: int, path: str) -> trio.SocketStream:
    """A TCP connection that has completed a WebSocket handshake for ``path``."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(4096)
    assert head.startswith(b"HTTP/1.1 101")
    return stream


def text_frame_header(length: int) -> bytes:
    """A final, masked (with a zero mask) text frame header for ``length`` payload bytes."""
    return b"\x81\xff" + length.to_bytes(8, "big") + b"\x00\x00\x00\x00"


async def close_code_of(stream: trio.SocketStream) -> tuple[int, bytes]:
    """The close code the server sends, and everything it sent before it."""
    received = b""
    with trio.fail_after(10):
        while not (received.find(b"\x88") >= 0 and len(received) >= received.find(b"\x88") + 4):
            chunk = await stream.receive_some(4096)
            assert chunk, received
            received += chunk
    at = received.find(b"\x88")
    return int.from_bytes(received[at + 2 : at + 4], "big"), received[:at]


async def test_an_oversized_hello_is_closed_1009_unread() -> None:
    async with served() as srv:
        stream = await raw_upgrade(srv.door.port, "/v1")
        # A frame announcing 512 KiB (under max_message_bytes): only 16 KiB is ever sent.
        await stream.send_all(
            text_frame_header(512 * 1024) + b'{"type":"hello","id":"h","client":"' + b"x" * 16384
        )
        code, before = await close_code_of(stream)
        assert code == 1009 and before == b""  # no error reply: the frame was never decoded
        assert srv.door.statistics().requests == 0
        await stream.aclose()


async def test_a_hello_up_to_the_cap_is_read_and_later_frames_get_the_full_limit() -> None:
    async with served() as srv, open_websocket_url(srv.url) as ws:
        hello = {"type": "hello", "id": "h", "protocol": 1, "token": "tok-alice", "client": ""}
        hello["client"] = "x" * (MAX_HELLO_BYTES - len(json.dumps(hello)))
        assert len(json.dumps(hello)) == MAX_HELLO_BYTES
        await ws.send_message(json.dumps(hello))
        assert json.loads(await ws.get_message())["type"] == "welcome"
        big = {"type": "ping", "id": "p", "pad": "y" * (4 * MAX_HELLO_BYTES)}
        await ws.send_message(json.dumps(big))
        reply = json.loads(await ws.get_message())
        assert reply["id"] == "p"


async def test_the_ai_sdk_first_frame_is_not_capped() -> None:
    # /v1/ai-sdk authenticates in the handshake: its first frame may be as large as any.
    async with ai_sdk_server() as server:
        async with open_websocket_url(f"{server.url}?token=tok-alice") as ws:
            await ws.send_message(send_frame("s", "chat-big", "z" * (4 * MAX_HELLO_BYTES)))
            assert (await response(ws, "s"))[-1]["type"] == "end"


def test_the_startup_lines_name_https_when_tls_is_configured() -> None:
    from backstream.runtime.server.serve import startup_lines

    lines = startup_lines(ServeSettings.defaults(tls_cert="server.pem"), [], [], 8080)
    assert lines[0].startswith("HTTP: https://127.0.0.1:8080 ")
    assert startup_lines(ServeSettings.defaults(), [], [], 8080)[0].startswith("HTTP: http://127.0.0.1:8080 ")


def test_the_help_states_the_hello_cap() -> None:
    from backstream.runtime.server.settings import OPTIONS

    (option,) = [option for option in OPTIONS if option.name == "max_message_bytes"]
    assert f"{MAX_HELLO_BYTES // 1024} KiB" in option.help
