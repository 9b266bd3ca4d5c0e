"""Ordinary mistakes get one clear line and a non-zero exit, never a traceback (real processes)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from backstream.client import open_client
from backstream.protocol.errors import UnavailableError
from tests.upstream_server import FakeUpstream

BACKSTREAM = [sys.executable, "-m", "backstream"]


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BACKSTREAM, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def one_line_failure(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("backstream serve: ")
    return lines[0]


@pytest.mark.parametrize("flag", ["--port", "--http-port", "--metrics-port"])
def test_port_in_use_names_the_port_and_its_flag(flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        others = [f for f in ("--port", "--http-port") if f != flag]
        done = run(
            "serve", "--store", "memory", *[a for f in others for a in (f, "0")],
            flag, str(port), "--log-level", "warning",
        )  # fmt: skip
        line = one_line_failure(done)
    assert done.returncode == 1
    assert line.startswith(f"backstream serve: {flag} {port}: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in line


def test_one_port_for_two_listeners() -> None:
    done = run("serve", "--store", "memory", "--port", "9001", "--http-port", "9001")
    line = one_line_failure(done)
    assert done.returncode == 1 and "--port 9001 and --http-port 9001" in line


def test_workers_need_a_shared_store(tmp_path: Path) -> None:
    done = run("serve", "--workers", "2", "--store", f"sqlite:///{tmp_path}/jobs.db", "--port", "0")
    line = one_line_failure(done)
    assert done.returncode == 1
    assert "--workers 2 needs a store all workers share" in line and "redis://" in line
    assert not (tmp_path / "jobs.db").exists()  # no worker was started


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("api.example.com/v1", "'api.example.com/v1' has no scheme"),
        ("localhost:8080/v1", "'localhost:8080/v1' has no scheme"),
        ("ftp://api.example.com/v1", "has the scheme 'ftp': use http or https"),
        ("http:///v1", "'http:///v1' has no host"),
        ("http://api.example.com:abc/v1", "has a port that is not a number"),
        ("http://api.example.com:99999/v1", "has a port that is not a number"),
        ("http://user:secret@:8080/v1", "'http://:8080/v1' has no host"),
        ("http://[::1/v1", "is not a URL"),
    ],
    ids=["no-scheme", "host-port-no-scheme", "ftp", "no-host", "port-text", "port-range", "password", "ipv6"],
)
def test_bad_upstream_url_names_the_flag(url: str, problem: str) -> None:
    done = run("serve", "--store", "memory", "--port", "0", "--upstream-url", url)
    line = one_line_failure(done)
    assert done.returncode == 1
    assert line.startswith("backstream serve: --upstream-url (BACKSTREAM_UPSTREAM_URL): ")
    assert problem in line and "secret" not in line


@pytest.mark.parametrize(
    "command", [["schema"], ["version"], ["token", "alice"]], ids=["schema", "version", "token"]
)
def test_stdout_closed_early_is_no_traceback(command: list[str]) -> None:
    reader = subprocess.Popen(
        [*BACKSTREAM, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "BACKSTREAM_JWT_SECRET": "s" * 32},
    )
    assert reader.stdout is not None and reader.stderr is not None
    reader.stdout.close()  # before it writes: every write meets a closed pipe
    stderr = reader.stderr.read().decode()
    assert reader.wait(timeout=60) == 1
    assert stderr == ""


def test_schema_piped_into_head() -> None:
    # As typed at a shell; whether a write meets the pipe closed depends on timing, so the
    # closed pipe itself is the test above.
    done = subprocess.run(
        ["sh", "-c", f"{sys.executable} -m backstream schema | head -c 1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout == "{" and done.stderr == ""


def test_bad_log_level() -> None:
    line = one_line_failure(run("serve", "--log-level", "loud"))
    assert "--log-level" in line and "'loud'" in line and "debug" in line


def test_tools_module_that_does_not_import() -> None:
    line = one_line_failure(run("serve", "--store", "memory", "--tools", "no_such_module_here:tool"))
    assert "--tools no_such_module_here:tool" in line and "No module named" in line


def test_sqlite_path_that_cannot_be_opened(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    store = f"sqlite:///{blocker}/jobs.db"
    line = one_line_failure(run("serve", "--port", "0", "--store", store, "--log-level", "warning"))
    assert f"cannot open the store {store}" in line


def test_redis_url_at_a_cluster_node_says_to_use_redis_cluster(redis_cluster: str) -> None:
    """A plain ``redis://`` URL naming a Redis Cluster node would meet MOVED at its first key."""
    node = redis_cluster.removeprefix("redis+cluster://")
    done = run("serve", "--store", f"redis://{node}/0", "--port", "0", "--log-level", "warning")
    line = one_line_failure(done)
    assert done.returncode == 1
    assert line == (
        f"backstream serve: redis://{node}/0 points at a Redis Cluster node: use redis+cluster://{node}"
    )


