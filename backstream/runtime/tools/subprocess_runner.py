"""Runs one tool call in its own process.

``python -m backstream.runtime.tools.subprocess_runner module:attribute``.

Reads the arguments as JSON on stdin; writes ``{"result": ...}`` or ``{"error": "..."}``
as JSON on stdout. The parent kills the process at the tool's timeout.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from typing import Any


def main() -> None:
    module_name, _, attribute = sys.argv[1].partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    fn = getattr(target, "fn", target)  # a Tool or a plain function
    param_class = getattr(target, "param_class", None)
    args = json.loads(sys.stdin.read() or "{}")
    try:
        call_args = (param_class(**args),) if param_class is not None else ()
        kwargs = {} if param_class is not None else args
        if inspect.iscoroutinefunction(fn):
            import trio

            result = trio.run(lambda: fn(*call_args, **kwargs))
        else:
            result = fn(*call_args, **kwargs)
        sys.stdout.write(json.dumps({"result": result}, default=str))
    except Exception as exc:
        sys.stdout.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:500]}))


if __name__ == "__main__":
    main()
