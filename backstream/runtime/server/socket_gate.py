"""Is a client keeping up? Linux socket introspection for the slow-client gate.

A batch goes to a client only when its socket can take it: few bytes still
unsent (``TIOCOUTQ``) and the kernel calls it writable. Both are needed: the
kernel charges the send buffer by its own overhead, so with many small frames
it fills while the unsent payload still looks small. Writable means a third of
the buffer is free, so a close frame still fits when the gate says no.
Every front door waits on it through ``wait_keeps_up``: the WebSocket ones through
the session core (``/v1`` before each batch, ``/v1/ai-sdk`` before each frame), closing
a client 4429 when it says no; the HTTP streams before each chunk, cutting the stream.
"""

from __future__ import annotations

import fcntl
import select
import termios

import trio

__all__ = ["SocketGate"]

POLL_INTERVAL = 0.02
"""Seconds between looks at a socket that is behind (the kernel has no event for "drained")."""


class SocketGate:
    """One per connection: the poll object is made once and reused for every batch."""

    def __init__(self, sock: trio.socket.SocketType | None, *, max_unsent_bytes: int) -> None:
        self._fileno = sock.fileno() if sock is not None else -1
        self._max_unsent = max_unsent_bytes
        self._poller: select.poll | None = None
        if sock is not None:
            self._poller = select.poll()
            self._poller.register(self._fileno, select.POLLOUT)

    @property
    def watches_a_socket(self) -> bool:
        return self._poller is not None

    def keeps_up(self) -> bool:
        """True when the socket can take another batch (always, without a socket to ask)."""
        if self._poller is None:
            return True
        try:
            unsent = int.from_bytes(
                fcntl.ioctl(self._fileno, termios.TIOCOUTQ, b"\0\0\0\0"), "little", signed=True
            )
            if unsent == 0:
                return True  # an empty send queue: writable, no second system call
            writable = bool(self._poller.poll(0))
        except OSError:
            return True  # the socket is gone; the send will say so
        return writable and unsent <= self._max_unsent

    async def wait_keeps_up(self, patience: float) -> bool:
        """Wait while the client is behind; True once the socket can take another frame,
        False if it still cannot after ``patience`` seconds.

        Cancellation: stops waiting; nothing is sent or lost."""
        if self.keeps_up():
            return True
        deadline = trio.current_time() + patience
        while not self.keeps_up():
            if trio.current_time() >= deadline:
                return False
            await trio.sleep(POLL_INTERVAL)
        return True
