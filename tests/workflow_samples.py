"""Workflows and a counting tool for the workflow tests (``serve --workflows
tests.workflow_samples:WORKFLOWS --tools tests.workflow_samples:count``).

``count`` appends its label to the file named by ``BACKSTREAM_TEST_COUNT_FILE``: a test reads
the file to see how many times each step's tool ran, across server processes.
``BACKSTREAM_TEST_VARIANT=edited`` makes ``steps`` ask for another tool at its third step,
as a workflow whose code changed between a crash and the restart.
"""

from __future__ import annotations

import os
from typing import Any

from backstream.runtime.tools.registry import tool
from backstream.workflows import WorkflowContext, workflow


def _count(label: str) -> str:
    """Count a step: append its label to the count file."""
    with open(os.environ["BACKSTREAM_TEST_COUNT_FILE"], "a", encoding="utf-8") as out:
        out.write(label + "\n")
        out.flush()
        os.fsync(out.fileno())
    return f"counted {label}"


count = tool(_count, name="count", timeout=5)


@workflow(name="steps")
async def steps(ctx: WorkflowContext, input: dict[str, Any]) -> str:
    """``n`` counting steps, each followed by a pause of ``pause`` seconds."""
    n, pause = int(input.get("n", 5)), float(input.get("pause", 0))
    for i in range(n):
        name = "clock_now" if i == 2 and os.environ.get("BACKSTREAM_TEST_VARIANT") == "edited" else "count"
        reply = await ctx.tool(name, {"label": f"s{i}"} if name == "count" else {})
        await ctx.emit(f"{reply.output};")
        if pause:
            await ctx.sleep(pause)
    return "done"


@workflow(name="gated")
async def gated(ctx: WorkflowContext, input: dict[str, Any]) -> str:
    """Count, ask a person, count again if approved."""
    await ctx.tool("count", {"label": "before"})
    if not await ctx.approve(str(input.get("prompt", "go on?"))):
        return "declined"
    await ctx.tool("count", {"label": "after"})
    return "approved"


@workflow(name="many")
async def many(ctx: WorkflowContext, input: dict[str, Any]) -> int:
    """``n`` recorded steps of its own, each a small computation."""
    total = 0
    for i in range(int(input.get("n", 1000))):
        total += await ctx.step(f"add {i}", lambda i=i: i)
    return total


@workflow(name="broken")
async def broken(ctx: WorkflowContext, input: dict[str, Any]) -> str:
    """A step, then an exception of its own."""
    await ctx.step("one", lambda: 1)
    raise KeyError("no such thing")


@workflow(name="shout")
async def shout(ctx: WorkflowContext, input: dict[str, Any]) -> str:
    """What the user asked (``input["ask"]``, as the chat endpoints give it), in capitals."""
    loud = await ctx.step("upper", lambda: str(input.get("ask", "")).upper())
    await ctx.emit("You said: ")
    return str(loud)


WORKFLOWS = [steps, gated, many, broken, shout]
