"""What text from outside becomes before anything encodes it: one rule for every decoder.

JSON can carry UTF-16 surrogates as ``\\uXXXX`` escapes. A pair split across two
escapes is one character; a surrogate without its partner is not text at all,
and no UTF-8 encoder (WebSocket frames, SQLite, Redis) accepts it. The decoders
join pairs, also across the chunks of a stream (``SurrogateJoiner``), and turn
every lone surrogate into U+FFFD, the replacement character.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["REPLACEMENT", "SurrogateJoiner", "has_surrogates", "repair_strings", "repair_surrogates"]

REPLACEMENT = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")
_HIGH_FIRST, _HIGH_LAST = "\ud800", "\udbff"


def has_surrogates(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def repair_surrogates(text: str) -> str:
    """``text`` with adjacent surrogate pairs joined and lone surrogates replaced by U+FFFD."""
    if not has_surrogates(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def repair_strings(value: Any) -> Any:
    """``repair_surrogates`` applied to every string (keys too) inside decoded JSON."""
    if isinstance(value, str):
        return repair_surrogates(value)
    if isinstance(value, dict):
        return {repair_strings(k): repair_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [repair_strings(v) for v in value]
    return value


class SurrogateJoiner:
    """One stream of text pieces (a model's content, say): a high surrogate that ends a
    piece waits for the next piece, whose low surrogate may complete it."""

    def __init__(self) -> None:
        self._held = ""

    def take(self, piece: str) -> str:
        """The text of ``piece`` that is ready: joined, repaired, maybe one character short."""
        if self._held:
            piece, self._held = self._held + piece, ""
        elif not has_surrogates(piece):
            return piece
        if piece and _HIGH_FIRST <= piece[-1] <= _HIGH_LAST:
            piece, self._held = piece[:-1], piece[-1]
        return repair_surrogates(piece)

    def flush(self) -> str:
        """End of the stream: a high surrogate still waiting becomes U+FFFD."""
        held, self._held = self._held, ""
        return REPLACEMENT if held else ""
