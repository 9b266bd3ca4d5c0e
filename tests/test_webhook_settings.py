"""Webhook settings: the endpoint syntax (flag, variable, TOML table), the secret, the
retry schedule, and their mistakes, each one line naming the setting."""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
from pathlib import Path

import pytest

from backstream.protocol.events import ErrorInfo
from backstream.protocol.webhooks import (
    DEFAULT_EVENTS,
    next_attempt_delay,
    parse_endpoint,
    parse_retry_schedule,
    response_event_type,
)
from backstream.runtime.server.settings import add_serve_arguments, load_settings
from tests.test_webhooks import SECRET


def parse(argv: list[str], env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return load_settings(parser.parse_args(argv), env if env is not None else {})


def test_an_endpoint_names_its_events_and_content_after_the_hash() -> None:
    plain = parse_endpoint("http://127.0.0.1:8000/hook")
    assert (plain.url, plain.events, plain.include_content) == (
        "http://127.0.0.1:8000/hook",
        DEFAULT_EVENTS,
        False,
    )
    chosen = parse_endpoint("https://x.example/h?a=1#events=job.*+response.completed&content=true")
    assert chosen.url == "https://x.example/h?a=1"
    assert chosen.events == {"job.ended", "job.approval_required", "response.completed"}
    assert chosen.include_content and chosen.key.startswith("ep_") and chosen.key != plain.key
    for bad, says in (
        ("ftp://x/hook", "not an http:// or https:// URL"),
        ("http:///hook", "not an http:// or https:// URL"),
        ("http://x/h#events=job.started", "'job.started' is not an event type"),
        ("http://x/h#events=", "names no event type"),
        ("http://x/h#retries=3", "unknown option 'retries'"),
    ):
        with pytest.raises(ValueError, match=says):
            parse_endpoint(bad)


def test_the_settings_come_from_flags_the_variable_and_a_toml_table(tmp_path: Path) -> None:
    env = {"BACKSTREAM_WEBHOOK_SECRET": SECRET}
    flags = parse(["--webhook", "http://a/h", "--webhook", "http://b/h#events=job.ended"], env)
    assert [e.url for e in flags.webhook] == ["http://a/h", "http://b/h"]
    from_env = parse([], {**env, "BACKSTREAM_WEBHOOKS": "http://a/h#events=response.*+job.ended,http://b/h"})
    first, second = from_env.webhook
    assert "job.ended" in first.events and second.events == DEFAULT_EVENTS
    config = tmp_path / "b.toml"
    config.write_text(
        'webhook = ["http://a/h", { url = "http://b/h", events = ["job.ended"], content = true }]\n'
        'webhook_retry_schedule = "50ms,2m"\n'
    )
    filed = parse(["--config", str(config)], env)
    assert [(e.url, e.include_content) for e in filed.webhook] == [
        ("http://a/h", False),
        ("http://b/h", True),
    ]
    assert filed.webhook[1].events == {"job.ended"}
    assert filed.webhook_retry_schedule == (0.05, 120.0)
    assert parse([], {}).webhook_retry_schedule == (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


def test_mistakes_name_the_setting() -> None:
    with pytest.raises(
        ValueError, match=r"--webhook \(BACKSTREAM_WEBHOOKS\) needs BACKSTREAM_WEBHOOK_SECRET"
    ):
        parse(["--webhook", "http://a/h"])
    with pytest.raises(ValueError, match="needs BACKSTREAM_WEBHOOK_SECRET"):
        parse(["--webhook", "http://a/h"], {"BACKSTREAM_WEBHOOK_SECRET": "plain"})
    with pytest.raises(ValueError, match=r"--webhook-retry-schedule: '5x' is not a duration"):
        parse(["--webhook-retry-schedule", "5s,5x"])
    with pytest.raises(ValueError, match=r"--webhook-ca-file .*cannot load /nonexistent\.pem"):
        parse(
            ["--webhook", "https://a/h", "--webhook-ca-file", "/nonexistent.pem"],
            {"BACKSTREAM_WEBHOOK_SECRET": SECRET},
        )


def test_serve_refuses_a_bad_endpoint_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "backstream", "serve", "--webhook", "ftp://x/hook"],
        capture_output=True, text=True, timeout=60,
        env={"BACKSTREAM_WEBHOOK_SECRET": SECRET, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip() == "backstream serve: --webhook: 'ftp://x/hook' is not an http:// or https:// URL"
    )


def test_retries_back_off_by_the_schedule_with_jitter_then_stop() -> None:
    rng = random.Random(7)
    schedule = parse_retry_schedule("5s,5m,30m")
    delays = [next_attempt_delay(schedule, n, rng) for n in (1, 2, 3)]
    for delay, base in zip(delays, schedule, strict=True):
        assert delay is not None and 0.8 * base <= delay <= 1.2 * base
    assert (
        len({d / b for d, b in zip(delays, schedule, strict=True) if d}) == 3
    )  # jittered, not a fixed factor
    assert next_attempt_delay(schedule, 4, rng) is None  # spent: dead-lettered


def test_statuses_map_to_openais_events_as_the_responses_api_shows_them() -> None:
    assert response_event_type("completed", None, "stop") == "response.completed"
    assert response_event_type("completed", None, "length") == "response.incomplete"
    assert response_event_type("failed", ErrorInfo("upstream_error", "x"), None) == "response.failed"
    assert response_event_type("failed", ErrorInfo("output_limit", "x"), None) == "response.incomplete"
    assert response_event_type("aborted", None, None) == "response.cancelled"
    assert response_event_type("interrupted", None, None) == "response.incomplete"
