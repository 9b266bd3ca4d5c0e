"""The CPU that compression adds per frame, measured alone (the best of several repetitions,
so a busy machine overstates it little): a ``job.events`` frame of N tokens sent through
wsproto with and without ``BoundedDeflate``, and an SSE chunk of N Responses events with
and without ``GzipStream``; with the bytes each becomes.

Each repetition sends a stream of frames as one connection would (the compression context
carries from frame to frame). Tokens are words of English text ("the quick brown fox").

    python bench/compression_cost.py
    python bench/compression_cost.py --tokens 1,2,5,20 --window-bits 10,12,15
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from wsproto import ConnectionType, WSConnection  # noqa: E402
from wsproto.events import AcceptConnection, Request, TextMessage  # noqa: E402
from wsproto.extensions import PerMessageDeflate  # noqa: E402

from backstream.runtime.server.deflate import BoundedDeflate, DeflateSettings  # noqa: E402
from backstream.runtime.server.http_gzip import GzipStream  # noqa: E402
from bench._common import print_table, write_json  # noqa: E402

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "a",
    "model",
    "writes",
    "its",
    "answer",
    "one",
    "token",
    "at",
    "a",
    "time",
    "and",
    "every",
    "watcher",
    "of",
    "the",
    "job",
    "reads",
    "the",
    "same",
    "batches",
    "of",
    "words",
    "as",
    "they",
    "come",
    "in",
]


def server_connection(deflate: DeflateSettings | None) -> WSConnection:
    """A server-side wsproto connection past its handshake, with permessage-deflate if given."""
    server, client = WSConnection(ConnectionType.SERVER), WSConnection(ConnectionType.CLIENT)
    offer = [PerMessageDeflate()] if deflate else []
    server.receive_data(client.send(Request(host="h", target="/v1", extensions=offer)))
    list(server.events())
    extensions = [BoundedDeflate(deflate, lambda: 1 << 20)] if deflate else []
    server.send(AcceptConnection(extensions=extensions))
    return server


def batch_frames(tokens: int, count: int) -> list[str]:
    rng = random.Random(7)
    frames, seq = [], 1
    for _ in range(count):
        events = [{"seq": seq + i, "kind": "text", "text": " " + rng.choice(WORDS)} for i in range(tokens)]
        frame = {"type": "job.events", "job_id": "j_3f9a8c2b1d4e5f60", "epoch": 1}
        frame |= {"from_seq": seq, "to_seq": seq + tokens - 1, "events": events}
        frames.append(json.dumps(frame, separators=(",", ":")))
        seq += tokens
    return frames


def sse_chunks(tokens: int, count: int) -> list[bytes]:
    rng = random.Random(7)
    chunks, seq = [], 1
    for _ in range(count):
        lines = []
        for i in range(tokens):
            event = {
                "type": "response.output_text.delta", "sequence_number": seq + i,
                "item_id": "msg_3f9a8c2b1d4e5f60", "output_index": 0, "content_index": 0,
                "delta": " " + rng.choice(WORDS), "logprobs": [],
            }  # fmt: skip
            lines.append(f"id: 1_{seq + i}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n")
        chunks.append("".join(lines).encode())
        seq += tokens
    return chunks


def best_of(repeats: int, run: Callable[[], int]) -> tuple[float, int]:
    """The fastest of ``repeats`` runs (seconds) and the bytes it produced."""
    best, produced = float("inf"), 0
    for _ in range(repeats):
        began = time.perf_counter()
        produced = run()
        best = min(best, time.perf_counter() - began)
    return best, produced


def measure_ws(tokens: int, bits: int, frames: int, repeats: int) -> dict[str, Any]:
    texts = batch_frames(tokens, frames)
    raw_bytes = sum(len(t.encode()) for t in texts)

    def send_all(deflate: DeflateSettings | None) -> Callable[[], int]:
        def run() -> int:
            ws = server_connection(deflate)
            return sum(len(ws.send(TextMessage(data=text))) for text in texts)

        return run

    plain_s, plain_bytes = best_of(repeats, send_all(None))
    deflate_s, deflate_bytes = best_of(repeats, send_all(DeflateSettings(window_bits=bits)))
    return {
        "name": f"WebSocket, {tokens} token(s)/frame, {bits} bits",
        "payload_bytes": round(raw_bytes / frames, 1),
        "plain_wire_bytes": round(plain_bytes / frames, 1),
        "compressed_wire_bytes": round(deflate_bytes / frames, 1),
        "ratio": round(deflate_bytes / plain_bytes, 3),
        "plain_us": round(plain_s / frames * 1e6, 2),
        "compressed_us": round(deflate_s / frames * 1e6, 2),
        "added_us_per_frame": round((deflate_s - plain_s) / frames * 1e6, 2),
        "added_us_per_token": round((deflate_s - plain_s) / frames / tokens * 1e6, 2),
    }


def measure_sse(tokens: int, bits: int, chunks: int, repeats: int) -> dict[str, Any]:
    data = sse_chunks(tokens, chunks)
    raw_bytes = sum(len(d) for d in data)

    def run() -> int:
        stream = GzipStream(bits)
        return sum(len(stream.chunk(d)) for d in data) + len(stream.end())

    gzip_s, gzip_bytes = best_of(repeats, run)
    return {
        "name": f"SSE (gzip), {tokens} event(s)/write, {bits} bits",
        "payload_bytes": round(raw_bytes / chunks, 1),
        "plain_wire_bytes": round(raw_bytes / chunks, 1),
        "compressed_wire_bytes": round(gzip_bytes / chunks, 1),
        "ratio": round(gzip_bytes / raw_bytes, 3),
        "plain_us": 0.0,
        "compressed_us": round(gzip_s / chunks * 1e6, 2),
        "added_us_per_frame": round(gzip_s / chunks * 1e6, 2),
        "added_us_per_token": round(gzip_s / chunks / tokens * 1e6, 2),
    }


COLUMNS = [
    "name",
    "payload_bytes",
    "plain_wire_bytes",
    "compressed_wire_bytes",
    "ratio",
    "plain_us",
    "compressed_us",
    "added_us_per_frame",
    "added_us_per_token",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,2,5,20", help="tokens per frame (events per SSE write)")
    ap.add_argument("--window-bits", default="10,15")
    ap.add_argument("--frames", type=int, default=2000, help="frames per stream")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", help="where to write the results (default bench/results/)")
    a = ap.parse_args()
    rows = []
    for bits in (int(b) for b in a.window_bits.split(",")):
        for tokens in (int(t) for t in a.tokens.split(",")):
            rows.append(measure_ws(tokens, bits, a.frames, a.repeats))
            rows.append(measure_sse(tokens, bits, a.frames, a.repeats))
    print_table(rows, COLUMNS)
    print(f"wrote {write_json('compression_cost', {'params': vars(a), 'rows': rows}, a.json)}")


if __name__ == "__main__":
    main()
