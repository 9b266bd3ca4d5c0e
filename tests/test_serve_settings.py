"""Every runtime setting reachable from ``serve``; cost control: allowed models, an output cap."""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from backstream import Config, open_runtime
from backstream.client import open_client
from backstream.protocol.errors import BadRequestError
from backstream.runtime.server.serve import configure_gc
from backstream.runtime.server.settings import OPTIONS, add_serve_arguments, load_settings, runtime_config
from tests.upstream_server import FakeUpstream
from tests.ws_helpers import raw_client, served


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser


def _sample(field: attrs.Attribute) -> tuple[str, object]:  # type: ignore[type-arg]
    """A valid value other than the default, as text and as Config holds it."""
    default = field.default
    if field.name == "upstream_headers":
        return "X-Title: backstream", {"X-Title": "backstream"}
    if field.name == "system_prompts":
        return "openai/*=Be brief.", {"openai/*": "Be brief."}
    if field.name == "continuations":
        return "llama-*=prefill", {"llama-*": "prefill"}
    if field.name == "allowed_models":
        return "openai/*", ("openai/*",)
    if field.name in ("upstream_url", "upstream_api_key"):
        return "http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1"
    if field.name == "max_output_tokens":
        return "77", 77
    if field.name == "store_wait_on":
        return "flush", "flush"
    if isinstance(default, bool):
        raise AssertionError(f"no sample for {field.name}")
    if isinstance(default, int):
        return str(default + 3), default + 3
    if isinstance(default, float):
        return str(default + 1.5), default + 1.5
    raise AssertionError(f"no sample for {field.name}")


CONFIG_FIELDS = [f for f in attrs.fields(Config)]


@pytest.mark.parametrize("field", CONFIG_FIELDS, ids=[f.name for f in CONFIG_FIELDS])
def test_every_config_field_is_a_flag_a_variable_and_a_toml_key(
    field: attrs.Attribute, tmp_path: Path
) -> None:  # type: ignore[type-arg]
    (option,) = [o for o in OPTIONS if o.config_field == field.name]
    text, expected = _sample(field)
    # The environment.
    config = runtime_config(load_settings(_parser().parse_args([]), env={option.env_name: text}))
    assert getattr(config, field.name) == expected
    # A TOML file.
    toml = tmp_path / "serve.toml"
    value = (
        f"[{text!r}]".replace("'", '"') if option.repeatable else (text if text[0].isdigit() else f'"{text}"')
    )
    if field.name == "upstream_headers":
        value = '{ "X-Title" = "backstream" }'
    toml.write_text(f"{option.name} = {value}\n")
    config = runtime_config(load_settings(_parser().parse_args(["--config", str(toml)]), env={}))
    assert getattr(config, field.name) == expected
    # A flag (but secrets), over both.
    if option.flag:
        args = _parser().parse_args([option.flag_name, text, "--config", str(toml)])
        config = runtime_config(load_settings(args, env={option.env_name: text}))
        assert getattr(config, field.name) == expected
    else:
        assert field.name == "upstream_api_key"


def test_help_shows_each_default_and_variable() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "backstream", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    flat = " ".join(shown.split())
    for option in OPTIONS:
        if option.flag:
            assert option.flag_name in flat
            assert option.env_name in flat, option.name
    assert (
        "--upstream-idle-timeout" in flat and "[default: 60.0; env BACKSTREAM_UPSTREAM_IDLE_TIMEOUT]" in flat
    )
    assert "[default: 8; env BACKSTREAM_MAX_TURNS]" in flat


def test_bad_values_name_their_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="BACKSTREAM_UPSTREAM_MAX_RETRIES: 'lots' is not an integer"):
        load_settings(_parser().parse_args([]), env={"BACKSTREAM_UPSTREAM_MAX_RETRIES": "lots"})
    with pytest.raises(ValueError, match=r"--max-turns .*must be positive"):
        load_settings(_parser().parse_args(["--max-turns", "0"]), env={})
    with pytest.raises(ValueError, match="--log-level: 'loud' is not one of"):
        load_settings(_parser().parse_args(["--log-level", "loud"]), env={})


