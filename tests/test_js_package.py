"""The JavaScript package as people get it: ``npm pack`` in a fresh clone of ``clients/js``
(no ``npm ci``, so no TypeScript) makes the tarball the clients guide (docs/clients.md) installs; the ``.d.ts``
declarations it ships are committed and match the sources; the demo page's vendored Markdown
libraries are the pinned npm packages' files.

Under ``CI=true`` these run and fail if Node, npm or the npm packages are missing (``.ci/run``
installs them); elsewhere they are skipped with what to install.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from tests.node_tools import require, require_node

REPO = Path(__file__).resolve().parent.parent
JS = REPO / "clients" / "js"


def _npm() -> str:
    npm = shutil.which("npm")
    require("npm", npm is not None, "install npm (apt-get install npm)")
    assert npm is not None
    return npm


def test_npm_pack_works_in_a_fresh_clone_without_npm_ci(tmp_path: Path) -> None:
    """The clients guide's install step, as written: nothing to build, no dev dependency needed."""
    require_node(JS)
    npm = _npm()
    fresh = tmp_path / "js"
    shutil.copytree(JS, fresh, ignore=shutil.ignore_patterns("node_modules", "*.tgz"))
    packed = subprocess.run(
        [npm, "pack", "--dry-run", "--json"],
        cwd=fresh,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert packed.returncode == 0, packed.stderr[-3000:]
    (tarball,) = json.loads(packed.stdout)
    files = {entry["path"] for entry in tarball["files"]}
    assert {"package.json", "README.md", "src/backstream-client.js", "types/backstream-client.d.ts"} <= files
    for source in (JS / "src").glob("*.js"):
        assert f"src/{source.name}" in files
        assert f"types/{source.stem}.d.ts" in files
    assert not any(path.startswith(("test/", "scripts/", "node_modules/")) for path in files), sorted(files)


def test_committed_declarations_match_the_sources(tmp_path: Path) -> None:
    """``types/`` is what ``npm run build`` makes from ``src/`` now (run it after changing src/)."""
    node = require_node(JS, "typescript")
    built = subprocess.run(
        [node, "node_modules/typescript/bin/tsc", "-p", "tsconfig.build.json", "--outDir", str(tmp_path)],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    made = {path.name: path.read_text() for path in tmp_path.glob("*.d.ts")}
    committed = {path.name: path.read_text() for path in (JS / "types").glob("*.d.ts")}
    assert made, "tsc made no declarations"
    assert committed == made, "clients/js/types/ is stale: run `npm run build` in clients/js"


def test_vendored_markdown_libraries_are_the_pinned_packages_files() -> None:
    """``backstream/web/demo/vendor/`` equals what ``npm run vendor-demo`` copies from node_modules."""
    node = require_node(JS, "marked", "dompurify")
    checked = subprocess.run(
        [node, "scripts/vendor-demo.mjs", "--check"],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    assert "vendor/ matches marked, dompurify" in checked.stdout
