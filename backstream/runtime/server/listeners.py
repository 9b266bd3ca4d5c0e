"""Listeners that remember each accepted stream by its peer address.

The WebSocket and HTTP libraries hand a request its peer's (host, port) but not
its socket; the slow-client gates need the socket (unsent bytes, writability).
``TrackedListener`` records each accepted stream in a ``PeerStreams`` map, weakly,
so a closed stream leaves it by itself.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import trio

__all__ = ["PeerStreams", "TrackedListener"]


def _peer(address: Any) -> tuple[str, int]:
    return (str(address[0]), int(address[1]))


class PeerStreams:
    """Accepted streams by peer ``(host, port)``; weak, so it never keeps one alive."""

    def __init__(self) -> None:
        self._streams: weakref.WeakValueDictionary[tuple[str, int], trio.SocketStream] = (
            weakref.WeakValueDictionary()
        )

    def add(self, stream: trio.SocketStream) -> None:
        with contextlib.suppress(OSError):  # the peer left already; its request will fail
            self._streams[_peer(stream.socket.getpeername())] = stream

    def get(self, peer: Any) -> trio.SocketStream | None:
        return self._streams.get(_peer(peer)) if peer else None

    def pop(self, peer: Any) -> trio.SocketStream | None:
        return self._streams.pop(_peer(peer), None) if peer else None


class TrackedListener(trio.abc.Listener[trio.SocketStream]):
    """A TCP listener that records what it accepts in ``streams``."""

    def __init__(self, inner: trio.SocketListener, streams: PeerStreams) -> None:
        self._inner = inner
        self._streams = streams
        self.socket = inner.socket

    async def accept(self) -> trio.SocketStream:
        """Accept the next connection. Cancellation: nothing is accepted."""
        stream = await self._inner.accept()
        self._streams.add(stream)
        return stream

    async def aclose(self) -> None:
        """Close the listening socket. Cancellation: it is closed all the same."""
        await self._inner.aclose()
