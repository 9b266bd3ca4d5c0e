"""trio-websocket's server, failing a connection with a close frame when a frame is bad.

wsproto reports a frame it cannot accept (a text frame that is not UTF-8: 1007; a
protocol violation: 1002) as if the peer had closed, and trio-websocket then drops
the TCP connection without a close frame, so the client learns nothing. RFC 6455
(7.1.7) asks to fail the connection: send a close frame with the code, then close.
"""

from __future__ import annotations

import contextlib

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketServer
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

__all__ = ["FailingWebSocketServer"]


class _FailingConnection(WebSocketConnection):
    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        if self._wsproto.state == ConnectionState.OPEN:  # not a close frame: wsproto failed a frame
            with contextlib.suppress(ConnectionClosed):
                await self._send(CloseConnection(code=event.code, reason=event.reason))
        await super()._handle_close_connection_event(event)


class FailingWebSocketServer(WebSocketServer):
    """A ``WebSocketServer`` whose connections answer a bad frame with a close frame."""

    async def _handle_connection(self, stream: trio.abc.Stream) -> None:
        # As trio-websocket 0.12's own, with the connection class above.
        async with trio.open_nursery() as nursery:
            connection = _FailingConnection(
                stream,
                WSConnection(ConnectionType.SERVER),
                message_queue_size=self._message_queue_size,
                max_message_size=self._max_message_size,
                receive_buffer_size=self._receive_buffer_size,
            )
            nursery.start_soon(connection._reader_task)
            with trio.move_on_after(self._connect_timeout) as connect_scope:
                request = await connection._get_request()
            if connect_scope.cancelled_caught:
                nursery.cancel_scope.cancel()
                await stream.aclose()
                return
            try:
                await self._handler(request)
            finally:
                with trio.move_on_after(self._disconnect_timeout):
                    await connection.aclose()  # shuts the reader task down even if cancelled
