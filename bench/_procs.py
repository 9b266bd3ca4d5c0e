"""Processes of a bench run: free ports, waiting for a listener, CPU and RSS from /proc."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stable_port() -> int:
    """A free port below the kernel's ephemeral range (which starts at 32768 by default),
    for a server that must get it back after a restart: a port the kernel hands out for
    outgoing connections may be some connection's own in between."""
    for _ in range(200):
        port = random.randrange(20_000, 32_768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


class ProcessSampler:
    """Samples a process's CPU seconds and RSS from /proc until stopped (or it exits)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.cpu = 0.0
        self.peak_rss = 0
        self._stop = threading.Event()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> bool:
        ticks, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{self.pid}/statm") as f:
                rss = int(f.read().split()[1]) * page
        except OSError:
            return False
        self.cpu = (int(fields[11]) + int(fields[12])) / ticks
        self.peak_rss = max(self.peak_rss, rss)
        return True

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            if not self._sample():
                return

    def stop(self) -> None:
        """A last sample, then stop."""
        self._stop.set()
        self._thread.join()
        self._sample()


def child_pids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class ServeProcess:
    """A ``backstream serve`` process on a port of its own, which it keeps across restarts
    (clients reconnect to the same address). ``args`` follow ``serve``; ``env`` is added
    to the environment."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.port = stable_port()
        self.url = f"ws://127.0.0.1:{self.port}/v1"
        self._args = args
        self._env = env or {}
        self._cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "backstream", "serve", "--port", str(self.port), *self._args]
        self.proc = subprocess.Popen(command, env={**os.environ, **self._env}, cwd=self._cwd)
        wait_for_port(self.port, timeout=60)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def exited(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def kill(self) -> None:
        """SIGKILL if it runs; then reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
