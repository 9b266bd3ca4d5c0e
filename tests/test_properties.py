"""Properties over any upstream chunking and any cursor, end to end."""

from __future__ import annotations

import json
from functools import partial

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backstream import Config, MemoryStore, open_runtime
from backstream.protocol.codec import dumps
from backstream.protocol.events import TextEvent
from tests.helpers import check_contiguous, collect, joined_text, terminal
from tests.upstream_server import finish_chunk, open_fake_upstream, raw, text_chunk, usage_chunk

tokens = st.lists(st.text(min_size=1, max_size=12), min_size=0, max_size=25)


def sse_bytes(texts: list[str], eol: str) -> bytes:
    chunks = [text_chunk(t) for t in texts] + [finish_chunk(), usage_chunk()]
    body = "".join(f"data: {json.dumps(c, ensure_ascii=False)}{eol}{eol}" for c in chunks)
    return (body + f"data: [DONE]{eol}{eol}").encode()


async def scenario(texts: list[str], eol: str, cuts: list[int], cursor_fraction: float) -> None:
    stream = sse_bytes(texts, eol)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    async with trio.open_nursery() as nursery:
        upstream = await open_fake_upstream(nursery)
        upstream.script(raw(pieces))
        store = MemoryStore()
        config = Config(upstream_url=upstream.url, drain_timeout=0, flush_events=3)
        async with open_runtime(config, store=store) as rt:
            started = await rt.start_job(
                user="u",
                thread_id="t",
                message_id="m",
                model="m",
                messages=[{"role": "user", "content": "x"}],
            )
            full = await collect(rt, started.job_id, user="u")
            check_contiguous(full)
            assert terminal(full).status == "completed"
            assert joined_text(full) == "".join(texts)
            await rt.wait_idle()
            last = terminal(full).seq
            cursor = int(cursor_fraction * last)
            part = await collect(rt, started.job_id, user="u", after_seq=cursor)
            check_contiguous(part, after_seq=cursor)
            entries = await store.read(started.job_id, 0, 10_000)
            assert [e.seq for e in entries] == list(range(1, last + 1))
            expected = "".join(e.text for e in entries if isinstance(e, TextEvent) and e.seq > cursor)
            assert joined_text(part) == expected
        nursery.cancel_scope.cancel()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    texts=tokens,
    eol=st.sampled_from(["\n", "\r\n", "\r"]),
    cuts=st.lists(st.integers(min_value=0, max_value=100_000), max_size=20),
    cursor_fraction=st.floats(min_value=0, max_value=1),
)
def test_any_chunking_any_cursor_gives_exactly_the_content_after_it(
    texts: list[str], eol: str, cuts: list[int], cursor_fraction: float
) -> None:
    trio.run(
        partial(scenario, texts, eol, cuts, cursor_fraction),
        clock=trio.testing.MockClock(autojump_threshold=0),
    )


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),  # any code point, lone surrogates included
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


@given(json_values)
def test_frames_encode_to_the_json_the_standard_library_would(value: object) -> None:
    # orjson where it can, the standard library for what orjson refuses: the same JSON value.
    text = dumps(value)
    assert json.loads(text) == json.loads(json.dumps(value, ensure_ascii=False))
