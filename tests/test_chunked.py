"""The chunked body decoder: any framing, any split into reads, gives the body back exactly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backstream.protocol.chunked import MAX_LINE, ChunkedBody, ChunkedBodyError


def encode(chunks: list[bytes], *, extension: bool, trailers: list[bytes]) -> bytes:
    out = b""
    for chunk in chunks:
        out += b"%x%s\r\n%s\r\n" % (len(chunk), b";name=value" if extension else b"", chunk)
    return out + b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"


@given(
    chunks=st.lists(st.binary(min_size=1, max_size=300), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=20),
    extension=st.booleans(),
    trailers=st.lists(st.sampled_from([b"x-usage: 5", b"etag: abc"]), max_size=2),
    after=st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n"]),
)
def test_any_framing_split_anywhere_decodes_to_the_body(
    chunks: list[bytes], cuts: list[int], extension: bool, trailers: list[bytes], after: bytes
) -> None:
    wire = encode(chunks, extension=extension, trailers=trailers) + after
    points = sorted({c % (len(wire) + 1) for c in cuts})
    decoder = ChunkedBody()
    body = b"".join(decoder.feed(wire[a:b]) for a, b in zip([0, *points], [*points, len(wire)], strict=True))
    assert body == b"".join(chunks)
    assert decoder.done
    assert decoder.leftover == after


def test_an_unfinished_body_is_not_done() -> None:
    decoder = ChunkedBody()
    assert decoder.feed(b"5\r\nhel") == b"hel"
    assert decoder.feed(b"lo\r\n") == b"lo"
    assert not decoder.done


@pytest.mark.parametrize(
    "wire",
    [
        b"zz\r\nhello\r\n",  # not hex
        b"\r\n",  # no size
        b"5\r\nhelloX\r\n",  # data longer than its size
        b"-5\r\nhello\r\n",
        b"1" * 17 + b"\r\n",  # a size no one sends
        b"5" + b" " * (MAX_LINE + 1),  # a size line without end
    ],
)
def test_broken_framing_is_refused(wire: bytes) -> None:
    with pytest.raises(ChunkedBodyError):
        ChunkedBody().feed(wire)
