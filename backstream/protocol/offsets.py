"""Stream offsets: where a reader of a job's stream is, fenced by the log's epoch.

Sans-IO. An offset names the last item a client has (a log ``seq`` for ``/v1``, an event's
``sequence_number`` for the Responses API, a chunk's index for the AI SDK) and the epoch of
the log it was read from. A job recovered at a new epoch numbers its log afresh, so an
offset of an older epoch means nothing any more: the replay driver answers it ``gone``.

A job taken over keeps its log up to where the old epoch had written it durably
(``JobRecord.epoch_ends``), so an offset of an older epoch at or before that point goes on
at the new epoch; past it, the reader saw items that were lost (at most one flush), and
``stale_epoch_error`` tells it the last item of its view that stands.

On the wire an offset is ``"<epoch>_<seq>"``; a bare ``"<seq>"`` (what OpenAI's SDK sends
as ``starting_after``) is accepted and carries no epoch, so it is not fenced.
"""

from __future__ import annotations

import re
from typing import Final

import attrs

from backstream.protocol.errors import BadRequestError, GoneError

__all__ = ["NO_OFFSET", "StreamOffset", "parse_offset", "stale_epoch_error"]

_MAX_OFFSET_CHARS: Final = 40
_OFFSET: Final = re.compile(r"(?:(?P<epoch>[0-9]{1,18})_)?(?P<seq>-1|[0-9]{1,18})")


@attrs.frozen
class StreamOffset:
    """The last item a client has (``seq``; -1 for none) and, if known, its log's epoch."""

    seq: int = -1
    epoch: int | None = None

    def encode(self) -> str:
        """The wire form: ``"<epoch>_<seq>"``, or the bare ``seq`` when the epoch is unknown."""
        return str(self.seq) if self.epoch is None else f"{self.epoch}_{self.seq}"

    def after(self, seq: int) -> StreamOffset:
        """The offset of item ``seq`` of the same epoch."""
        return StreamOffset(seq, self.epoch)


NO_OFFSET: Final = StreamOffset()
"""From the start, at whatever epoch the log is."""


def parse_offset(raw: str | None, *, name: str) -> StreamOffset:
    """Read an offset a client sent as ``name``; ``None`` or empty is ``NO_OFFSET``.

    Raises ``BadRequestError`` (its ``param`` extra is ``name``) for anything else than
    ``"<epoch>_<seq>"`` or a bare ``seq``, with ``seq`` -1 or more and ``epoch`` 1 or more.
    """
    if raw is None or raw == "":
        return NO_OFFSET
    match = _OFFSET.fullmatch(raw.strip()) if len(raw) <= _MAX_OFFSET_CHARS else None
    if match is None:
        raise BadRequestError(f'{name} must be a sequence number or an offset "<epoch>_<seq>"', param=name)
    epoch = None if match["epoch"] is None else int(match["epoch"])
    if epoch == 0:
        raise BadRequestError(f"{name}: epochs start at 1", param=name)
    return StreamOffset(int(match["seq"]), epoch)


def stale_epoch_error(epoch: int, valid_through: int | None, **extra: int) -> GoneError:
    """``gone`` for a reader whose offset is of an epoch before the log's ``epoch``.

    With ``valid_through`` (the reader's numbering: a ``seq``, an event's or a chunk's
    number), what the reader has up to that item stands and what it has beyond was lost:
    it drops that and resumes from ``"<epoch>_<valid_through>"``. Without, its epoch is
    unknown to the log: it reloads the job. ``extra`` goes into the error as is (``/v1``
    adds ``content_length``, the content's length at ``valid_through``).
    """
    if valid_through is None:
        return GoneError(f"the job's log is at epoch {epoch}; load the result with job.get")
    return GoneError(
        f"the job was taken over at epoch {epoch}: what was read after {valid_through} was lost; "
        f"drop it and resume from {epoch}_{valid_through}",
        valid_through=valid_through,
        epoch=epoch,
        **extra,
    )
