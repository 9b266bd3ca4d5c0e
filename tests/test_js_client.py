"""The JavaScript client (``clients/js``) and the demo chat page, tested by Node's own test
runner against real ``backstream serve`` processes: in Node, and in headless Chromium.

Under ``CI=true`` these run and fail if Node, the npm dev dependencies or Chromium are
missing (``.ci/run`` installs them); elsewhere they are skipped with what to install.
Screenshots of the page go to ``test-results/``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import attrs
import pytest

from tests.node_tools import CHROMIUM, node_major, require_chromium, require_node

REPO = Path(__file__).resolve().parent.parent
JS = REPO / "clients" / "js"


@pytest.fixture(scope="module")
def node() -> str:
    """Node 20+ and the client's npm dev dependencies (checked outside any trio run)."""
    return require_node(JS, "ws", "typescript")


@pytest.fixture(scope="module")
def chromium(node: str) -> str:
    """Chromium, and playwright-core to drive it."""
    path = require_chromium()
    require_node(JS, "playwright-core")
    return path


@attrs.define
class NodeRun:
    """``node --test`` over some files, its output going to a temporary file."""

    process: subprocess.Popen[bytes]
    output: IO[bytes]

    @classmethod
    def start(cls, *files: str) -> NodeRun:
        output = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        env = {
            **os.environ,
            "BACKSTREAM_PYTHON": sys.executable,
            "BACKSTREAM_TEST_RESULTS": str(REPO / "test-results"),
        }
        process = subprocess.Popen(
            ["node", "--test", "--test-concurrency=2", "--test-timeout=120000", *files],
            cwd=JS,
            env=env,
            stdout=output,
            stderr=output,
            start_new_session=True,  # its own process group: servers it started go with it
        )
        return cls(process, output)

    def check(self) -> None:
        """Wait for the run; fail with its failures unless every test passed."""
        try:
            returncode = self.process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            self._kill_group()
            returncode = self.process.wait()
        self.output.seek(0)
        report = self.output.read().decode(errors="replace")
        passed = re.search(r"^# pass (\d+)$", report, re.MULTILINE)
        failed = re.search(r"^# fail (\d+)$", report, re.MULTILINE)
        failures = "\n".join(line for line in report.splitlines() if "not ok" in line or "error:" in line)
        assert returncode == 0 and failed is not None and failed.group(1) == "0", (
            failures + "\n" + report[-6000:]
        )
        assert passed is not None and int(passed.group(1)) > 0, report[-2000:]

    def stop(self) -> None:
        self._kill_group()
        self.process.wait()
        self.output.close()

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def node_runs() -> Iterator[dict[str, NodeRun]]:
    """Both runs start at once (each where its tools are present): side by side they take
    little more than the longer one. The tests say what is missing."""
    runs: dict[str, NodeRun] = {}
    node = shutil.which("node")
    if node_major(node) >= 20 and (JS / "node_modules" / "ws").is_dir():
        runs["node"] = NodeRun.start("test/client.test.js", "test/recovery.test.js")
        if Path(CHROMIUM).exists() and (JS / "node_modules" / "playwright-core").is_dir():
            runs["chromium"] = NodeRun.start("test/browser/browser.test.js", "test/browser/demo.test.js")
    yield runs
    for run in runs.values():
        run.stop()


def test_javascript_client_in_node(node: str, node_runs: dict[str, NodeRun]) -> None:
    """Every call, typed errors, drops, slow consumers, restarts, kill -9 (gone), 4401."""
    node_runs["node"].check()


def test_javascript_client_and_demo_page_in_chromium(chromium: str, node_runs: dict[str, NodeRun]) -> None:
    """The client in the browser through a dropped socket; the page's flows, with screenshots."""
    node_runs["chromium"].check()
