"""Projections: what one front door makes of a job's log, numbered so a client can resume.

Sans-IO. The replay driver (``runtime.server.replay``) reads a job's log as batches, first
what it holds (unpaced, when the projection asks for it), then as it grows, and hands each
batch to a projection, which returns the items that batch adds beyond the client's offset:

- ``BatchProjection``: ``/v1``'s ``job.events`` batches, numbered by the log's ``seq``;
- ``UIChunkProjection``: the AI SDK's UI message chunks, numbered by their index;
- ``ResponsesProjection``: the Responses API's streaming events, by ``sequence_number``.

A projection numbered by its own items (not by ``seq``) replays from the log's first entry
and skips what the client has; its numbering must be a pure function of the log, so it
reads the entries as stored (``merge_text`` false). A new front door (e.g. Durable Streams)
is one more class with the same four members.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from backstream.protocol.events import Batch
from backstream.protocol.responses import ResponseSource, ResponsesTranslator
from backstream.protocol.ui_chunks import UIChunk, UIChunkTranslator

__all__ = ["BatchProjection", "Projection", "ResponsesProjection", "UIChunkProjection"]

ItemT = TypeVar("ItemT")


class Projection(Protocol[ItemT]):
    """Batches of a job's log in, numbered items out."""

    merge_text: bool
    """Whether adjacent text entries may come merged (only if numbering does not depend on it)."""
    tool_call_deltas: bool
    """Whether the ``tool_call_delta`` entries are wanted."""
    replays_unpaced: bool
    """Whether what the log holds is read at once (a replay) before the paced follow."""

    def begin(self, after: int) -> int:
        """Told the number of the last item the client has (-1 for none); returns the log
        ``seq`` to read after. Called once, before ``project``."""
        ...

    @property
    def next_number(self) -> int:
        """The number the next item will have: the batches projected so far made the items
        numbered below it (those the client has included)."""
        ...

    def fresh(self) -> Projection[ItemT]:
        """A projection like this one that has projected nothing yet (``begin`` not called)."""
        ...

    def project(self, batch: Batch) -> list[ItemT]:
        """The items ``batch`` adds that are numbered beyond the client's offset, in order.
        Batches come in ``seq`` order, none skipped."""
        ...


class BatchProjection:
    """``/v1``: each batch is the item, numbered by its ``to_seq``; resumes at any ``seq``."""

    merge_text = True
    replays_unpaced = False

    def __init__(self, *, tool_call_deltas: bool) -> None:
        self.tool_call_deltas = tool_call_deltas
        self._next = 0

    def fresh(self) -> BatchProjection:
        return BatchProjection(tool_call_deltas=self.tool_call_deltas)

    def begin(self, after: int) -> int:
        self._next = after + 1
        return after

    @property
    def next_number(self) -> int:
        return self._next

    def project(self, batch: Batch) -> list[Batch]:
        self._next = batch.to_seq + 1
        return [batch]


class UIChunkProjection:
    """The AI SDK's UI message chunks, numbered from 0 by their index in the whole message;
    with ``from_call``, numbered from 0 at the first chunk after that call's decision.
    ``approval_tools``: the tools that ask for approval (see ``UIChunkTranslator``)."""

    merge_text = False
    tool_call_deltas = True
    replays_unpaced = True

    def __init__(
        self,
        job_id: str,
        *,
        from_call: str | None = None,
        approval_tools: frozenset[str] = frozenset(),
        message_id: str | None = None,
    ) -> None:
        self.translator = UIChunkTranslator(
            message_id=message_id or job_id, job_id=job_id, approval_tools=approval_tools
        )
        self._job_id, self._approval_tools, self._message_id = job_id, approval_tools, message_id
        self._from_call = from_call
        self._base: int | None = 0 if from_call is None else None
        self._after = -1

    @property
    def paused(self) -> bool:
        """The last entry left the job waiting for an approval."""
        return self.translator.paused

    def begin(self, after: int) -> int:
        self._after = after
        return 0

    @property
    def next_number(self) -> int:
        return 0 if self._base is None else self.translator.emitted - self._base

    def fresh(self) -> UIChunkProjection:
        return UIChunkProjection(
            self._job_id,
            from_call=self._from_call,
            approval_tools=self._approval_tools,
            message_id=self._message_id,
        )

    def project(self, batch: Batch) -> list[UIChunk]:
        out: list[UIChunk] = []
        translator = self.translator
        for event in batch.events:
            chunks = translator.feed(event)
            if self._base is None and self._from_call in translator.segment_starts:
                self._base = translator.segment_starts[self._from_call]
            if self._base is None:
                continue
            index = translator.emitted - len(chunks) - self._base
            out += [chunk for i, chunk in enumerate(chunks, start=index) if i > self._after]
        return out


class ResponsesProjection:
    """The Responses API's streaming events, numbered by ``sequence_number`` from 0
    (``response.created``, then ``response.in_progress``, then the log's events)."""

    merge_text = False
    tool_call_deltas = True
    replays_unpaced = True

    def __init__(self, source: ResponseSource) -> None:
        self.translator = ResponsesTranslator(source)
        self._source = source
        self._after = -1
        self._started = False

    @property
    def finished(self) -> bool:
        return self.translator.finished

    @property
    def next_sequence_number(self) -> int:
        return self.translator.next_sequence_number

    def begin(self, after: int) -> int:
        self._after = after
        return 0

    @property
    def next_number(self) -> int:
        return self.translator.next_sequence_number

    def fresh(self) -> ResponsesProjection:
        return ResponsesProjection(self._source)

    def opening(self) -> list[dict[str, Any]]:
        """``response.created`` and ``response.in_progress`` (those beyond the offset): what a
        stream says before the log has anything. ``project`` gives them first otherwise."""
        if self._started:
            return []
        self._started = True
        return [event for event in self.translator.start() if event["sequence_number"] > self._after]

    def project(self, batch: Batch) -> list[dict[str, Any]]:
        events = self.opening()
        for entry in batch.events:
            events += [e for e in self.translator.feed(entry) if e["sequence_number"] > self._after]
        return events
