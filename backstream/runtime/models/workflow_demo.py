"""The built-in ``demo`` workflow: offline, on the built-in model and tools.

A plan from the model, two tools, a person's approval, and a summary from the model: start it
as the model ``workflow/demo`` (``job.start`` with ``"workflow": "demo"``), with an input such
as ``{"expression": "6*7"}``.
"""

from __future__ import annotations

from typing import Any

from backstream.actors.workflow import workflow
from backstream.actors.workflow_run import WorkflowContext

__all__ = ["demo_workflow"]

MODEL = "backstream/echo"


@workflow(name="demo")
async def demo_workflow(ctx: WorkflowContext, input: dict[str, Any]) -> str:
    """Plan, compute, read the clock, ask a person, summarize (offline)."""
    expression = str(input.get("expression") or "6 * 7")
    plan = await ctx.model(
        MODEL, [{"role": "user", "content": f"Plan: compute {expression}, read the clock, ask, summarize."}]
    )
    await ctx.emit(f"{plan.text}\n\n")
    result = await ctx.tool("calculate", {"expression": expression})
    await ctx.emit(f"{expression} = {result.output}\n\n")
    now = await ctx.tool("clock_now", {})
    await ctx.emit(f"The time is {now.output}.\n\n")
    if not await ctx.approve(f"Write the summary of {expression} = {result.output}?"):
        return "No summary: the person declined."
    summary = await ctx.model(
        MODEL, [{"role": "user", "content": f"Summary: {expression} = {result.output} at {now.output}."}]
    )
    return summary.text
