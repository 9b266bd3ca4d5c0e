"""A job continued from a log that stops in the middle of a model turn: under ``prefill`` the
turn goes on from its text, under ``restart`` it runs again after a ``rewind``; either way
the answer ends whole, nothing said twice or lost (built-in models, and a real HTTP upstream
that continues, echoes the prefill as llama.cpp does, or starts over)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import pytest
import trio

from backstream.actors.config import Config
from backstream.actors.joblog import JobLog
from backstream.actors.ports import Model
from backstream.protocol.continuation import Continuation
from backstream.protocol.events import LogEvent, RewindEvent, StatusEvent, TextEvent
from backstream.protocol.lifecycle import LogOrder, LogState
from backstream.protocol.records import JobRecord, JobRequest
from backstream.runtime.models.upstream import UpstreamClient, open_http_client
from tests.job_harness import FAST, Ran, new_record, run_job
from tests.upstream_server import open_fake_upstream, prefilled

CONFIG = Config(max_output_chars=10_000)


def lorem(words: int = 12) -> JobRequest:
    return JobRequest(
        model="backstream/lorem",
        messages=({"role": "user", "content": "go"},),
        params={**FAST, "max_tokens": words},
    )


def cut_mid_turn(entries: Sequence[LogEvent], texts: int, *, nth_turn: int = 1) -> list[LogEvent]:
    """The entries up to the ``texts``-th text entry of the ``nth_turn``-th model turn."""
    order, turn, seen = LogOrder(), 0, 0
    for i, entry in enumerate(entries):
        before = order.state
        order.advance(entry)
        if before is LogState.NEXT_TURN and order.state is LogState.MODEL_TURN:
            turn += 1
        if turn == nth_turn and isinstance(entry, TextEvent):
            seen += 1
            if seen == texts:
                return list(entries[: i + 1])
    raise AssertionError("the turn has not that many text entries")


async def continued(
    record: JobRecord, prefix: list[LogEvent], policy: Continuation, model: Model | None = None
) -> Ran:
    later = attrs.evolve(record, seq=len(prefix))
    log = JobLog.from_entries(record.job_id, record.epoch, prefix, max_output_chars=CONFIG.max_output_chars)
    return await run_job(later, CONFIG, log=log, stored=prefix, continuation=policy, model=model)


def text_of(entries: Sequence[LogEvent]) -> str:
    return "".join(e.text for e in entries if isinstance(e, TextEvent))


LOREM_CYCLE = 69  # words: a lorem answer repeats itself after this many


@pytest.mark.parametrize(
    ("texts", "words"),
    [(1, 12), (2, 12), (5, 12), (11, 12), (4 * LOREM_CYCLE, 600), (LOREM_CYCLE, 100)],
)
async def test_prefill_continues_the_turn_from_its_text(texts: int, words: int) -> None:
    """Also cut where the answer starts over its lorem text: the rest then begins exactly
    like the prefill, and must not pass for an echo of it."""
    record = new_record(lorem(words))
    whole = await run_job(record, CONFIG)
    answer = whole.actor.log.content()
    prefix = cut_mid_turn(list(whole.actor.log.entries()), texts)
    again = await continued(record, prefix, Continuation.PREFILL)
    [(turn, _)] = again.model.turns
    assert turn.prefill == text_of(prefix)
    new = again.actor.log.entries(len(prefix))
    assert not any(isinstance(e, RewindEvent) for e in new)
    assert text_of(prefix) + text_of(new) == answer == again.actor.log.content()
    assert again.actor.continuation.used is Continuation.PREFILL and again.actor.continuation.regenerated == 0
    stored = await again.store.get_job(record.job_id)
    assert stored is not None and stored.status == "completed" and stored.content_length == len(answer)


async def test_restart_withdraws_the_partial_turn_and_runs_it_again() -> None:
    record = new_record(lorem())
    whole = await run_job(record, CONFIG)
    answer = whole.actor.log.content()
    prefix = cut_mid_turn(list(whole.actor.log.entries()), 4)
    again = await continued(record, prefix, Continuation.RESTART)
    [(turn, _)] = again.model.turns
    assert turn.prefill is None
    rewind = again.actor.log.entries(len(prefix))[0]
    assert rewind == RewindEvent(seq=len(prefix) + 1, to_seq=1, content_length=0)
    assert again.actor.log.content() == answer
    assert again.actor.continuation.regenerated == len(text_of(prefix))
    stored = await again.store.read(record.job_id, 0, 1000)
    assert stored == list(again.actor.log.entries())


async def test_a_tools_turn_cut_short_continues_and_counts_once_toward_max_turns() -> None:
    request = JobRequest(
        model="backstream/tools-demo",
        messages=({"role": "user", "content": "what is 6*7?"},),
        params=FAST,
        tools=("calculate",),
    )
    record = new_record(request)
    whole = await run_job(record, CONFIG)
    prefix = cut_mid_turn(list(whole.actor.log.entries()), 2, nth_turn=2)
    tight = attrs.evolve(CONFIG, max_turns=2)  # the two turns the whole job took
    later = attrs.evolve(record, seq=len(prefix))
    log = JobLog.from_entries(record.job_id, 1, prefix, max_output_chars=tight.max_output_chars)
    again = await run_job(later, tight, log=log, stored=prefix, continuation=Continuation.PREFILL)
    assert again.actor.log.content() == whole.actor.log.content()
    terminal = again.actor.log.terminal
    assert terminal is not None and terminal.status == "completed"


ANSWER = ["The answer ", "to your ", "question ", "is forty", "-two, as ", "computed."]
OTHER = ["The answer ", "is 42."]  # what an upstream that starts over says the second time


@pytest.mark.parametrize(
    ("mode", "policy", "final", "used"),
    [
        ("continue", Continuation.PREFILL, "".join(ANSWER), Continuation.PREFILL),
        ("echo", Continuation.PREFILL, "".join(ANSWER), Continuation.PREFILL),
        ("ignore", Continuation.PREFILL, "".join(OTHER), Continuation.RESTART),  # falls back
        ("ignore", Continuation.RESTART, "".join(ANSWER), Continuation.RESTART),  # asked afresh
    ],
)
async def test_an_upstream_that_continues_echoes_or_starts_over(
    mode: str, policy: Continuation, final: str, used: Continuation
) -> None:
    record = new_record(JobRequest(model="up", messages=({"role": "user", "content": "q"},)))
    async with trio.open_nursery() as nursery:
        upstream = await open_fake_upstream(nursery)
        upstream.default = prefilled(ANSWER, mode, instead=OTHER)
        config = attrs.evolve(CONFIG, upstream_url=upstream.url)
        http = open_http_client(config)
        try:
            whole = await run_job(record, config, model=UpstreamClient(config, http))
            prefix = cut_mid_turn(list(whole.actor.log.entries()), 3)  # "The answer to your question "
            again = await continued(record, prefix, policy, model=UpstreamClient(config, http))
        finally:
            await http.aclose()
        nursery.cancel_scope.cancel()
    body: dict[str, Any] = upstream.requests[-1]
    if policy is Continuation.PREFILL:
        assert body["messages"][-1] == {"role": "assistant", "content": text_of(prefix)}
        assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    else:
        assert body["messages"][-1]["role"] == "user" and "continue_final_message" not in body
    assert whole.actor.log.content() == "".join(ANSWER)
    assert again.actor.log.content() == final
    assert again.actor.continuation.used is used
    rewinds = [e for e in again.actor.log.entries() if isinstance(e, RewindEvent)]
    assert len(rewinds) == (used is Continuation.RESTART)
    terminal = again.actor.log.terminal
    assert isinstance(terminal, StatusEvent) and terminal.status == "completed"
