"""Processes of a bench run: free ports, waiting for a listener, CPU and RSS from /proc."""

from __future__ import annotations

import os
import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
