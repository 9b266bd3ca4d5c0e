"""A finished log's entries in little memory.

A live log holds one ``TextEvent`` per model token: about 70 bytes each. Once
a job has ended its log only changes by being read, so it can be kept as the
text of all its text entries in one string, an array of end offsets, and the
few other entries as they are; reading rebuilds the events it returns.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import overload

from backstream.protocol.events import LogEvent, TextEvent

__all__ = ["CompactEntries"]


class CompactEntries(Sequence[LogEvent]):
    """Entries with seq 1..n, read-only; indexing and slicing return ``LogEvent``s."""

    __slots__ = ("_ends", "_others", "_text")

    def __init__(self, entries: Iterable[LogEvent]) -> None:
        texts: list[str] = []
        ends = array("Q")
        others: dict[int, LogEvent] = {}
        end = 0
        for i, event in enumerate(entries):
            if event.seq != i + 1:
                raise ValueError(f"entry {i} has seq {event.seq}, not {i + 1}")
            if type(event) is TextEvent:
                texts.append(event.text)
                end += len(event.text)
            else:
                others[i] = event
            ends.append(end)
        self._text = "".join(texts)
        self._ends = ends
        self._others = others

    def __len__(self) -> int:
        return len(self._ends)

    def _event(self, i: int) -> LogEvent:
        other = self._others.get(i)
        if other is not None:
            return other
        start = self._ends[i - 1] if i else 0
        return TextEvent(seq=i + 1, text=self._text[start : self._ends[i]])

    @overload
    def __getitem__(self, index: int) -> LogEvent: ...

    @overload
    def __getitem__(self, index: slice) -> list[LogEvent]: ...

    def __getitem__(self, index: int | slice) -> LogEvent | list[LogEvent]:
        if isinstance(index, slice):
            return [self._event(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._event(index)

    def __iter__(self) -> Iterator[LogEvent]:
        return (self._event(i) for i in range(len(self)))

    def extend(self, more: Sequence[LogEvent]) -> None:
        """A finished log takes no more entries: only an empty ``more`` is accepted."""
        if more:
            raise ValueError("a finished log takes no more entries")
