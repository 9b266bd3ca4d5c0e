"""``backstream serve`` and the other commands, as a real process where it matters."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
from websockets.sync.client import connect

from backstream.runtime.server.serve import ServeHandle, serve
from backstream.runtime.server.settings import ServeSettings, add_serve_arguments, load_settings
from bench._procs import free_port, wait_for_port


def _jobs_in(path: Path) -> dict[str, tuple[str, int]]:
    """job_id -> (status, content_length), read straight from a SQLite store file."""
    import sqlite3

    with sqlite3.connect(path) as conn:
        return {
            job_id: (status, content_length)
            for job_id, status, content_length in conn.execute(
                "SELECT job_id, status, content_length FROM jobs"
            )
        }


def test_sigterm_closes_clients_1001_and_drains(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "BACKSTREAM_TOKENS": "tok=alice"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backstream",
            "serve",
            "--port",
            str(port),
            "--drain-timeout",
            "1.5",
            "--store",
            f"sqlite:///{tmp_path}/jobs.db",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port)
        with connect(f"ws://127.0.0.1:{port}/v1") as ws:
            ws.send(json.dumps({"type": "hello", "id": "h", "protocol": 1, "token": "tok"}))
            assert json.loads(ws.recv())["type"] == "welcome"
            for i, tokens in enumerate((10, 10_000)):  # one finishes within the drain, one does not
                ws.send(
                    json.dumps(
                        {
                            "type": "job.start",
                            "id": f"s{i}",
                            "thread_id": "t",
                            "message_id": f"m{i}",
                            "model": "backstream/lorem",
                            "messages": [{"role": "user", "content": "x"}],
                            "params": {"max_tokens": tokens, "tokens_per_s": 20},
                        }
                    )
                )
                assert json.loads(ws.recv())["type"] == "job.started"
            t0 = time.monotonic()
            server.send_signal(signal.SIGTERM)
            with pytest.raises(Exception) as closed:
                while True:
                    ws.recv()
            assert getattr(closed.value, "rcvd", None) is not None and closed.value.rcvd.code == 1001  # type: ignore[attr-defined]
        assert server.wait(timeout=15) == 0
        elapsed = time.monotonic() - t0
        assert 1.5 <= elapsed < 8  # the drain waited, then stopped the rest
        log = server.stderr.read() if server.stderr else ""
        # A built-in model continues: the job is left running for the next serve to finish.
        assert "1 completed" in log and "1 left_running" in log
        assert "tok" not in log.replace("tokens", "")  # tokens never reach the log
        statuses = _jobs_in(tmp_path / "jobs.db")
        assert sorted(s for s, _ in statuses.values()) == ["completed", "running"]
        left_chars = next(chars for s, chars in statuses.values() if s == "running")
        assert left_chars > 0  # its content up to the drain is written
    finally:
        if server.poll() is None:
            server.kill()


async def test_health_ready_and_metrics() -> None:
    settings = ServeSettings.defaults(
        port=0, http_port=0, token=("tok=alice",), drain_timeout=0.0, store="memory"
    )
    async with trio.open_nursery() as nursery:
        handle: ServeHandle = await nursery.start(
            lambda task_status: serve(
                settings, handle_signals=False, announce=lambda _: None, task_status=task_status
            )
        )
        assert handle.dev_token is None
        from backstream.client import open_client

        async with open_client(f"ws://127.0.0.1:{handle.port}/v1", "tok") as client:
            started = await client.start_job(
                thread_id="t",
                message_id="m",
                model="backstream/echo",
                messages=[{"role": "user", "content": "a b c"}],
            )
            async with client.watch(started.job.job_id) as batches:
                async for _ in batches:
                    pass
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}") as http:
                assert (await http.get("/healthz")).text == "ok\n"
                assert (await http.get("/readyz")).status_code == 200
                metrics = (await http.get("/metrics")).text
                assert (await http.get("/nope")).status_code == 404
        assert 'backstream_jobs_finished_total{status="completed"} 1.0' in metrics
        assert "backstream_connections 1.0" in metrics and "backstream_batches_sent_total" in metrics
        handle.shutdown.set()


def test_settings_precedence(tmp_path: Path) -> None:
    config = tmp_path / "backstream.toml"
    config.write_text('port = 9000\nmax_jobs = 7\nretention = 60\ntoken = ["a=alice"]\n')
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--config", str(config), "--port", "9100"])
    settings = load_settings(args, env={"BACKSTREAM_MAX_JOBS": "9", "BACKSTREAM_TOKENS": "b=bob,c=carol"})
    assert settings.port == 9100  # flag over file
    assert settings.max_jobs == 9  # environment over file
    assert settings.retention == 60.0  # file over default
    assert settings.token == ("b=bob", "c=carol")
    assert settings.job_timeout == 300.0
    config.write_text("colour = 'blue'\n")
    with pytest.raises(ValueError, match="colour"):
        load_settings(parser.parse_args(["--config", str(config)]), env={})
    with pytest.raises(ValueError, match="BACKSTREAM_MAX_JOBS"):
        load_settings(parser.parse_args([]), env={"BACKSTREAM_MAX_JOBS": "many"})


def test_schema_token_and_version_commands() -> None:
    def run(*a, **kw):
        return subprocess.run([sys.executable, "-m", "backstream", *a], capture_output=True, text=True, **kw)

    schema = json.loads(run("schema").stdout)
    assert "job.events" in schema["$defs"] and "hello" in schema["$defs"]
    assert run("version").stdout.strip() == "0.1.0"
    missing = run("token", "alice", env={k: v for k, v in os.environ.items() if k != "BACKSTREAM_JWT_SECRET"})
    assert missing.returncode != 0 and "BACKSTREAM_JWT_SECRET" in missing.stderr
    secret = "k" * 40
    minted = run(
        "token", "alice", "--ttl", "60", env={**os.environ, "BACKSTREAM_JWT_SECRET": secret}
    ).stdout.strip()
    from backstream.runtime.server.auth import JWTAuthenticator

    assert JWTAuthenticator(secret).authenticate(minted).user == "alice"


def test_serve_without_auth_prints_a_dev_token() -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "backstream", "serve", "--port", str(port), "--store", "memory"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port)
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=15) == 0
        log = server.stderr.read() if server.stderr else ""
        line = next(line for line in log.splitlines() if "with token" in line)
        assert "user 'dev'" in line and len(line.rsplit(" ", 1)[1]) >= 24
    finally:
        if server.poll() is None:
            server.kill()
