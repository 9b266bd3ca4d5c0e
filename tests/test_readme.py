"""The embedding guide's example runs as written."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

GUIDE = pathlib.Path(__file__).parent.parent / "docs" / "embedding.md"


def test_embedding_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    example = next(b for b in blocks if "open_runtime" in b and "trio.run(main)" in b)
    result = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "completed 'hello there'" in result.stdout
    assert "1 status" in result.stdout and "text hello" in result.stdout
