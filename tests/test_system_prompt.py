"""The operator's system prompt (``Config.system_prompts``, ``serve --system-prompt``): added
first to a job's messages when they hold no system or developer message of their own."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from backstream import Config, open_runtime
from backstream.runtime.server.settings import add_serve_arguments, load_settings, runtime_config
from tests.test_responses_api import in_thread, served
from tests.upstream_server import FakeUpstream

USER = [{"role": "user", "content": "hi"}]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser


async def _run_jobs(
    config: Config, jobs: list[tuple[str, list[dict[str, Any]]]]
) -> list[tuple[dict[str, Any], ...]]:
    """Run each (model, messages) to its end; the messages each job's record keeps."""
    kept = []
    async with open_runtime(config) as rt:
        for i, (model, messages) in enumerate(jobs):
            started = await rt.start_job(
                user="u", thread_id="t", message_id=f"m{i}", model=model, messages=messages
            )
            await rt.wait_idle()
            record, _ = await rt.job_log(started.job.job_id, user="u")
            kept.append(record.request.messages)
    return kept


async def test_a_matching_model_gets_the_prompt_first_and_another_model_none(upstream: FakeUpstream) -> None:
    config = Config(upstream_url=upstream.url, system_prompts={"openai/*": "Be brief."}, drain_timeout=0)
    kept = await _run_jobs(config, [("openai/gpt-4o", USER), ("anthropic/claude", USER)])
    prompted = [{"role": "system", "content": "Be brief."}, *USER]
    assert [r["messages"] for r in upstream.requests] == [prompted, USER]
    assert [list(m) for m in kept] == [prompted, USER]  # the job's log holds what the model saw


async def test_built_in_models_get_it_too() -> None:
    config = Config(system_prompts={"backstream/*": "Echo this."}, drain_timeout=0)
    (kept,) = await _run_jobs(config, [("backstream/echo", USER)])
    assert list(kept) == [{"role": "system", "content": "Echo this."}, *USER]


@pytest.mark.parametrize("role", ["system", "developer"])
async def test_the_requests_own_system_message_wins(upstream: FakeUpstream, role: str) -> None:
    config = Config(upstream_url=upstream.url, system_prompts={"*": "Operator's."}, drain_timeout=0)
    own = [{"role": role, "content": "Mine."}, *USER]
    (kept,) = await _run_jobs(config, [("openai/gpt-4o", own)])
    assert upstream.requests[0]["messages"] == own
    assert list(kept) == own


async def test_the_first_matching_pattern_wins(upstream: FakeUpstream) -> None:
    prompts = {"openai/gpt-4o-mini": "Mini.", "openai/*": "Any OpenAI.", "*": "Anything."}
    config = Config(upstream_url=upstream.url, system_prompts=prompts, drain_timeout=0)
    await _run_jobs(config, [("openai/gpt-4o-mini", USER), ("openai/gpt-4o", USER), ("x/y", USER)])
    assert [r["messages"][0]["content"] for r in upstream.requests] == ["Mini.", "Any OpenAI.", "Anything."]


def test_an_empty_pattern_is_refused_by_config() -> None:
    with pytest.raises(ValueError, match=r"Config\.system_prompts needs a model pattern"):
        Config(system_prompts={" ": "text"})


def test_the_flag_splits_at_the_first_equals_and_keeps_the_order(tmp_path: Path) -> None:
    args = _parser().parse_args(
        ["--system-prompt", "openai/*=Use a=b, then c.", "--system-prompt", "*=Default."]
    )
    config = runtime_config(load_settings(args, env={}))
    assert list(config.system_prompts.items()) == [("openai/*", "Use a=b, then c."), ("*", "Default.")]


def test_a_toml_table_sets_it_in_the_order_written(tmp_path: Path) -> None:
    toml = tmp_path / "serve.toml"
    toml.write_text('[system_prompt]\n"openai/*" = "Be brief, be kind."\n"*" = "Default."\n')
    config = runtime_config(load_settings(_parser().parse_args(["--config", str(toml)]), env={}))
    assert list(config.system_prompts.items()) == [("openai/*", "Be brief, be kind."), ("*", "Default.")]
    toml.write_text('[system_prompt]\n"openai/*" = 3\n')
    with pytest.raises(ValueError, match=r"system_prompt in .*: the prompt of 'openai/\*' is not text"):
        load_settings(_parser().parse_args(["--config", str(toml)]), env={})


def test_the_variable_holds_comma_separated_entries() -> None:
    env = {"BACKSTREAM_SYSTEM_PROMPTS": "openai/*=Be brief.,*=Default."}
    config = runtime_config(load_settings(_parser().parse_args([]), env=env))
    assert config.system_prompts == {"openai/*": "Be brief.", "*": "Default."}


@pytest.mark.parametrize("entry", ["no equals sign", "=text", " =text"])
def test_a_bad_entry_is_a_one_line_error_naming_the_flag(entry: str) -> None:
    with pytest.raises(ValueError) as raised:
        load_settings(_parser().parse_args(["--system-prompt", entry]), env={})
    message = str(raised.value)
    assert message.startswith("--system-prompt: ") and "is not PATTERN=TEXT" in message
    assert "\n" not in message


async def test_the_responses_apis_instructions_win_over_the_operators_prompt(upstream: FakeUpstream) -> None:
    async with served(upstream, system_prompt=(("*", "Operator's."),)) as server:
        client = server.client()
        await in_thread(lambda: client.responses.create(model="m/x", input="hi", instructions="Mine."))
        await in_thread(lambda: client.responses.create(model="m/x", input="hi"))
    assert [r["messages"][0] for r in upstream.requests] == [
        {"role": "system", "content": "Mine."},
        {"role": "system", "content": "Operator's."},
    ]
    assert [len([m for m in r["messages"] if m["role"] == "system"]) for r in upstream.requests] == [1, 1]
