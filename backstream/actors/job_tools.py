"""Client-side tools in the job actor's loop.

A job's ``client_tools`` param (``protocol.job_params``) names function tools the client
runs itself. The model is offered them with the server's tools; a turn that calls any of
them runs its server-side calls as usual (their results are logged), then the job ends
``completed`` with the client-side calls open: the client answers them in the next job of
the conversation (``previous_response_id``, ``previous_job_id``), which the server builds
from this job's log (``protocol.history``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import attrs

from backstream.actors.ports import TurnResult
from backstream.protocol.conversation import Conversation
from backstream.protocol.job_params import client_tool_names

__all__ = ["ClientTools"]

_Call = TypeVar("_Call")


@attrs.frozen
class ClientTools:
    """The client-side tools of one job: their specs for the model, and their names."""

    specs: tuple[dict[str, Any], ...]
    names: frozenset[str]

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> ClientTools:
        return cls(tuple(params.get("client_tools") or ()), client_tool_names(params))

    def split(self, calls: Iterable[_Call]) -> tuple[tuple[_Call, ...], tuple[_Call, ...]]:
        """The calls the server runs, and those left to the client (each in order)."""
        server: list[_Call] = []
        client: list[_Call] = []
        for call in calls:
            (client if getattr(call, "name", None) in self.names else server).append(call)
        return tuple(server), tuple(client)

    def server_side(self, so_far: Conversation) -> Conversation:
        """``so_far`` with only the open turn's server-side calls (a log rebuilt after a
        crash finishes those; the client-side ones stay open)."""
        server, _ = self.split(so_far.calls)
        return attrs.evolve(so_far, calls=server)

    def calls_left(self, calls: Sequence[Any]) -> bool:
        return any(call.name in self.names for call in calls)

    @staticmethod
    def ended_for_client(result: TurnResult | None) -> TurnResult:
        """The job's last turn result when it stops for the client: ``tool_calls``."""
        usage = result.usage if result is not None else None
        return TurnResult(finish_reason="tool_calls", usage=usage, tool_calls=())
