"""A watch of one job that survives dropped connections: ``ClientWatch``.

It subscribes (``job.watch``) from its cursor, the last ``seq`` it delivered, on the
transport's live session; when that session breaks, its channel closes and the next
``__anext__`` subscribes again from the cursor on a new one, so the batches it yields join
with no gap and no repeat. The ``error`` that ends a watch on the server's side (routed here
by its ``job_id``) is resumed after a pause if ``unavailable``, else raised, typed.

After a takeover, a watch whose cursor is past what the log kept of its epoch is told
(``gone`` with ``valid_through``): it yields one batch holding a ``rewind`` to that ``seq``
(``from_seq`` one past ``to_seq``: no entry of the log), cuts ``content`` back, and goes
on from there at the new epoch.
"""

from __future__ import annotations

from contextlib import suppress

import trio

from backstream.client.transport import WATCH_BUFFER, Session, Transport, WatchItem, error_from_message
from backstream.protocol.backoff import Backoff
from backstream.protocol.errors import BackstreamError, GoneError, UnavailableError
from backstream.protocol.events import Batch, RewindEvent, TextEvent
from backstream.protocol.messages import ErrorMessage, JobUnwatch, JobWatch, JobWatching

__all__ = ["ClientWatch"]

_MAX_OUTAGE_STEP = 8
"""The pause after the watch ended ``unavailable`` grows for this many outages in a row, then stays."""


class ClientWatch:
    """An async iterator of ``Batch`` that reconnects and resumes from its cursor.

    ``cursor`` is the last ``seq`` delivered. Raises ``GoneError`` if the log
    moved to another epoch while disconnected and lost what the cursor names without
    saying where (a cursor past what the log kept it says: the watch rewinds, see the
    module), and the other typed errors of ``job.watch``. ``content`` is the answer's text
    so far as the batches delivered it, less what a ``rewind`` withdrew (a turn that ran
    again after a crash, or a cut back after a takeover); exact for a watch from the log's
    start (``after_seq`` 0).
    """

    def __init__(self, transport: Transport, job_id: str, after_seq: int, epoch: int | None) -> None:
        self._transport = transport
        self.job_id = job_id
        self.cursor = after_seq
        self.epoch = epoch
        self.ended = False
        self.content = ""
        self._channel: trio.MemoryReceiveChannel[WatchItem] | None = None
        self._outages = Backoff(0.2, 5.0, jitter="full")
        self._session: Session | None = None
        self._rewound: Batch | None = None  # to yield next: the cut back to what the log kept

    def __aiter__(self) -> ClientWatch:
        return self

    async def __anext__(self) -> Batch:
        """The next batch, subscribing again from the cursor after a dropped connection.

        Cancellation: safe; nothing is lost: the next call goes on from the cursor.
        """
        while not self.ended:
            if self._rewound is not None:
                batch, self._rewound = self._rewound, None
                return batch
            if self._channel is None:
                await self._subscribe()
                continue
            try:
                message = await self._channel.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                self._channel = None  # the connection dropped: resubscribe from the cursor
                continue
            if isinstance(message, ErrorMessage):
                await self._ended_by_server(message)
                continue
            if message.from_seq != self.cursor + 1:
                raise UnavailableError(f"batch starts at {message.from_seq}, expected {self.cursor + 1}")
            batch = Batch(
                message.job_id, message.epoch, message.from_seq, message.to_seq, tuple(message.events)
            )
            self.cursor, self.epoch = batch.to_seq, batch.epoch
            self._take_text(batch)
            if batch.terminal is not None:
                self.ended = True
            return batch
        raise StopAsyncIteration

    def _take_text(self, batch: Batch) -> None:
        for event in batch.events:
            if isinstance(event, TextEvent):
                self.content += event.text
            elif isinstance(event, RewindEvent):
                self.content = self.content[: event.content_length]

    async def _ended_by_server(self, error: ErrorMessage) -> None:
        """The server ended this watch: a passing outage (``unavailable``) is resumed from the
        cursor after a pause; anything else (``gone``: reload the job) is raised, typed."""
        self._channel = None
        if error.code != "unavailable":
            exc = error_from_message(error)
            if not self._rewind(exc):
                raise exc
        self._outages.attempt = min(self._outages.attempt, _MAX_OUTAGE_STEP)
        await trio.sleep(self._outages.next_delay())

    async def _subscribe(self) -> None:
        transport = self._transport
        while True:
            session = await transport.session()
            send, receive = trio.open_memory_channel[WatchItem](WATCH_BUFFER)
            session.watches[self.job_id] = send
            message = JobWatch(
                id=transport.next_id(), job_id=self.job_id, after_seq=self.cursor, epoch=self.epoch
            )
            try:
                reply = await transport.request(message, JobWatching, session)
            except UnavailableError:
                session.watches.pop(self.job_id, None)
                continue  # lost the connection meanwhile; the next session resumes
            except GoneError as exc:
                session.watches.pop(self.job_id, None)
                if self._rewind(exc):
                    continue  # watch again from what the log kept
                raise
            except BackstreamError:
                session.watches.pop(self.job_id, None)
                raise
            self._channel, self._session = receive, session
            self._outages.reset()
            if reply.job.is_terminal and reply.job.seq <= self.cursor:
                self.ended = True  # nothing after the cursor: the job is complete
            return

    def _rewind(self, exc: BackstreamError) -> bool:
        """Take a ``gone`` that says what of this watch's view the log kept: cut back to it
        (the next batch says so) and go on at the log's epoch. False if it does not say."""
        kept, length, epoch = (exc.extra.get(k) for k in ("valid_through", "content_length", "epoch"))
        if not (isinstance(kept, int) and isinstance(length, int) and isinstance(epoch, int)):
            return False
        if not 0 <= kept <= self.cursor:
            return False
        event = RewindEvent(seq=kept, to_seq=kept, content_length=length)
        self._rewound = Batch(self.job_id, epoch, kept + 1, kept, (event,))
        self.cursor, self.epoch = kept, epoch
        self.content = self.content[:length]
        return True

    async def aclose(self) -> None:
        """End this watch on the server (``job.unwatch``) if its connection is still open.

        Cancellation: the server may not have ended the watch; it does when the connection ends.
        """
        session, self._session = self._session, None
        if session is None or session.closed.is_set():
            return
        session.watches.pop(self.job_id, None)
        if not self.ended:
            with suppress(BackstreamError, trio.TooSlowError):
                await self._transport.request(
                    JobUnwatch(id=self._transport.next_id(), job_id=self.job_id), object, session
                )
