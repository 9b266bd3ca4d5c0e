"""A sans-IO decoder for Server-Sent Events (the WHATWG ``text/event-stream`` format).

Feed it bytes as they arrive, in chunks of any size; it returns the complete
events. It handles LF, CRLF and CR line ends (also a CRLF split across two
reads), comment lines, multi-line ``data``, UTF-8 split across reads, and a
byte-order mark at the start.
"""

from __future__ import annotations

import codecs
import re

import attrs

__all__ = ["SSEDecoder", "SSEError", "SSEEvent"]

_LINE_END = re.compile(r"\r\n|\r|\n")


class SSEError(Exception):
    """The stream broke the format or a bound (a line longer than ``max_line_chars``)."""


@attrs.frozen
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """Turns a byte stream into ``SSEEvent`` objects.

    Bounded: a line longer than ``max_line_chars`` (the partial line is the
    only thing buffered) raises ``SSEError`` instead of growing the buffer.
    """

    def __init__(self, *, max_line_chars: int = 4 * 1024 * 1024) -> None:
        # "-sig": a byte-order mark that opens the stream is dropped, as the standard says.
        self._utf8 = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
        self._partial = ""
        self._skip_lf = False  # the last chunk ended in CR; a leading LF belongs to it
        self._max_line_chars = max_line_chars
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Decode ``data`` and return the events it completes."""
        return self._feed_text(self._utf8.decode(data))

    def close(self) -> list[SSEEvent]:
        """End of stream: flush a last line and a last event with no blank line after it.

        The standard drops an unterminated event; servers that forget the final
        blank line are common enough that keeping it is the kinder choice.
        """
        out = self._feed_text(self._utf8.decode(b"", final=True))
        if self._partial:
            self._line(self._partial, out)
            self._partial = ""
        self._dispatch(out)
        return out

    def _feed_text(self, text: str) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        if not text:
            return out
        if self._skip_lf and text[0] == "\n":
            text = text[1:]
        self._skip_lf = False
        buf = self._partial + text if self._partial else text
        if "\r" not in buf:  # the usual LF-only stream: split in C, one pass
            lines = buf.split("\n")
            self._partial = lines.pop()
            line = self._line
            for one in lines:
                line(one, out)
        else:
            pos = 0
            for match in _LINE_END.finditer(buf):
                self._line(buf[pos : match.start()], out)
                pos = match.end()
            self._partial = buf[pos:]
            if pos and pos == len(buf) and buf[-1] == "\r":
                self._skip_lf = True
        if len(self._partial) > self._max_line_chars:
            raise SSEError(f"an event-stream line is longer than {self._max_line_chars} characters")
        return out

    def _line(self, line: str, out: list[SSEEvent]) -> None:
        if not line:
            self._dispatch(out)
            return
        if line[:6] == "data: ":  # the usual field, without the general parse
            self._data.append(line[6:])
            return
        if line[0] == ":":
            return  # a comment, such as ": OPENROUTER PROCESSING"
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        # "retry" and unknown fields are ignored, as the standard says.

    def _dispatch(self, out: list[SSEEvent]) -> None:
        if self._data:
            out.append(SSEEvent(data="\n".join(self._data), event=self._event or "message", id=self._id))
        self._data = []
        self._event = ""
