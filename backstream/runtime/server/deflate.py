"""permessage-deflate (RFC 7692) on the WebSocket front doors, with memory bounded per connection.

wsproto's ``PerMessageDeflate`` does the framing; ``BoundedDeflate`` bounds what it holds:

- **What is compressed**: the frames a connection streams (``job.events`` batches, every
  ``/v1/ai-sdk`` frame); replies to requests (``welcome``, ``job.started``, ``pong``,
  errors, notifications) go uncompressed (RFC 7692 lets each message choose): they are few,
  and a connection that only said ``hello`` then never allocates a compressor.
- **Outbound** (the server's compressor): at most ``window_bits`` of window, whatever the
  client offers (a smaller ``server_max_window_bits`` offer is honoured), and a hash table
  sized to the window (``memLevel = window_bits - 8``), so a connection's compressor holds
  about ``2**(window_bits + 2) + 2**(window_bits + 1)`` bytes plus zlib's 6 KB of state
  (about 12 KB at the default 10 bits, against 262 KB for zlib's defaults). The context is
  kept between messages (frames of one job repeat the same JSON envelope: it is most of the
  gain) and dropped when the connection has sent nothing for a keep-alive interval
  (``release_if_idle``): a sender may always start afresh, the client's inflater does not
  notice, and an idle connection then holds no compressor at all.
- **Inbound** (the client's messages, which are few and small): the response asks for
  ``client_no_context_takeover``, so the inflater is dropped after each message, and caps
  ``client_max_window_bits`` when the client offers it. Inflating stops past the message
  size limit (close 1009): a small compressed frame cannot expand into a large one.

Level 1 (zlib's fastest): for frames of a few hundred bytes the repeated envelope is what
compresses, and the faster level finds it as well (within 15% of the bytes of level 6, at
about half the CPU).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import attrs
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits

__all__ = ["BoundedDeflate", "DeflateSettings"]

MIN_WINDOW_BITS = 9
"""zlib's smallest raw window (it raises 8 to 9, so an offer of 8 is declined)."""
MAX_WINDOW_BITS = 15
COMPRESSION_LEVEL = 1