async def test_only_allowed_models_may_be_named(upstream: FakeUpstream) -> None:
    config = Config(
        upstream_url=upstream.url, allowed_models=("openai/gpt-4o*", "!backstream/echo"), drain_timeout=0
    )
    async with served(config) as srv, raw_client(srv.url) as c:
        welcome = await c.hello()
        assert welcome["models"] == [
            "backstream/lorem",
            "backstream/tools-demo",
            "workflow/demo",
            "openai/gpt-4o*",
        ]
        messages = [{"role": "user", "content": "hi"}]
        refused = await c.request(
            "job.start", thread_id="t", message_id="m1", model="anthropic/claude", messages=messages
        )
        assert refused["code"] == "bad_request"
        assert (
            "'anthropic/claude' is not allowed" in refused["message"]
            and "openai/gpt-4o*" in refused["message"]
        )
        excluded = await c.request(
            "job.start", thread_id="t", message_id="m2", model="backstream/echo", messages=messages
        )
        assert excluded["code"] == "bad_request"
        ok = await c.request(
            "job.start", thread_id="t", message_id="m3", model="openai/gpt-4o-mini", messages=messages
        )
        assert ok["type"] == "job.started"
        builtin = await c.request(
            "job.start", thread_id="t", message_id="m4", model="backstream/lorem", messages=messages
        )
        assert builtin["type"] == "job.started"
    assert [r["model"] for r in upstream.requests] == ["openai/gpt-4o-mini"]  # nothing refused reached it


async def test_without_patterns_any_model_is_allowed(upstream: FakeUpstream) -> None:
    async with open_runtime(Config(upstream_url=upstream.url, drain_timeout=0)) as rt:
        assert rt.allowed_models()[-1] == "*" and rt.model_allowed("anything/at-all")
    async with open_runtime(Config(drain_timeout=0)) as rt:
        assert "*" not in rt.allowed_models() and "backstream/echo" in rt.allowed_models()
        with pytest.raises(BadRequestError, match="needs an upstream"):
            await rt.start_job(
                user="u",
                thread_id="t",
                message_id="m",
                model="x/y",
                messages=[{"role": "user", "content": "hi"}],
            )


async def test_max_output_tokens_caps_every_upstream_request(upstream: FakeUpstream) -> None:
    config = Config(upstream_url=upstream.url, max_output_tokens=100, drain_timeout=0)
    async with served(config) as srv, open_client(srv.url, "tok-alice") as client:
        for i, params in enumerate(({"max_tokens": 5000}, {"max_tokens": 20}, {})):
            started = await client.start_job(
                thread_id="t",
                message_id=f"m{i}",
                model="m/x",
                messages=[{"role": "user", "content": "hi"}],
                params=params,
            )
            async with client.watch(started.job.job_id) as batches:
                async for _ in batches:
                    pass
    assert [r["max_tokens"] for r in upstream.requests] == [100, 20, 100]


def test_ai_sdk_coalesce_ms_reaches_the_front_door() -> None:
    from backstream.runtime.server.serve import front_door_config

    settings = load_settings(_parser().parse_args(["--ai-sdk-coalesce-ms", "100"]), env={})
    assert front_door_config(settings).ai_sdk_coalesce_ms == 100
    assert front_door_config(load_settings(_parser().parse_args([]), env={})).ai_sdk_coalesce_ms == 0
    with pytest.raises(ValueError, match=r"--ai-sdk-coalesce-ms .*-5 is not in \[0, 10000\]"):
        front_door_config(
            load_settings(_parser().parse_args([]), env={"BACKSTREAM_AI_SDK_COALESCE_MS": "-5"})
        )


def test_gc_thresholds_come_from_flag_variable_or_file_and_python_keeps_the_defaults(tmp_path: Path) -> None:
    assert load_settings(_parser().parse_args([]), env={}).gc_thresholds == (20000, 20, 100)
    flag = load_settings(_parser().parse_args(["--gc-thresholds", "5000,10,50"]), env={})
    assert flag.gc_thresholds == (5000, 10, 50)
    assert (
        load_settings(_parser().parse_args([]), env={"BACKSTREAM_GC_THRESHOLDS": "python"}).gc_thresholds
        is None
    )
    toml = tmp_path / "serve.toml"
    toml.write_text('gc_thresholds = "1000,2,3"\n')
    assert load_settings(_parser().parse_args(["--config", str(toml)]), env={}).gc_thresholds == (1000, 2, 3)
    for bad in ("1,2", "0,1,1", "a,b,c"):
        with pytest.raises(ValueError, match="--gc-thresholds: expected three positive integers"):
            load_settings(_parser().parse_args(["--gc-thresholds", bad]), env={})


def test_configure_gc_sets_the_thresholds_and_freezes_what_is_loaded() -> None:
    before = gc.get_threshold()
    try:
        configure_gc((12345, 6, 7))
        assert gc.get_threshold() == (12345, 6, 7)
        assert gc.get_freeze_count() > 0
        gc.unfreeze()
        configure_gc(None)  # python: nothing changes
        assert gc.get_threshold() == (12345, 6, 7) and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
