"""gzip for the HTTP listener's JSON replies and event streams, for clients that ask for it.

A client that sends ``Accept-Encoding: gzip`` (httpx, the ``openai`` SDK and browsers do)
gets a JSON reply of ``MIN_GZIP_BYTES`` or more gzip'd whole, and an event stream gzip'd
as it goes: each chunk of events is compressed and flushed at once (``Z_SYNC_FLUSH``), so
every event reaches the client when it is written, never held in the compressor. A
stream's compressor keeps its context (events repeat the same JSON envelope) in a window
of ``window_bits`` with a hash table sized to it (about 12 KiB at 10 bits; zlib's
defaults would hold 262 KiB per open stream).
"""

from __future__ import annotations

import gzip
import zlib

__all__ = ["MIN_GZIP_BYTES", "GzipStream", "accepts_gzip", "gzip_body"]

MIN_GZIP_BYTES = 512
"""Smaller replies go as they are: gzip's 18 bytes of framing would eat most of the gain."""
STREAM_LEVEL = 1  # the fastest: chunks of a few events, where the repeated envelope is the gain


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an ``Accept-Encoding`` header accepts gzip (RFC 9110 12.5.3): ``gzip`` (or
    ``x-gzip``) with a q-value above 0, or else ``*`` with one."""
    if not accept_encoding:
        return False
    star: bool | None = None
    for entry in accept_encoding.split(","):
        coding, _, params = entry.partition(";")
        coding = coding.strip().lower()
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    quality = 0.0
        if coding in ("gzip", "x-gzip"):
            return quality > 0
        if coding == "*":
            star = quality > 0
    return bool(star)


def gzip_body(body: bytes) -> bytes:
    """A whole reply gzip'd (no timestamp: the same body gives the same bytes)."""
    return gzip.compress(body, compresslevel=6, mtime=0)


class GzipStream:
    """One streamed body's gzip compressor; every ``chunk`` comes out whole at once."""

    def __init__(self, window_bits: int) -> None:
        # 16 + bits: the gzip wrapper; memLevel sized to the window, as for permessage-deflate.
        self._compressor = zlib.compressobj(
            STREAM_LEVEL, zlib.DEFLATED, 16 + window_bits, max(1, window_bits - 8)
        )

    def chunk(self, data: bytes) -> bytes:
        """``data`` compressed, flushed to a byte boundary: the client can decode all of it."""
        return self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)

    def end(self) -> bytes:
        """The stream's last bytes (the gzip trailer); the compressor is then spent."""
        return self._compressor.flush(zlib.Z_FINISH)
