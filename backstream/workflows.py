"""Workflows: multi-step jobs written in Python, durable step by step (docs/workflows.md).

```python
from backstream.workflows import WorkflowContext, workflow

@workflow(name="triage")
async def triage(ctx: WorkflowContext, input: dict) -> str:
    plan = await ctx.model("backstream/echo", [{"role": "user", "content": input["ask"]}])
    if await ctx.approve("go on?"):
        await ctx.tool("calculate", {"expression": "6*7"})
    return plan.text
```

Register it with ``serve --workflows package.module:triage`` (or the entry-point group
``backstream.workflows``, or ``open_runtime(workflows=[triage])``) and start it with
``job.start`` naming ``"workflow": "triage"`` and an ``"input"`` object, or as the model
``workflow/triage``.
"""

from backstream.actors.workflow import ModelReply, StepFailed, ToolReply, Workflow, WorkflowContext, workflow

__all__ = ["ModelReply", "StepFailed", "ToolReply", "Workflow", "WorkflowContext", "workflow"]
