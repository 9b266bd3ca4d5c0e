"""A history checker for job watches: what every watch of a job showed, checked against the
contract and against each other.

A watch's history is the batches it delivered after its starting cursor. Each one must be
contiguous (a batch starts at the previous ``to_seq + 1``), never repeat or reorder an
entry, never show anything after the terminal status, and agree with every other watch
of the same job and epoch: the same non-text entry at the same ``seq``, and the same
content text up to each ``seq`` (batches merge adjacent text, so two watches from
different cursors may cut the text differently; what they must agree on is the text
through each seq they both know). At the end the content through the terminal status
must equal what ``job.get`` returns.

Used by the stateful model test (``tests/test_model_stateful.py``) and the chaos bench
(``bench/soak.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from backstream.protocol.events import Batch, LogEvent, RewindEvent, StatusEvent, TextEvent
from backstream.protocol.lifecycle import INITIAL_STATUS, IllegalTransition, check_transition

__all__ = ["History", "JobHistory", "Violation"]

_TEXT = "text"


@attrs.frozen
class Violation:
    job_id: str
    watcher: str
    kind: str  # gap, duplicate, reorder, conflict, after_terminal, two_terminals, epoch, ...
    detail: str

    def as_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class JobHistory:
    """Everything the watches of one job, in one epoch, have shown so far."""

    job_id: str
    epoch: int
    prefix: dict[int, str] = attrs.Factory(lambda: {0: ""})
    """seq -> the job's content text through that seq (known where a watch showed it)."""
    kinds: dict[int, str] = attrs.Factory(dict)
    """seq -> "text" (covered by a text event) or the kind of the non-text entry there."""
    events: dict[int, LogEvent] = attrs.Factory(dict)
    terminal_seq: int | None = None
    terminal_status: str | None = None
    complete_texts: list[tuple[str, str]] = attrs.Factory(list)
    """(watcher, joined text) of each watch from seq 0 that reached the terminal status."""

    def observe(
        self,
        watcher: str,
        after_seq: int,
        batches: Sequence[Batch],
        *,
        earlier_epochs: bool = False,
        text: str | None = None,
        whole: bool | None = None,
    ) -> tuple[list[Violation], str | None]:
        """Check one watch's whole history (from ``after_seq``) and merge it into the job's;
        return what was found and the content through its last seq (None if unknown).
        With ``earlier_epochs``, batches of an earlier epoch may lead it: a watch that
        crossed a recovery saw only durable entries, which the new epoch keeps. ``text``:
        the content through ``after_seq`` (default: as the job's watches showed it);
        ``whole``: the watch's own text covers it all (default: it began at seq 0)."""
        found: list[Violation] = []

        def bad(kind: str, detail: str) -> None:
            found.append(Violation(self.job_id, watcher, kind, detail))

        expected, previous = after_seq + 1, after_seq
        if text is None:
            text = self.prefix.get(after_seq)
        status = INITIAL_STATUS if after_seq == 0 else None
        ended = False
        for batch in batches:
            if batch.epoch != self.epoch and not (earlier_epochs and batch.epoch < self.epoch):
                bad("epoch", f"batch of epoch {batch.epoch} in a history of epoch {self.epoch}")
            if batch.from_seq != expected:
                kind = "gap" if batch.from_seq > expected else "duplicate"
                bad(kind, f"batch starts at {batch.from_seq}, expected {expected}")
            if not batch.events:
                bad("empty", f"batch {batch.from_seq}..{batch.to_seq} has no events")
                continue
            if batch.to_seq != batch.events[-1].seq:
                bad("bounds", f"batch to_seq {batch.to_seq} but its last event is {batch.events[-1].seq}")
            for event in batch.events:
                if ended:
                    bad("after_terminal", f"seq {event.seq} after the terminal status")
                if event.seq <= previous:
                    kind = "reorder" if event.seq < previous else "duplicate"
                    bad(kind, f"seq {event.seq} after {previous}")
                    continue
                text = self._merge_event(bad, previous, event, text)
                status = self._step_status(bad, status, event)
                ended = ended or (isinstance(event, StatusEvent) and event.is_terminal)
                previous = event.seq
            expected = batch.to_seq + 1
        if ended and text is not None and (after_seq == 0 if whole is None else whole):
            self.complete_texts.append((watcher, text))
        return found, text

    def _merge_event(self, bad: Any, previous: int, event: LogEvent, text: str | None) -> str | None:
        """Merge one entry; return the content through it (None if unknown)."""
        if isinstance(event, TextEvent):
            self._merge_text(bad, previous, event.seq)
            text = None if text is None else text + event.text
        else:
            self._merge_entry(bad, event)
            if isinstance(event, RewindEvent) and text is not None:
                if event.content_length > len(text):
                    bad("rewind", f"seq {event.seq}: back to {event.content_length} of {len(text)} chars")
                text = text[: event.content_length]
                self._merge_prefix(bad, event.to_seq, text)
        if text is not None:
            self._merge_prefix(bad, event.seq, text)
        return text

    def kept(self, watcher: str, seq: int, text: str) -> list[Violation]:
        """A watch was cut back to ``seq`` (its content through it ``text``): what this
        epoch's watches showed through ``seq`` must agree."""
        found: list[Violation] = []

        def bad(kind: str, detail: str) -> None:
            found.append(Violation(self.job_id, watcher, kind, detail))

        self._merge_prefix(bad, seq, text)
        return found

    def _merge_text(self, bad: Any, previous: int, seq: int) -> None:
        for covered in range(previous + 1, seq + 1):
            kind = self.kinds.setdefault(covered, _TEXT)
            if kind != _TEXT:
                bad("conflict", f"seq {covered} is text in one watch and {kind} in another")
        if self.terminal_seq is not None and seq > self.terminal_seq:
            bad("after_terminal", f"text at seq {seq} after the terminal status at {self.terminal_seq}")

    def _merge_entry(self, bad: Any, event: LogEvent) -> None:
        kind = self.kinds.setdefault(event.seq, event.kind)
        if kind != event.kind:
            bad("conflict", f"seq {event.seq} is {event.kind} in one watch and {kind} in another")
            return
        known = self.events.setdefault(event.seq, event)
        if known != event:
            bad("conflict", f"seq {event.seq}: {event!r} differs from {known!r}")
        if self.terminal_seq is not None and event.seq > self.terminal_seq:
            bad("after_terminal", f"seq {event.seq} after the terminal status at {self.terminal_seq}")
        if isinstance(event, StatusEvent) and event.is_terminal:
            if self.terminal_seq is not None and self.terminal_seq != event.seq:
                bad("two_terminals", f"terminal status at {event.seq} and at {self.terminal_seq}")
            if any(seq > event.seq for seq in self.kinds):
                bad("after_terminal", f"entries known after the terminal status at {event.seq}")
            self.terminal_seq, self.terminal_status = event.seq, event.status

    def _merge_prefix(self, bad: Any, seq: int, text: str) -> None:
        known = self.prefix.setdefault(seq, text)
        if known != text:
            bad("conflict", f"content through seq {seq} differs ({len(known)} vs {len(text)} chars)")

    @staticmethod
    def _step_status(bad: Any, status: str | None, event: LogEvent) -> str | None:
        if not isinstance(event, StatusEvent):
            return status
        if status is not None:
            try:
                check_transition(status, event.status)  # type: ignore[arg-type]
            except IllegalTransition as exc:
                bad("lifecycle", f"seq {event.seq}: {exc}")
        return event.status

    def check_final(self, status: str, content: str, last_seq: int) -> list[Violation]:
        """Compare with the job's final ``job.get``: its status, content and last seq."""
        found: list[Violation] = []

        def bad(kind: str, detail: str) -> None:
            found.append(Violation(self.job_id, "job.get", kind, detail))

        if self.terminal_seq is not None:
            if self.terminal_seq != last_seq:
                bad("stale_get", f"job.get seq {last_seq}, terminal status at {self.terminal_seq}")
            if self.terminal_status != status:
                bad("stale_get", f"job.get status {status!r}, log ends {self.terminal_status!r}")
            through = self.prefix.get(self.terminal_seq)
            if through is not None and through != content:
                bad("content", f"job.get has {len(content)} chars of content, the log {len(through)}")
        for watcher, text in self.complete_texts:
            if text != content:
                bad("content", f"{watcher} joined {len(text)} chars, job.get has {len(content)}")
        return found