def _window_bits(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not MIN_WINDOW_BITS <= value <= MAX_WINDOW_BITS:
        raise ValueError(f"{attribute.name} must be in [{MIN_WINDOW_BITS}, {MAX_WINDOW_BITS}], got {value}")


@attrs.frozen(kw_only=True)
class DeflateSettings:
    """How the front doors answer a client that offers permessage-deflate."""

    window_bits: int = attrs.field(default=10, validator=_window_bits)
    """The largest LZ77 window either side may use, as a power of two (9 to 15)."""

    @property
    def mem_level(self) -> int:
        return max(1, self.window_bits - 8)


class BoundedDeflate(PerMessageDeflate):
    """wsproto's permessage-deflate with the bounds above. One per connection.

    ``max_inflated`` says how large a message the connection accepts now (asked per message:
    the first message of ``/v1`` is capped lower)."""

    def __init__(self, settings: DeflateSettings, max_inflated: Callable[[], int]) -> None:
        super().__init__()
        self._settings = settings
        self._max_inflated = max_inflated
        self._inflated = 0
        self._sent_since_look = False
        self.plain_next = False
        """Send the next message uncompressed (set just before wsproto encodes it)."""

    def accept(self, offer: str) -> str | None:
        """The response's parameters for ``offer``, or None to decline it (one offer at most
        is accepted; an offer with unknown or out-of-range parameters is declined)."""
        if self._enabled:
            return None
        params = _parse(offer)
        if params is None:
            return None
        bits = self._settings.window_bits
        response = ["client_no_context_takeover"]
        self.client_no_context_takeover = True
        if "server_no_context_takeover" in params:
            self.server_no_context_takeover = True
            response.append("server_no_context_takeover")
        if "server_max_window_bits" in params:
            offered = params["server_max_window_bits"]
            if offered is None or not MIN_WINDOW_BITS <= offered <= MAX_WINDOW_BITS:
                return None  # a value is required (RFC 7692 7.1.2.1); 8 zlib cannot honour
            bits = min(bits, offered)
            response.append(f"server_max_window_bits={bits}")
        self.server_max_window_bits = bits
        if "client_max_window_bits" in params:
            offered = params["client_max_window_bits"]
            if offered is not None and not MIN_WINDOW_BITS <= offered <= MAX_WINDOW_BITS:
                return None
            client_bits = min(self._settings.window_bits, offered or MAX_WINDOW_BITS)
            self.client_max_window_bits = client_bits
            response.append(f"client_max_window_bits={client_bits}")
        self._enabled = True
        return "; ".join(response)

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        assert self._decompressor is not None
        room = self._max_inflated() - self._inflated
        try:
            # At most one byte past the limit: enough to know it was passed.
            out = self._decompressor.decompress(bytes(data), max(room, 0) + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(out)
        if self._inflated > self._max_inflated():
            return CloseReason.MESSAGE_TOO_BIG
        return out

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if not fin:
            return None
        if not self._inbound_compressed or not self._inbound_is_compressible:
            self._inbound_compressed = None
            self._inflated = 0
            return None
        assert self._decompressor is not None
        room = self._max_inflated() - self._inflated
        try:
            data = self._decompressor.decompress(b"\x00\x00\xff\xff", max(room, 0) + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        if len(data) > room:
            return CloseReason.MESSAGE_TOO_BIG
        self._decompressor = None  # client_no_context_takeover: a fresh inflater per message
        self._inbound_compressed = None
        self._inflated = 0
        return data

    def frame_outbound(
        self, proto: FrameDecoder | FrameProtocol, opcode: Opcode, rsv: RsvBits, data: bytes, fin: bool
    ) -> tuple[RsvBits, bytes]:
        if not self._compressible_opcode(opcode):
            return (rsv, data)
        if self.plain_next:  # a message may go uncompressed: RSV1 clear, the window untouched
            if fin:
                self.plain_next = False
            return (rsv, data)
        if opcode is not Opcode.CONTINUATION:
            rsv = RsvBits(True, rsv[1], rsv[2])
        if self._compressor is None:
            self._compressor = zlib.compressobj(
                COMPRESSION_LEVEL, zlib.DEFLATED, -self.server_max_window_bits, self._settings.mem_level
            )
        compressed = self._compressor.compress(bytes(data))
        self._sent_since_look = True
        if fin:
            compressed += self._compressor.flush(zlib.Z_SYNC_FLUSH)
            compressed = compressed[:-4]  # the empty block's tail, which RFC 7692 leaves out
            if self.server_no_context_takeover:
                self._compressor = None
        return (rsv, compressed)

    def release_if_idle(self) -> bool:
        """Drop the compressor if nothing was sent since the last call (call between messages,
        e.g. from a keep-alive timer); the next message starts a fresh one. True if dropped."""
        idle = not self._sent_since_look
        self._sent_since_look = False
        if idle and self._compressor is not None:
            self._compressor = None
            return True
        return False

    @property
    def holds_compressor(self) -> bool:
        return self._compressor is not None


_KNOWN = (
    "client_no_context_takeover",
    "server_no_context_takeover",
    "client_max_window_bits",
    "server_max_window_bits",
)


def _parse(offer: str) -> dict[str, int | None] | None:
    """An offer's parameters (name to value; None for a bare one), or None if the offer
    repeats a parameter, names one RFC 7692 does not define, or gives a value that is not a
    number (such an offer is declined)."""
    params: dict[str, int | None] = {}
    for part in offer.split(";")[1:]:
        name, has_value, value = (piece.strip() for piece in part.partition("="))
        if not name:
            continue
        if name not in _KNOWN or name in params:
            return None
        if not has_value:
            params[name] = None
            continue
        value = value.strip('"')
        if not value.isdigit() or name.endswith("takeover"):
            return None
        params[name] = int(value)
    return params
