"""``backstream demo``: the main job, end to end, on embedded defaults and offline.

It starts a server on a free port with the built-in model, then a client that
starts a job and watches it; midway the client drops its connection, waits
while the job goes on in the background, reconnects, resumes from the last
``seq`` it saw and shows the whole answer, checked against the stored one.
"""

from __future__ import annotations

import socket
import sys
import tempfile
from functools import partial

import trio

from backstream.client import open_client
from backstream.runtime.serve import ServeHandle, serve
from backstream.runtime.settings import ServeSettings


def _progress(label: str, words: int, total: int, seq: int) -> None:
    width = 32
    filled = width * min(words, total) // max(total, 1)
    bar = "#" * filled + "." * (width - filled)
    sys.stderr.write(f"\r  {label:<12} [{bar}] {words:>4}/{total} words  seq {seq:<5}")
    sys.stderr.flush()


async def run_demo(words: int, rate: float) -> int:
    with tempfile.TemporaryDirectory(prefix="backstream-demo-") as workdir:
        settings = ServeSettings.defaults(
            port=0, retention=60.0, drain_timeout=0.0, store=f"sqlite:///{workdir}/demo.db"
        )
        return await _serve_and_run(settings, words, rate)


async def run_web_demo(port: int, http_port: int) -> int:
    """Serve the demo chat page on embedded defaults (SQLite in a temporary folder, the
    built-in models, the demo tools) until SIGINT or SIGTERM; print the URL to open.

    Cancellation: the server stops at once and running jobs end ``interrupted``; the
    temporary folder is removed either way.
    """
    with tempfile.TemporaryDirectory(prefix="backstream-web-demo-") as workdir:
        settings = ServeSettings.defaults(
            port=port if _port_is_free(port) else 0,
            http_port=http_port if _port_is_free(http_port) else 0,
            web=True,
            store=f"sqlite:///{workdir}/demo.db",
            tools=("backstream.runtime.tools_demo:DEMO_TOOLS",),
            retention=24 * 3600.0,
            drain_timeout=0.0,
        )

        def announce(line: str) -> None:
            if line.startswith("demo chat page: "):
                url = line.removeprefix("demo chat page: ")
                print(f"\nbackstream demo chat: open {url}\n", flush=True)
                print(
                    "  offline: models backstream/echo, backstream/lorem, backstream/tools-demo;"
                    " tools clock_now, calculate, send_note (asks for approval)\n  Ctrl-C stops",
                    file=sys.stderr,
                    flush=True,
                )

        await serve(settings, announce=announce)
    return 0


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def _serve_and_run(settings: ServeSettings, words: int, rate: float) -> int:
    async with trio.open_nursery() as nursery:
        handle: ServeHandle = await nursery.start(
            partial(serve, settings, handle_signals=False, announce=lambda _: None)
        )
        url = f"ws://127.0.0.1:{handle.port}/v1"
        assert handle.dev_token is not None
        print(f"server on {url} (store: SQLite, model: backstream/lorem, offline)", file=sys.stderr)
        try:
            return await _client(url, handle.dev_token, words, rate)
        finally:
            handle.shutdown.set()


async def _client(url: str, token: str, words: int, rate: float) -> int:
    async with open_client(url, token, client_name="backstream-demo") as client:
        started = await client.start_job(
            thread_id="demo-thread",
            message_id="demo-message-1",
            model="backstream/lorem",
            messages=[{"role": "user", "content": "Tell me something long."}],
            params={"max_tokens": words, "tokens_per_s": rate},
        )
        job_id = started.job.job_id
        print(f"started job {job_id}: {words} words at {rate:g} words/s", file=sys.stderr)
        text, dropped, dropped_once, status = "", False, False, "?"
        async with client.watch(job_id) as batches:
            async for batch in batches:
                if dropped and batch.from_seq:
                    print(
                        f"\n  resumed at seq {batch.from_seq} (right after {batch.from_seq - 1})",
                        file=sys.stderr,
                    )
                    dropped = False
                text += batch.text
                _progress("watching", len(text.split()), words, batch.to_seq)
                if batch.terminal is not None:
                    status = batch.terminal.status
                elif not dropped_once and len(text.split()) >= words // 2:
                    dropped_once = True
                    await client.drop_connection()
                    print(
                        f"\n  connection dropped at seq {batches.cursor}; the job keeps running...",
                        file=sys.stderr,
                    )
                    await trio.sleep(words / rate / 4)
                    dropped = True
        info = await client.get(job_id, include_content=True)
        print(f"\njob {status}: {len(text)} characters in {info.job.seq} log entries\n", file=sys.stderr)
        print(text)
        if text != info.content:
            print("MISMATCH: the text received differs from the stored answer", file=sys.stderr)
            return 1
        print("\nreceived text == stored answer: nothing lost, nothing repeated", file=sys.stderr)
        return 0
