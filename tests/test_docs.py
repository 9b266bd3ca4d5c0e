"""The documentation holds together: the front page opens with the two commands and links every
guide, every relative link reaches a file and heading that exist, every flag of ``backstream
serve`` is in the server guide, and the front page's tour runs as written."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from backstream.runtime.server.serve import ServeHandle, serve
from backstream.runtime.server.settings import ServeSettings, load_settings, runtime_config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
GUIDES = (
    "server.md",
    "protocol.md",
    "http-apis.md",
    "clients.md",
    "tools.md",
    "stores.md",
    "continuation.md",
    "embedding.md",
    "performance.md",
    "testing.md",
    "webhooks.md",
    "workflows.md",
    "durable-streams.md",
)
# Written beside these guides; a link to it counts as reaching a file while it is on its way.
ARCHITECTURE = DOCS / "architecture.md"

FENCE = re.compile(r"^```.*?^```[^\n]*$", flags=re.M | re.S)
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")


def documents() -> list[Path]:
    return [README, ROOT / "clients" / "js" / "README.md", *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lower-cased, punctuation but ``-`` and
    ``_`` dropped, each space a ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", FENCE.sub("", path.read_text()), flags=re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_slugs_are_githubs() -> None:
    assert slug("The Vercel AI SDK: `useChat` over backstream") == "the-vercel-ai-sdk-usechat-over-backstream"
    assert slug("`job.watch`, `job.events`, `job.unwatch`") == "jobwatch-jobevents-jobunwatch"
    assert slug("Static files and `/api/config`") == "static-files-and-apiconfig"
    assert slug("The job log, `seq` and `epoch`") == "the-job-log-seq-and-epoch"


def test_every_relative_link_reaches_a_file_and_heading() -> None:
    broken = []
    checked = 0
    for path in documents():
        for target in LINK.findall(prose(path.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            checked += 1
            if linked == ARCHITECTURE and not linked.exists():
                continue
            if not linked.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert checked > 30  # the scan finds the links
    assert broken == []


def test_a_broken_link_or_anchor_is_caught(tmp_path: Path) -> None:
    """The checks above on a document made to fail them."""
    page = tmp_path / "page.md"
    page.write_text("# A `title`, here\n\n```sh\n# not a heading\n```\n\n## Twice\n\n## Twice\n")
    assert anchors(page) == {"a-title-here", "twice", "twice-1"}
    assert LINK.findall(prose("[a](b.md#c) `[x](y)` ![img](p.png)")) == ["b.md#c", "p.png"]


def test_the_front_page_opens_with_the_two_commands() -> None:
    text = README.read_text()
    before, block = text.split("```sh\n", 1)
    lines = [line for line in before.splitlines() if line.strip()]
    assert lines[0] == "# backstream"
    # one paragraph of description, a heading, one line of setting, then the commands
    assert lines[-2] == "## Two commands" and lines[-1].startswith("On a fresh clone, with only `python3`")
    paragraphs = re.split(r"\n\s*\n", before.split("## Two commands")[0].strip())
    assert len(paragraphs) == 2  # the title and the description
    assert block.split("```")[0] == (
        "./dev demo     # runs the main job on embedded defaults (offline: a built-in model)\n"
        "./dev test     # runs the whole test suite, then ruff, mypy --strict, the import rules and tsc\n"
    )


def test_the_front_page_links_every_guide_and_stays_short() -> None:
    text = README.read_text()
    for guide in (*GUIDES, "architecture.md"):
        assert f"](docs/{guide})" in text, guide
    for written in DOCS.glob("*.md"):
        assert written.name in (*GUIDES, "architecture.md"), f"{written.name} is not linked from the README"
    assert len(text.splitlines()) < 260


def test_every_serve_flag_is_in_the_server_guide() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "backstream", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    flags = re.findall(r"^ {2}(?:-\w, )?(--[a-z][a-z0-9-]*)", shown, flags=re.M)
    assert {"--help", "--config", "--port", "--max-jobs", "--upstream-header"} <= set(flags)
    guide = (DOCS / "server.md").read_text()
    missing = [flag for flag in flags if not re.search(rf"(?<![\w-]){flag}(?![\w-])", guide)]
    assert missing == []


def _tour() -> tuple[dict[str, object], str, str]:
    """The tour's job request (curl's -d), its stream's query and its Python watcher."""
    text = README.read_text().split("## A five-minute tour", 1)[1]
    body = json.loads(re.search(r"-d '(\{.*?\})'", text).group(1))  # type: ignore[union-attr]
    query = re.search(r"\$ID(\?stream=true[^\"]*)\"", text).group(1)  # type: ignore[union-attr]
    (script,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return body, query, script


@asynccontextmanager
async def tour_server() -> AsyncIterator[ServeHandle]:
    """The tour's server (one user, alice, with the token tokA) on free ports."""
    settings = ServeSettings.defaults(port=0, http_port=0, token=("tokA=alice",), store="memory", drain_timeout=0.0)
    async with trio.open_nursery() as nursery:
        handle: ServeHandle = await nursery.start(
            lambda task_status: serve(settings, handle_signals=False, announce=lambda _: None, task_status=task_status)
        )
        yield handle
        handle.shutdown.set()


async def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, check=False
        )
    )


