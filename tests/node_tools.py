"""What the Node and browser tests need: Node.js 20+, a package's npm dependencies, Chromium.

Each check runs in a sync fixture or test, outside the trio run, so that a skip keeps its
message (one raised inside a trio test says only "Skipped"). Under ``CI=true`` a missing one
fails the test instead (``.ci/run`` installs them all).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("BACKSTREAM_CHROMIUM", "/usr/bin/chromium")


def require(what: str, present: bool, install: str) -> None:
    """Fail under ``CI=true``, else skip, saying what to install, unless ``present``."""
    if present:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {what} is missing: {install}")
    pytest.skip(f"{what} is missing: {install}")


def node_major(node: str | None) -> int:
    """The major version of ``node`` (0 when there is none)."""
    if node is None:
        return 0
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout
    found = re.match(r"v(\d+)", version)
    return int(found.group(1)) if found else 0


def require_node(package: Path, *modules: str) -> str:
    """Node.js 20 or later and ``modules`` installed in ``package``; returns node's path."""
    node = shutil.which("node")
    require("Node.js 20 or newer", node_major(node) >= 20, "install Node.js 20+ (apt-get install nodejs npm)")
    assert node is not None
    for module in modules:
        installed = (package / "node_modules" / module / "package.json").exists()
        require(f"the npm package {module} of {package.name}", installed, f"run `npm ci` in {package}")
    return node


def require_chromium() -> str:
    """Chromium's path (``BACKSTREAM_CHROMIUM``, by default Debian's ``/usr/bin/chromium``)."""
    require(f"Chromium at {CHROMIUM}", Path(CHROMIUM).exists(), "apt-get install chromium")
    return CHROMIUM
