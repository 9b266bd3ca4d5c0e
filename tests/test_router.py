"""The model router: precedence (embedded, built-in, upstream), ``allowed_models`` and the
errors a start gets for a model it may not name."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import backstream
from backstream import Config
from backstream.actors.ports import ChatTurn, OutputSink, TurnResult
from backstream.protocol.records import JobRequest
from backstream.runtime.models.builtin import EchoModel, LoremModel
from backstream.runtime.models.router import ModelRouter
from backstream.runtime.models.upstream import UpstreamClient, open_http_client

MSG = ({"role": "user", "content": "hi"},)


class Mine:
    async def run_turn(self, turn: ChatTurn, sink: OutputSink) -> TurnResult:
        raise NotImplementedError


def ask(model: str, **params: object) -> JobRequest:
    return JobRequest(model=model, messages=MSG, params=dict(params))


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamClient]:
    config = Config(upstream_url="http://127.0.0.1:9/v1")
    http = open_http_client(config)  # connects only when a turn runs
    try:
        yield UpstreamClient(config, http)
    finally:
        await http.aclose()


def test_embedded_models_come_first_then_built_ins() -> None:
    mine = Mine()
    router = ModelRouter(Config(), {"mine": mine, "backstream/echo": mine}, None)
    assert router.resolve(ask("mine")) is mine
    assert router.resolve(ask("backstream/echo")) is mine  # an embedded one overrides a built-in
    assert isinstance(router.resolve(ask("backstream/lorem", max_tokens=3)), LoremModel)
    assert router.is_local("mine") and router.is_local("backstream/anything")
    assert not router.is_local("gpt-4o")


def test_without_an_upstream_only_embedded_and_built_in_models_resolve() -> None:
    router = ModelRouter(Config(), {}, None)
    assert isinstance(router.resolve(ask("backstream/echo")), EchoModel)
    with pytest.raises(backstream.BadRequestError, match="needs an upstream") as caught:
        router.resolve(ask("gpt-4o"))
    assert caught.value.code == "bad_request"
    with pytest.raises(backstream.BadRequestError, match="unknown built-in model"):
        router.resolve(ask("backstream/nope"))
    with pytest.raises(backstream.BadRequestError, match="tokens_per_s"):
        router.resolve(ask("backstream/lorem", tokens_per_s=-1))
    assert router.allowed_models() == [
        "backstream/echo",
        "backstream/lorem",
        "backstream/tools-demo",
        "workflow/demo",
    ]


async def test_an_upstream_serves_every_other_name_unless_patterns_narrow_it(
    upstream: UpstreamClient,
) -> None:
    anything = ModelRouter(Config(), {}, upstream)
    assert anything.resolve(ask("any/model")) is upstream
    assert anything.allowed_models()[-1] == "*" and anything.model_allowed("any/model")
    config = Config(allowed_models=("openai/gpt-4o*", "!backstream/echo", "!openai/gpt-4o-mini"))
    narrow = ModelRouter(config, {"mine": Mine()}, upstream)
    assert narrow.resolve(ask("openai/gpt-4o")) is upstream
    assert not narrow.model_allowed("openai/gpt-4o-mini")  # excluded, though a pattern matches
    assert not narrow.model_allowed("backstream/echo")  # built-ins can be excluded too
    assert narrow.model_allowed("mine") and narrow.model_allowed("backstream/lorem")
    with pytest.raises(backstream.BadRequestError, match="not allowed on this server") as caught:
        narrow.resolve(ask("anthropic/claude"))
    assert "openai/gpt-4o*" in str(caught.value)
    assert narrow.allowed_models() == [
        "backstream/lorem",
        "backstream/tools-demo",
        "mine",
        "workflow/demo",
        "openai/gpt-4o*",
    ]
