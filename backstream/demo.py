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
from typing import TextIO

import trio

from backstream.client import open_client
from backstream.runtime.server.serve import ServeHandle, serve
from backstream.runtime.server.settings import ServeSettings


class _Progress:
    """A progress bar on a terminal; elsewhere (a pipe, a log file) a plain line now and then."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self._total = total
        self._stream = stream
        self._live = stream.isatty()
        self._next_line_at = 0

    def show(self, label: str, words: int, seq: int) -> None:
        total = self._total
        if self._live:
            width = 32
            filled = width * min(words, total) // max(total, 1)
            bar = "#" * filled + "." * (width - filled)
            self._stream.write(f"\r  {label:<12} [{bar}] {words:>4}/{total} words  seq {seq:<5}")
        elif words >= self._next_line_at:
            self._stream.write(f"  {label}: {words}/{total} words, seq {seq}\n")
            self._next_line_at = words + max(total // 4, 1)
        self._stream.flush()

    def end_line(self) -> str:
        """What to print before a message so it starts on a line of its own."""
        return "\n" if self._live else ""


async def run_demo(
    words: int, rate: float, *, upstream_url: str | None = None, model: str = "backstream/lorem"
) -> int:
    """Run the demo: a server, a job, a dropped connection and a resume; with
    ``upstream_url``, on that upstream's ``model``. Cancellation: the demo's server and
    client are stopped."""
    with tempfile.TemporaryDirectory(prefix="backstream-demo-") as workdir:
        settings = ServeSettings.defaults(
            port=0,
            retention=60.0,
            drain_timeout=0.0,
            store=f"sqlite:///{workdir}/demo.db",
            upstream_url=upstream_url,
        )
        return await _serve_and_run(settings, words, rate, model)


async def run_web_demo(port: int, http_port: int, *, upstream_url: str | None = None) -> int:
    """Serve the demo chat page on embedded defaults (SQLite in a temporary folder, the
    built-in models, the demo tools; with ``upstream_url``, that upstream's models too) until
    SIGINT or SIGTERM; print the URL to open.

    Cancellation: the server stops at once and running jobs end ``interrupted``; the
    temporary folder is removed either way.
    """
    with tempfile.TemporaryDirectory(prefix="backstream-web-demo-") as workdir:
        settings = ServeSettings.defaults(
            port=port if _port_is_free(port) else 0,
            http_port=http_port if _port_is_free(http_port) else 0,
            web=True,
            store=f"sqlite:///{workdir}/demo.db",
            tools=("backstream.runtime.tools.demo:DEMO_TOOLS",),
            retention=24 * 3600.0,
            drain_timeout=0.0,
            upstream_url=upstream_url,
        )
        where = f"upstream {upstream_url} and" if upstream_url else "offline:"

        def announce(line: str) -> None:
            if line.startswith("demo chat page: "):
                url = line.removeprefix("demo chat page: ")
                print(f"\nbackstream demo chat: open {url}\n", flush=True)
                print(
                    f"  {where} models backstream/echo, backstream/lorem, backstream/tools-demo;"
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


async def _serve_and_run(settings: ServeSettings, words: int, rate: float, model: str) -> int:
    async with trio.open_nursery() as nursery:
        handle: ServeHandle = await nursery.start(
            partial(serve, settings, handle_signals=False, announce=lambda _: None)
        )
        url = f"ws://127.0.0.1:{handle.port}/v1"
        assert handle.dev_token is not None
        where = f"upstream {settings.upstream_url}" if settings.upstream_url else "offline"
        print(f"server on {url} (store: SQLite, model: {model}, {where})", file=sys.stderr)
        try:
            return await _client(url, handle.dev_token, words, rate, model)
        finally:
            handle.shutdown.set()


async def _client(url: str, token: str, words: int, rate: float, model: str) -> int:
    builtin = model.startswith("backstream/")
    progress = _Progress(words)
    async with open_client(url, token, client_name="backstream-demo") as client:
        started = await client.start_job(
            thread_id="demo-thread",
            message_id="demo-message-1",
            model=model,
            messages=[{"role": "user", "content": f"Tell me something long: about {words} words."}],
            params={"max_tokens": words, "tokens_per_s": rate} if builtin else {"max_tokens": words * 2},
        )
        job_id = started.job.job_id
        print(f"started job {job_id}: {words} words at {rate:g} words/s", file=sys.stderr)
        text, dropped, dropped_once, status = "", False, False, "?"
        async with client.watch(job_id) as batches:
            async for batch in batches:
                if dropped and batch.from_seq:
                    print(
                        f"{progress.end_line()}  resumed at seq {batch.from_seq} "
                        f"(right after {batch.from_seq - 1})",
                        file=sys.stderr,
                    )
                    dropped = False
                text += batch.text
                progress.show("watching", len(text.split()), batch.to_seq)
                if batch.terminal is not None:
                    status = batch.terminal.status
                elif not dropped_once and len(text.split()) >= words // 2:
                    dropped_once = True
                    await client.drop_connection()
                    print(
                        f"{progress.end_line()}  connection dropped at seq {batches.cursor}; "
                        "the job goes on...",
                        file=sys.stderr,
                    )
                    await trio.sleep(words / rate / 4)
                    dropped = True
        info = await client.get(job_id, include_content=True)
        print(
            f"{progress.end_line()}job {status}: {len(text)} characters in {info.job.seq} log entries\n",
            file=sys.stderr,
        )
        print(text)
        if text != info.content:
            print("MISMATCH: the text received differs from the stored answer", file=sys.stderr)
            return 1
        print("\nreceived text == stored answer: nothing lost, nothing repeated", file=sys.stderr)
        return 0
