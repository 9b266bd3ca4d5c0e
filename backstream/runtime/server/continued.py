"""Loading the stored job a new one continues (``previous_response_id``, ``previous_job_id``).

Only the user's own job is found: another user's, one that never existed and one swept
after its retention all answer the same ``NotFoundError`` (with ``param``). A job still
running cannot be continued yet (``BadRequestError``): its conversation is not complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from backstream.protocol.errors import BadRequestError, NotFoundError
from backstream.protocol.history import History, continue_conversation
from backstream.protocol.lifecycle import TERMINAL_STATUSES
from backstream.protocol.records import JobRecord
from backstream.runtime.api import Runtime

__all__ = ["Continued", "continue_job"]


class Continued:
    """What a continuing job is started with: its messages, chain annotations and thread."""

    def __init__(
        self, record: JobRecord, messages: list[dict[str, Any]], annotations: dict[str, Any]
    ) -> None:
        self.previous = record
        self.messages = messages
        self.annotations = annotations

    @property
    def thread_id(self) -> str:
        return self.previous.thread_id


async def continue_job(
    runtime: Runtime,
    job_id: str,
    new: Sequence[dict[str, Any]],
    *,
    user: str,
    param: str,
    what: str,
) -> Continued:
    """The conversation of the user's job ``job_id`` continued with ``new`` messages.
    ``what`` names the job in errors ("Previous response"); ``param`` is the field."""
    try:
        record, entries = await runtime.job_log(job_id, user=user)
    except NotFoundError:
        raise NotFoundError(f"{what} with id '{job_id}' not found.", param=param) from None
    if record.status not in TERMINAL_STATUSES:
        raise BadRequestError(
            f"{what} '{job_id}' is still {record.status}: continue it once it has ended", param=param
        )
    history = History.of(record.request, entries)
    config = runtime.config
    messages, annotations = continue_conversation(
        history, new, max_depth=config.max_chain_depth, max_bytes=config.max_chain_bytes, param=param
    )
    return Continued(record, messages, annotations)
