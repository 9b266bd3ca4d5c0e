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

REPO = Path(__file__).resolve().parent.parent
JS = REPO / "clients" / "js"
CHROMIUM = os.environ.get("BACKSTREAM_CHROMIUM", "/usr/bin/chromium")


def _require(what: str, present: bool, install: str) -> None:
    if present:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {what} is missing: {install}")
    pytest.skip(f"{what} is missing: {install}")


def _node_major() -> int:
    if shutil.which("node") is None:
        return 0
    version = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout
    found = re.match(r"v(\d+)", version)
    return int(found.group(1)) if found else 0


def _node_ready() -> bool:
    return _node_major() >= 20 and (JS / "node_modules" / "ws").is_dir()


def _chromium_ready() -> bool:
    return Path(CHROMIUM).exists() and (JS / "node_modules" / "playwright-core").is_dir()


def _require_node() -> None:
    _require(
        "Node.js 20 or newer", _node_major() >= 20, "install Node.js 20+ (e.g. apt-get install nodejs npm)"
    )
    _require(
        "the client's npm dev dependencies",
        (JS / "node_modules" / "ws").is_dir(),
        "run `npm ci` in clients/js",
    )


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
    """Both runs start at once: side by side they take little more than the longer one."""
    runs: dict[str, NodeRun] = {}
    if _node_ready():
        runs["node"] = NodeRun.start("test/client.test.js", "test/recovery.test.js")
        if _chromium_ready():
            runs["chromium"] = NodeRun.start("test/browser/browser.test.js")
    yield runs
    for run in runs.values():
        run.stop()


def test_javascript_client_in_node(node_runs: dict[str, NodeRun]) -> None:
    """Every call, typed errors, drops, slow consumers, restarts, kill -9 (gone), 4401."""
    _require_node()
    node_runs["node"].check()


def test_javascript_client_and_demo_page_in_chromium(node_runs: dict[str, NodeRun]) -> None:
    """The client in the browser through a dropped socket; the page's flows, with screenshots."""
    _require_node()
    _require("Chromium", Path(CHROMIUM).exists(), "apt-get install chromium")
    _require(
        "playwright-core", (JS / "node_modules" / "playwright-core").is_dir(), "run `npm ci` in clients/js"
    )
    node_runs["chromium"].check()
