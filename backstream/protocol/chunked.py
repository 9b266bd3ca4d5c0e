"""An HTTP/1.1 chunked body decoder (RFC 9112, 7.1), sans-IO.

A streamed chat answer arrives as thousands of tiny HTTP chunks, one or a few per
socket read. h11 turns each into an event through its general state machine;
this decoder only splits sizes from data, so the upstream client hands it the
body once h11 has parsed the response head. It checks what h11 checks: hex
sizes, the CRLF after each chunk's data, bounded size and trailer lines.
"""

from __future__ import annotations

__all__ = ["ChunkedBody", "ChunkedBodyError"]

MAX_LINE = 8192
"""Longest size line or trailer line accepted (h11 allows 64 KiB for the whole head)."""

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)
_HEX = frozenset(b"0123456789abcdefABCDEF")


class ChunkedBodyError(ValueError):
    """The body breaks the chunked framing."""


class ChunkedBody:
    """Feed the bytes after the response head; get the body bytes they complete.

    ``done`` once the last chunk and the trailers were read; bytes after them are kept
    in ``leftover`` (a server may not send any before the next request).
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._state = _SIZE
        self._remaining = 0  # data bytes left in the current chunk
        self.leftover = b""

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> bytes:
        """The body bytes ``data`` completes (maybe none). Raises ``ChunkedBodyError``."""
        if self._state == _DONE:
            self.leftover += data
            return b""
        buffer = self._buffer + data if self._buffer else data
        out: list[bytes] = []
        at, end = 0, len(buffer)
        while at < end:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end - at)
                out.append(buffer[at : at + take])
                at += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _DATA_END
                continue
            line_end = buffer.find(b"\r\n", at)
            if line_end < 0:
                if end - at > MAX_LINE:
                    raise ChunkedBodyError("a chunk size or trailer line is too long")
                break
            line = buffer[at:line_end]
            at = line_end + 2
            if state == _SIZE:
                self._start_chunk(line)
            elif state == _DATA_END:
                if line:
                    raise ChunkedBodyError("a chunk's data is longer than its size")
                self._state = _SIZE
            elif not line:  # _TRAILER: an empty line ends the trailers and the body
                self._state = _DONE
                self.leftover = buffer[at:]
                at = end
        self._buffer = buffer[at:]
        return out[0] if len(out) == 1 else b"".join(out)

    def _start_chunk(self, line: bytes) -> None:
        size = line.split(b";", 1)[0].strip(b" \t")  # chunk extensions are ignored
        if not size or len(size) > 16 or not _HEX.issuperset(size):
            raise ChunkedBodyError(f"bad chunk size line {line[:40]!r}")
        if len(line) > MAX_LINE:
            raise ChunkedBodyError("a chunk size line is too long")
        self._remaining = int(size, 16)
        self._state = _DATA if self._remaining else _TRAILER