@attrs.define
class History:
    """The histories of many jobs, by ``(job_id, epoch)``, and the violations found so far."""

    jobs: dict[tuple[str, int], JobHistory] = attrs.Factory(dict)
    violations: list[Violation] = attrs.Factory(list)
    watches: int = 0
    batches: int = 0
    events: int = 0

    def job(self, job_id: str, epoch: int) -> JobHistory:
        return self.jobs.setdefault((job_id, epoch), JobHistory(job_id, epoch))

    def observe(self, job_id: str, watcher: str, after_seq: int, batches: Sequence[Batch]) -> list[Violation]:
        """Record one watch. Its epoch may grow at a batch boundary (the job was recovered
        while it watched from the store): each epoch's part goes to that epoch's history,
        and the whole of it, as a prefix, to the last epoch's.

        A batch of one ``rewind`` whose ``from_seq`` is one past its ``to_seq`` is the
        client's, not the log's: the log kept less of the watch's epoch than it had shown,
        and said so (``gone`` with ``valid_through``). The watch goes on from that seq at
        the log's epoch, its text cut to the rewind's ``content_length``: what it showed
        before stands for its epoch, what follows is a watch from there."""
        self.watches += 1
        self.batches += len(batches)
        self.events += sum(len(b.events) for b in batches)
        epochs = [b.epoch for b in batches]
        if epochs != sorted(epochs):
            found = [Violation(job_id, watcher, "epoch", f"the epoch went down: {epochs}")]
            self.violations.extend(found)
            return found
        found, text, whole = [], None, None
        start, part = after_seq, list[Batch]()
        for batch in (*batches, None):
            if batch is not None and _client_rewind(batch) is None:
                part.append(batch)
                continue
            if part:
                seen, text = self._observe_part(job_id, watcher, start, part, text, whole)
                found += seen
            if batch is None:
                break
            rewind = _client_rewind(batch)
            assert rewind is not None
            if rewind.to_seq > (part[-1].to_seq if part else start):
                found.append(Violation(job_id, watcher, "rewind", f"to {rewind.to_seq}, past the watch"))
            whole = whole if whole is not None else after_seq == 0
            text = None if text is None else text[: rewind.content_length]
            if text is not None:
                found += self.job(job_id, batch.epoch).kept(watcher, rewind.to_seq, text)
            start, part = rewind.to_seq, []
        self.violations.extend(found)
        return found

    def _observe_part(
        self,
        job_id: str,
        watcher: str,
        after_seq: int,
        batches: list[Batch],
        text: str | None,
        whole: bool | None,
    ) -> tuple[list[Violation], str | None]:
        epochs = [b.epoch for b in batches]
        if len(set(epochs)) == 1:
            return self.job(job_id, epochs[0]).observe(watcher, after_seq, batches, text=text, whole=whole)
        first = [b for b in batches if b.epoch == epochs[0]]
        found, _ = self.job(job_id, epochs[0]).observe(watcher, after_seq, first, text=text, whole=whole)
        more, text = self.job(job_id, epochs[-1]).observe(
            watcher, after_seq, batches, earlier_epochs=True, text=text, whole=whole
        )
        return found + more, text

    def check_final(
        self, job_id: str, epoch: int, status: str, content: str, last_seq: int
    ) -> list[Violation]:
        found = self.job(job_id, epoch).check_final(status, content, last_seq)
        self.violations.extend(found)
        return found

    def add(self, violations: Iterable[Violation]) -> None:
        self.violations.extend(violations)


def _client_rewind(batch: Batch) -> RewindEvent | None:
    """The ``rewind`` of a batch the client made to cut a watch back (no entry of the log)."""
    events = batch.events
    if batch.from_seq == batch.to_seq + 1 and len(events) == 1 and isinstance(events[0], RewindEvent):
        return events[0]
    return None