@pytest.mark.parametrize(
    ("store", "problem"),
    [
        ("valkey://127.0.0.1:6379", "unknown store 'valkey://127.0.0.1:6379': use memory, sqlite:///PATH"),
        ("redis+sentinel://127.0.0.1:26379", "name the sentinels' service"),
        ("redis+cluster://127.0.0.1:7000/3", "a Redis Cluster has database 0 only"),
        ("redis://a:1,b:2/0", "one HOST:PORT only"),
    ],
    ids=["unknown-scheme", "sentinel-without-service", "cluster-db", "two-hosts"],
)
def test_store_url_of_no_known_form(store: str, problem: str) -> None:
    done = run("serve", "--store", store, "--port", "0")
    line = one_line_failure(done)
    assert done.returncode == 1 and problem in line
    if "unknown store" in problem:  # every form is named
        for form in ("redis://", "rediss://", "redis+cluster://", "redis+sentinel://", "rediss+sentinel://"):
            assert form in line


def test_waiting_for_replicas_at_no_known_point() -> None:
    done = run("serve", "--store", "memory", "--port", "0", "--store-wait-on", "commit")
    line = one_line_failure(done)
    assert (
        line
        == "backstream serve: --store-wait-on (BACKSTREAM_STORE_WAIT_ON): must be end or flush, not 'commit'"
    )


def test_waiting_for_replicas_needs_a_redis_store() -> None:
    done = run("serve", "--store", "memory", "--port", "0", "--store-wait-replicas", "1")
    line = one_line_failure(done)
    assert done.returncode == 1 and "--store-wait-replicas needs a Redis store" in line


def test_unknown_toml_key(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('colour = "blue"\nport = 9000\n')
    line = one_line_failure(run("serve", "--config", str(config)))
    assert "unknown settings" in line and "colour" in line


def test_malformed_environment_value_names_the_variable() -> None:
    line = one_line_failure(run("serve", env={"BACKSTREAM_JOB_TIMEOUT": "forever"}))
    assert "BACKSTREAM_JOB_TIMEOUT" in line and "'forever'" in line


def test_version_flag() -> None:
    done = run("--version")
    assert done.returncode == 0 and done.stdout.strip() == "backstream 0.1.0"


def test_startup_lines_in_json_say_where_it_listens_and_with_what(tmp_path: Path) -> None:
    server = subprocess.Popen(
        [
            *BACKSTREAM,
            "serve",
            "--port",
            "0",
            "--http-port",
            "0",
            "--store",
            f"sqlite:///{tmp_path}/jobs.db",
            "--upstream-url",
            "http://user:secret@127.0.0.1:9/v1",
            "--log-format",
            "json",
            "--token",
            "tok=alice",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        entries = []
        while not any(e["message"].startswith("tools:") for e in entries):
            line = server.stderr.readline()
            assert line, "the server ended before its startup lines"
            entries.append(json.loads(line))  # every line is JSON
        messages = "\n".join(e["message"] for e in entries)
        assert "listening on ws://127.0.0.1:" in messages and "/v1" in messages
        assert "HTTP: http://127.0.0.1:" in messages
        assert f"store: sqlite:///{tmp_path}/jobs.db" in messages
        assert "upstream: http://user:***@127.0.0.1:9/v1" in messages and "secret" not in messages
        assert "tools: calculate, clock_now" in messages
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=15) == 0
    finally:
        if server.poll() is None:
            server.kill()


def test_demo_prints_plain_lines_off_a_terminal() -> None:
    done = run("demo", "--words", "40", "--rate", "400", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    progress = [line for line in done.stderr.splitlines() if line.strip().startswith("watching:")]
    assert 2 <= len(progress) <= 8  # a line now and then, not one per batch
    assert "nothing lost, nothing repeated" in done.stderr


async def test_demo_on_an_upstream_model(upstream: FakeUpstream) -> None:
    done = await trio.run_process(
        [*BACKSTREAM, "demo", "--upstream-url", upstream.url, "--model", "acme/model-1", "--words", "4"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == "Hello world"
    assert [r["model"] for r in upstream.requests] == ["acme/model-1"]


async def test_client_refuses_a_url_that_is_not_a_backstream_endpoint(upstream: FakeUpstream) -> None:
    with pytest.raises(ValueError, match="not a backstream endpoint"):
        async with open_client("http://127.0.0.1:1/v1", "tok"):
            pass
    with pytest.raises(UnavailableError, match="not a backstream endpoint"):
        async with open_client(f"ws://127.0.0.1:{upstream.port}/v1", "tok", max_reconnect_attempts=0):
            pass
