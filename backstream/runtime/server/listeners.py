"""Listeners that remember each accepted stream by its peer address.

The WebSocket and HTTP libraries hand a request its peer's (host, port) but not
its socket; the slow-client gates need the socket (unsent bytes, writability).
``TrackedListener`` records each accepted stream in a ``PeerStreams`` map, weakly,
so a closed stream leaves it by itself.
"""

from __future__ import annotations

import contextlib
import socket as stdlib_socket
import ssl
import weakref
from typing import Any

import trio

__all__ = ["ListenError", "PeerStreams", "TrackedListener", "open_tcp_listener"]


class ListenError(OSError):
    """A port that cannot be listened on (in use, not permitted); says which, so that the
    operator's error can name the setting."""

    def __init__(self, errno: int | None, strerror: str, host: str, port: int) -> None:
        super().__init__(errno, strerror)
        self.host = host
        self.port = port

    def __str__(self) -> str:
        return f"cannot listen on {self.host}:{self.port}: {self.strerror}"


async def open_tcp_listener(
    host: str, port: int, *, reuse_port: bool, send_buffer: int
) -> trio.SocketListener:
    """A listening TCP socket on ``host:port`` (port 0: any free one). ``reuse_port`` lets
    several worker processes share the port; ``send_buffer`` is the kernel send buffer that
    accepted sockets inherit, which bounds what a slow reader can leave queued there.
    Raises ``ListenError`` naming the address if it cannot bind."""
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEPORT, 1)
    sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_SNDBUF, send_buffer)
    try:
        await sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ListenError(exc.errno, exc.strerror or str(exc), host, port) from exc
    sock.listen(1024)
    return trio.SocketListener(sock)


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


class TrackedListener(trio.abc.Listener[trio.abc.Stream]):
    """A TCP listener that records what it accepts in ``streams``; with ``ssl_context``, it
    speaks TLS over each connection (the recorded stream is the TCP one under it).

    TLS is wrapped inside, not around: the slow-client gates need the TCP socket under
    the TLS stream, and hypercorn reads the socket of an
    ``SSLStream`` from its ``transport_stream``."""

    def __init__(
        self,
        inner: trio.SocketListener,
        streams: PeerStreams,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._inner: trio.abc.Listener[trio.SocketStream] | trio.SSLListener[trio.SocketStream]
        self._inner = inner
        if ssl_context is not None:
            # https_compatible: HTTP clients (and browsers) close without a TLS close_notify.
            self._inner = trio.SSLListener(inner, ssl_context, https_compatible=True)
        self._streams = streams
        self.socket = inner.socket

    async def accept(self) -> trio.abc.Stream:
        """Accept the next connection (the TLS handshake happens on its first read or write).
        Cancellation: nothing is accepted."""
        stream = await self._inner.accept()
        self._streams.add(stream.transport_stream if isinstance(stream, trio.SSLStream) else stream)
        return stream

    async def aclose(self) -> None:
        """Close the listening socket. Cancellation: it is closed all the same."""
        await self._inner.aclose()
