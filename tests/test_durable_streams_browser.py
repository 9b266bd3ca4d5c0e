"""``createDurableChatTransport`` of ``@durable-streams/aisdk-transport`` with the real ``ai``
package, in headless Chromium, reading a backstream job's durable stream through a read-only
capability URL: reloaded mid-answer, the page resumes and shows the whole answer once
(clients/durable-streams-tests/browser-check.mjs says how)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.node_tools import CHROMIUM, require_chromium, require_node
from tests.streams_server import PACKAGE, TOKEN, streams_server


def test_a_page_reloaded_mid_answer_resumes_from_the_jobs_stream(tmp_path: Path) -> None:
    node = require_node(PACKAGE, "@durable-streams/aisdk-transport", "ai", "esbuild", "playwright-core")
    require_chromium()
    with streams_server("memory", tmp_path) as server:
        env = {
            **os.environ,
            "BACKSTREAM_URL": server.base,
            "BACKSTREAM_TOKEN": TOKEN,
            "BACKSTREAM_CHROMIUM": CHROMIUM,
        }
        done = subprocess.run(
            [node, "browser-check.mjs"], cwd=PACKAGE, env=env, capture_output=True, text=True, timeout=180
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["partialWords"] >= 10 and seen["words"] > seen["partialWords"]
