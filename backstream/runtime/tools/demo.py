"""``send_note``: a demo tool that needs a person's approval.

It sends nothing anywhere: it answers that the note was accepted, so that the approval flow
(``approval_required``, ``job.approve``, ``tool_result``) can be shown and tested offline with
the ``backstream/tools-demo`` model. ``backstream demo --web`` registers it
(``--tools backstream.runtime.tools.demo:DEMO_TOOLS``).
"""

from __future__ import annotations

from backstream.runtime.tools.registry import Tool, tool

__all__ = ["DEMO_TOOLS", "send_note"]


def _send_note(to: str, text: str) -> str:
    """Send a short note to someone (demo: nothing leaves the server). Needs approval."""
    return f"a note of {len(text)} characters for {to} (a demo tool: it sends nothing anywhere)"


send_note: Tool = tool(_send_note, name="send_note", timeout=5, requires_approval=True)
DEMO_TOOLS: list[Tool] = [send_note]
