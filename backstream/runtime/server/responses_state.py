"""The Responses API's conversation state: ``previous_response_id``, approvals as input
items, ``store``, ``GET /v1/responses/{id}/input_items`` and ``DELETE /v1/responses/{id}``.

A response that continues another (``previous_response_id``) is a job started with the
whole conversation (``protocol.history``): the previous response's input and output
items, then the new input. Its thread is the previous one's. ``mcp_approval_response``
items answer a server tool waiting for approval in the previous response: that response
resumes (no new job starts) and is the create's answer.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import trio

from backstream.protocol.errors import BadRequestError, NotFoundError
from backstream.protocol.events import AWAITING_APPROVAL, LogEvent, StatusEvent
from backstream.protocol.history import INPUT_MESSAGES
from backstream.protocol.records import JobRecord
from backstream.protocol.responses_input import input_items, page_items
from backstream.protocol.responses_request import ResponseRequest
from backstream.runtime.api import Runtime
from backstream.runtime.server.continued import continue_job
from backstream.runtime.server.http_app import HttpApp, Request

__all__ = ["ResponsesState", "StartWith", "awaits_approval", "own_input"]

log = logging.getLogger("backstream.responses")

_ID = r"(?P<id>[A-Za-z0-9_\-]{1,256})"


class StartWith:
    """What a create's job starts with once its previous response, if any, is read."""

    def __init__(
        self, messages: list[dict[str, Any]], annotations: dict[str, Any], thread_id: str | None
    ) -> None:
        self.messages = messages
        self.annotations = annotations
        self.thread_id = thread_id


class ResponsesState:
    """Registers the state routes on an ``HttpApp``; ``start_with`` and ``answer_approvals``
    serve the create."""

    def __init__(self, app: HttpApp) -> None:
        self._app = app
        self._runtime: Runtime = app.runtime
        app.route("GET", rf"/v1/responses/{_ID}/input_items", self._input_items)
        app.route("DELETE", rf"/v1/responses/{_ID}", self._delete)

    async def start_with(self, user: str, parsed: ResponseRequest) -> StartWith:
        """The messages, chain annotations and thread of a create's job."""
        previous = parsed.previous_response_id
        annotations = {**parsed.annotations, INPUT_MESSAGES: len(parsed.input_messages)}
        if previous is None:
            return StartWith(list(parsed.messages), annotations, parsed.thread_id)
        continued = await continue_job(
            self._runtime,
            previous,
            parsed.input_messages,
            user=user,
            param="previous_response_id",
            what="Previous response",
        )
        system = [{"role": "system", "content": parsed.instructions}] if parsed.instructions else []
        return StartWith(
            [*system, *continued.messages],
            {**annotations, **continued.annotations},
            parsed.thread_id or continued.thread_id,
        )

    async def answer_approvals(self, user: str, parsed: ResponseRequest) -> str:
        """Hand each ``mcp_approval_response`` to the previous response's waiting job; its
        id (the response that resumes). A call not waiting is a 409 ``conflict``."""
        previous = parsed.previous_response_id
        if previous is None:
            raise BadRequestError(
                "an mcp_approval_response answers a previous response: send previous_response_id too",
                param="previous_response_id",
            )
        if parsed.input_messages:
            raise BadRequestError(
                "send mcp_approval_response items alone; add messages once the response has ended",
                param="input",
            )
        for answer in parsed.approvals:
            try:
                await self._runtime.approve(previous, answer.call_id, answer.approve, user=user)
            except NotFoundError:
                raise NotFoundError(
                    f"Previous response with id '{previous}' not found.", param="previous_response_id"
                ) from None
        return previous

    async def forget(self, user: str, job_id: str) -> None:
        """Delete a ``store: false`` response (aborting it if its client left first; again
        is a no-op): shielded, bounded by ``finalize_timeout``; a failure is logged
        (the retention sweep deletes it later)."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self._runtime.config.finalize_timeout
            try:
                await self._runtime.delete_job(job_id, user=user)
            except NotFoundError:
                pass  # deleted already
            except Exception as exc:  # a cleanup: never raises
                log.warning("response %s (store=false) could not be deleted yet: %s", job_id, exc)

    # -- endpoints --------------------------------------------------------------------------

    async def _input_items(self, request: Request, match: re.Match[str]) -> None:
        record, _ = await self._runtime.job_log(match["id"], user=request.user)
        items = input_items(record.job_id, own_input(record))
        page = page_items(
            items,
            after=request.query("after"),
            before=request.query("before"),
            limit=request.query("limit"),
            order=request.query("order"),
        )
        await self._app.send_json(request, 200, page)

    async def _delete(self, request: Request, match: re.Match[str]) -> None:
        job_id = match["id"]
        await self._runtime.delete_job(job_id, user=request.user)
        await self._app.send_json(request, 200, {"id": job_id, "object": "response.deleted", "deleted": True})


def own_input(record: JobRecord) -> tuple[dict[str, Any], ...]:
    """A job's own input messages: its last ``INPUT_MESSAGES`` (what a continued
    conversation added); a job started without that count (over WebSocket) lists its
    messages less the system ones its instructions or the operator put first."""
    messages = record.request.messages
    count = record.request.annotations.get(INPUT_MESSAGES)
    if isinstance(count, int) and 0 <= count <= len(messages):
        return messages[len(messages) - count :]
    start = 0
    while start < len(messages) and messages[start].get("role") == "system":
        start += 1
    return messages[start:]


def awaits_approval(entries: Sequence[LogEvent]) -> bool:
    """Whether the last status among ``entries`` is ``awaiting_approval``."""
    for entry in reversed(entries):
        if isinstance(entry, StatusEvent):
            return entry.status == AWAITING_APPROVAL
    return False