async def test_the_tour_runs_as_written() -> None:
    body, query, script = _tour()
    async with tour_server() as handle:
        base = f"http://127.0.0.1:{handle.http_port}"
        headers = {"Authorization": "Bearer tokA"}
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:
            created = (await http.post("/v1/responses", json=body)).json()
            job_id = created["id"]
            assert created["status"] == "in_progress" and job_id.startswith("j_")
            numbers = []
            async with http.stream("GET", f"/v1/responses/{job_id}{query}") as stream:
                async for line in stream.aiter_lines():
                    if line.startswith("data: "):
                        numbers.append(json.loads(line[6:])["sequence_number"])
            assert numbers[0] == 41 and numbers == list(range(41, numbers[-1] + 1))
            code = script.replace("127.0.0.1:8765", f"127.0.0.1:{handle.port}")
            result = await run_python(code, job_id)
            assert result.returncode == 0, result.stderr
            stored = (await http.get(f"/v1/responses/{job_id}")).json()
    text, status = result.stdout.rsplit("\n", 2)[:2]
    assert status == "completed" and stored["status"] == "completed"
    assert text == stored["output"][0]["content"][0]["text"] and len(text.split()) == 200


def test_the_tools_guides_approval_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "tools.md").read_text(), flags=re.S)
    example = next(b for b in blocks if "trio.run(main)" in b)
    result = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    steps = [line.split()[1] for line in result.stdout.splitlines()[:-1]]
    assert steps.index("approval_required") < steps.index("approval") < steps.index("tool_result")
    assert result.stdout.splitlines()[-1] == (
        "completed 'Let me use send_note for that. With your approval, send_note took note sent to Bob.'"
    )


async def test_the_python_clients_example_runs() -> None:
    (example, *_) = re.findall(r"```python\n(.*?)```", (DOCS / "clients.md").read_text(), flags=re.S)
    async with tour_server() as handle:
        result = await run_python(example.replace("127.0.0.1:8765", f"127.0.0.1:{handle.port}"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello there\ncompleted 'hello there'\n"


def test_the_server_guides_toml_example_loads(tmp_path: Path) -> None:
    (example,) = re.findall(r"```toml\n(.*?)```", (DOCS / "server.md").read_text(), flags=re.S)
    path = tmp_path / "backstream.toml"
    path.write_text(example)
    settings = load_settings(argparse.Namespace(config=str(path)), env={})
    assert (settings.port, settings.http_port, settings.token) == (8765, 8766, ("tokA=alice", "tokB=bob"))
    assert runtime_config(settings).max_jobs_per_user == 4
