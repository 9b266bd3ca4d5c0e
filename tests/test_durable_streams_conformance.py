"""The Durable Streams server conformance suite (``@durable-streams/server-conformance-tests``,
pinned in clients/durable-streams-tests) against ``backstream serve`` on each store, with
authentication on: the suite is given a capability base URL.

The package's CLI finds no test file when installed from npm, so this runs what it would run:
vitest on the package's ``dist/test-runner.js`` (the config in that directory) with
``CONFORMANCE_TEST_URL`` set. The long-poll timeout is 0.5 s, as the reference server's own run.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.node_tools import require_node
from tests.redis_servers import RedisNode, require_redis_binaries
from tests.streams_server import PACKAGE, streams_server

SUITE = "@durable-streams/server-conformance-tests"
KNOWN_FAILURES: dict[str, str] = {}
"""Tests that cannot pass, by full name, with the reason (also listed in docs/durable-streams.md)."""


def run_suite(node: str, base_url: str, workdir: Path) -> dict[str, str]:
    """Every test's full name and status (passed, failed, skipped...)."""
    report = workdir / "conformance.json"
    vitest = PACKAGE / "node_modules" / "vitest" / "vitest.mjs"
    command = [node, str(vitest), "run", "--config", "vitest.config.mjs", "--reporter=json"]
    command += [f"--outputFile={report}"]
    env = {**os.environ, "CONFORMANCE_TEST_URL": base_url, "NO_COLOR": "1"}
    done = subprocess.run(command, cwd=PACKAGE, env=env, capture_output=True, text=True, timeout=900)
    assert report.exists(), done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads(report.read_text())
    statuses: dict[str, str] = {}
    for file in results["testResults"]:
        for test in file["assertionResults"]:
            statuses[test["fullName"]] = test["status"]
    return statuses


def check(statuses: dict[str, str]) -> None:
    assert len(statuses) > 300, f"the suite ran only {len(statuses)} tests"
    failed = {name for name, status in statuses.items() if status == "failed"}
    assert failed <= set(KNOWN_FAILURES), f"failed: {sorted(failed - set(KNOWN_FAILURES))}"
    skipped = {name for name, status in statuses.items() if status not in ("passed", "failed")}
    # The suite itself skips its reserved subscription APIs unless told they exist.
    assert all(name.startswith("Reserved subscription APIs") for name in skipped), sorted(skipped)


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_conformance_suite(store: str, tmp_path: Path) -> None:
    node = require_node(PACKAGE, SUITE, "vitest")
    url = "memory" if store == "memory" else f"sqlite:///{tmp_path}/streams.db"
    with streams_server(url, tmp_path) as server:
        check(run_suite(node, server.capability_base(), tmp_path))


@pytest.mark.redis
def test_conformance_suite_on_redis(tmp_path: Path) -> None:
    node = require_node(PACKAGE, SUITE, "vitest")
    require_redis_binaries()
    redis = RedisNode(tmp_path).start()
    try:
        with streams_server(f"redis://127.0.0.1:{redis.port}/0", tmp_path) as server:
            check(run_suite(node, server.capability_base(), tmp_path))
    finally:
        redis.kill()


@pytest.mark.redis
def test_conformance_suite_on_a_redis_cluster(redis_cluster: str, tmp_path: Path) -> None:
    """Each stream's keys in a slot of their own, spread over the cluster's primaries."""
    node = require_node(PACKAGE, SUITE, "vitest")
    with streams_server(redis_cluster, tmp_path) as server:
        check(run_suite(node, server.capability_base(), tmp_path))
