"""The JavaScript client (``clients/js``) and the demo chat page, tested by Node's own test
runner against real ``backstream serve`` processes: in Node, and in headless Chromium.

Under ``CI=true`` these run and fail if Node, the npm dev dependencies or Chromium are
missing (``.ci/run`` installs them); elsewhere they are skipped with what to install.
Screenshots of the page go to ``test-results/``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

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


def _run_node_tests(*files: str) -> None:
    _require("Node.js 20 or newer", _node_major() >= 20, "install Node.js 20+ (e.g. apt-get install nodejs npm)")
    _require("the client's npm dev dependencies", (JS / "node_modules" / "ws").is_dir(), "run `npm ci` in clients/js")
    env = {**os.environ, "BACKSTREAM_PYTHON": sys.executable, "BACKSTREAM_TEST_RESULTS": str(REPO / "test-results")}
    done = subprocess.run(
        ["node", "--test", "--test-concurrency=2", *files],
        cwd=JS,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = done.stdout + done.stderr
    passed = re.search(r"^# pass (\d+)$", report, re.MULTILINE)
    failed = re.search(r"^# fail (\d+)$", report, re.MULTILINE)
    failures = "\n".join(line for line in report.splitlines() if "not ok" in line or "error:" in line)
    assert done.returncode == 0 and failed is not None and failed.group(1) == "0", (
        failures + "\n" + report[-6000:]
    )
    assert passed is not None and int(passed.group(1)) > 0, report[-2000:]


def test_javascript_client_in_node() -> None:
    """Every call, typed errors, drops, slow consumers, restarts, kill -9 (gone), 4401."""
    _run_node_tests("test/client.test.js", "test/recovery.test.js")


def test_javascript_client_and_demo_page_in_chromium() -> None:
    """The client in the browser through a dropped socket; the page's flows, with screenshots."""
    _require("Chromium", Path(CHROMIUM).exists(), "apt-get install chromium")
    _require("playwright-core", (JS / "node_modules" / "playwright-core").is_dir(), "run `npm ci` in clients/js")
    _run_node_tests("test/browser/browser.test.js")
