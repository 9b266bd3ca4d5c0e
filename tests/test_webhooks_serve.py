"""Webhooks through ``backstream serve``: a process killed (SIGKILL) right after a job's
terminal commit, before any effect of it, sends the event and makes the in-app
notification after its restart, once; the receiver verifies the event with the ``openai``
SDK and fetches the response from backstream with it. And ``backstream webhooks``
lists a dead-lettered event and redelivers it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import openai
import trio

from backstream.client import open_client
from backstream.protocol.webhooks import endpoint_key
from backstream.runtime.stores.sqlite import SqliteStore
from bench._procs import free_port, wait_for_port
from tests.test_webhooks import SECRET
from tests.webhook_receiver import open_receiver

BACKSTREAM = [sys.executable, "-m", "backstream"]
MSG = [{"role": "user", "content": "hello there"}]
GUIDE = Path(__file__).resolve().parent.parent / "docs" / "webhooks.md"


def start_serve(
    tmp_path: Path, port: int, http_port: int, hook: str, *extra: str, crash: bool = False
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "BACKSTREAM_WEBHOOK_SECRET": SECRET}
    env.pop("BACKSTREAM_TEST_CRASH_BEFORE_OUTBOX", None)
    if crash:
        env["BACKSTREAM_TEST_CRASH_BEFORE_OUTBOX"] = "1"
    args = [
        *BACKSTREAM, "serve", "--port", str(port), "--http-port", str(http_port), "--token", "tok=alice",
        "--store", "sqlite:///jobs.db", "--webhook", hook, "--log-level", "warning", *extra,
    ]  # fmt: skip
    with (tmp_path / "serve.log").open("ab") as log:
        return subprocess.Popen(args, cwd=tmp_path, env=env, stderr=log)


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BACKSTREAM, "webhooks", "--store", "sqlite:///jobs.db", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def wait_exit(process: subprocess.Popen[bytes]) -> int:
    return await trio.to_thread.run_sync(lambda: process.wait(timeout=30))


async def test_a_kill_after_the_terminal_commit_loses_neither_the_event_nor_the_notification(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    receiver = await open_receiver(nursery)
    port, http_port = free_port(), free_port()
    server = start_serve(tmp_path, port, http_port, receiver.url, crash=True)
    try:
        await trio.to_thread.run_sync(wait_for_port, port)
        async with open_client(f"ws://127.0.0.1:{port}/v1", "tok") as client:
            started = await client.start_job(
                thread_id="t", message_id="m", model="backstream/echo", messages=MSG
            )
        job_id = started.job.job_id
        assert await wait_exit(server) == -signal.SIGKILL  # killed itself right after the end's commit
        await trio.sleep(0.3)
        assert receiver.received == []
        server = start_serve(tmp_path, port, http_port, receiver.url)
        await trio.to_thread.run_sync(wait_for_port, http_port)
        await receiver.wait_for(1, timeout=30)
        got = receiver.received[0]
        sdk = openai.OpenAI(api_key="tok", base_url=f"http://127.0.0.1:{http_port}/v1", max_retries=0)
        event = sdk.webhooks.unwrap(got.body, got.headers, secret=SECRET)
        assert (event.type, event.data.id) == ("response.completed", job_id)
        response = await trio.to_thread.run_sync(lambda: sdk.responses.retrieve(event.data.id))
        assert (response.id, response.status) == (job_id, "completed")
        assert "hello there" in response.output_text
        async with open_client(f"ws://127.0.0.1:{port}/v1", "tok") as client:
            listed = await client.notifications_list()
        assert [(n.type, n.job_id) for n in listed.notifications] == [("ai.message.received", job_id)]
        await trio.sleep(0.5)
        assert len(receiver.received) == 1  # once per webhook-id
    finally:
        server.kill()
        server.wait()


async def test_the_cli_lists_a_dead_lettered_event_and_redelivers_it(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    receiver = await open_receiver(nursery, status=500)
    port, http_port = free_port(), free_port()
    server = start_serve(tmp_path, port, http_port, receiver.url, "--webhook-retry-schedule", "50ms,50ms")
    try:
        await trio.to_thread.run_sync(wait_for_port, port)
        async with open_client(f"ws://127.0.0.1:{port}/v1", "tok") as client:
            started = await client.start_job(
                thread_id="t", message_id="m", model="backstream/echo", messages=MSG
            )
        await receiver.wait_for(3, timeout=30)  # the first attempt and the schedule's two
    finally:
        server.send_signal(signal.SIGTERM)
        await wait_exit(server)
    listed = await trio.to_thread.run_sync(cli, tmp_path, "failed")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.strip().splitlines()
    assert header.split("\t")[:3] == ["event", "delivery", "type"]
    event_id = receiver.received[0].headers["webhook-id"]
    fields = row.split("\t")
    assert (fields[0], fields[2], fields[3], fields[4], fields[6]) == (
        event_id,
        "response.completed",
        receiver.url,
        "3",
        "HTTP 500",
    )
    assert listed.stderr.strip() == "1 dead-lettered, 0 waiting"
    wrong = await trio.to_thread.run_sync(cli, tmp_path, "redeliver")
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    again = await trio.to_thread.run_sync(cli, tmp_path, "redeliver", event_id)
    assert (again.returncode, again.stdout.strip()) == (0, "1 event deliveries due again")
    receiver.status = 200
    server = start_serve(tmp_path, port, http_port, receiver.url)
    try:
        await receiver.wait_for(4, timeout=30)
        await trio.sleep(0.5)  # its success is written down
    finally:
        server.send_signal(signal.SIGTERM)
        await wait_exit(server)
    assert set(receiver.ids()) == {event_id}
    assert json.loads(receiver.received[-1].body)["data"]["id"] == started.job.job_id
    after = await trio.to_thread.run_sync(cli, tmp_path, "failed")
    assert after.stdout == "" and after.stderr.strip() == "0 dead-lettered, 0 waiting"


async def test_the_guides_receiver_verifies_and_fetches_a_response(tmp_path: Path) -> None:
    guide = GUIDE.read_text()
    (script,) = re.findall(r"```python\n(.*?)```", guide, flags=re.S)
    (tmp_path / "webhook_receiver.py").write_text(script)
    port, http_port, hook_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "BACKSTREAM_TOKEN": "tok",
        "OPENAI_WEBHOOK_SECRET": SECRET,
        "BACKSTREAM_URL": f"http://127.0.0.1:{http_port}/v1",
        "PORT": str(hook_port),
    }
    receiver = subprocess.Popen(
        [sys.executable, "webhook_receiver.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True
    )
    server = start_serve(tmp_path, port, http_port, f"http://127.0.0.1:{hook_port}/hook")
    try:
        await trio.to_thread.run_sync(wait_for_port, hook_port)
        await trio.to_thread.run_sync(wait_for_port, port)
        async with open_client(f"ws://127.0.0.1:{port}/v1", "tok") as client:
            started = await client.start_job(
                thread_id="t", message_id="m", model="backstream/echo", messages=MSG
            )
        assert receiver.stdout is not None
        line = await trio.to_thread.run_sync(receiver.stdout.readline)
        assert line.startswith(f"response.completed {started.job.job_id} completed: ")
        assert "hello there" in line
    finally:
        for process in (server, receiver):
            process.kill()
            process.wait()


async def test_the_cli_lists_and_enables_a_disabled_endpoint(tmp_path: Path) -> None:
    url = "https://billing.example.com/hook"
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    await store.disable_endpoint(endpoint_key(url), "410 Gone")
    await store.aclose()
    listed = await trio.to_thread.run_sync(cli, tmp_path, "disabled")
    assert listed.stdout == f"{endpoint_key(url)}\t410 Gone\n"
    enabled = await trio.to_thread.run_sync(cli, tmp_path, "enable", url + "#events=job.ended")
    assert (enabled.returncode, enabled.stdout) == (0, f"{endpoint_key(url)} enabled\n")
    again = await trio.to_thread.run_sync(cli, tmp_path, "enable", endpoint_key(url))
    assert again.returncode == 1 and again.stderr == f"{endpoint_key(url)} was not disabled\n"
    bad = await trio.to_thread.run_sync(cli, tmp_path, "enable", "ftp://x")
    assert (
        bad.returncode == 1
        and bad.stderr == "backstream webhooks enable: 'ftp://x' is not an http:// or https:// URL\n"
    )
