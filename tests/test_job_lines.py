"""Each job logs its start and its end: who, which model, how it ended, how long, how much;
never its content."""

from __future__ import annotations

import json
import logging

import pytest
import trio

from backstream import Config, open_runtime
from backstream.runtime.server.serve import _JsonFormatter
from tests.helpers import collect
from tests.upstream_server import FakeUpstream, status

SECRET = "the-words-of-the-prompt"


def _lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "backstream.job" and r.getMessage().startswith("job ")]


async def test_a_job_logs_its_start_and_its_end_without_its_content(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="backstream.job")
    async with open_runtime(Config(drain_timeout=0)) as rt:
        started = await rt.start_job(
            user="alice",
            thread_id="t1",
            message_id="m1",
            model="backstream/echo",
            messages=[{"role": "user", "content": SECRET}],
        )
        batches = await collect(rt, started.job_id)
    answer = "".join(batch.text for batch in batches)
    start, end = _lines(caplog)
    assert start.getMessage().startswith(f"job started: job_id={started.job_id} user=alice thread_id=t1")
    assert start.fields == {  # type: ignore[attr-defined]
        "job_id": started.job_id,
        "user": "alice",
        "thread_id": "t1",
        "model": "backstream/echo",
        "prompt_messages": 1,
        "prompt_chars": len(SECRET),
        "tools": 0,
    }
    fields = end.fields  # type: ignore[attr-defined]
    assert (end.levelno, fields["status"], fields["error"]) == (logging.INFO, "completed", None)
    assert fields["output_chars"] == len(answer) > 0
    assert fields["entries"] == batches[-1].to_seq and fields["duration_s"] >= 0
    for record in (start, end):
        assert SECRET not in record.getMessage() and answer not in record.getMessage()
        shown = json.loads(_JsonFormatter().format(record))  # serve --log-format json
        assert shown["logger"] == "backstream.job" and shown["job_id"] == started.job_id
        assert SECRET not in json.dumps(shown)
    assert json.loads(_JsonFormatter().format(end))["status"] == "completed"


async def test_a_failed_job_logs_its_error_code_as_a_warning(
    caplog: pytest.LogCaptureFixture, upstream: FakeUpstream
) -> None:
    caplog.set_level(logging.INFO, logger="backstream.job")
    upstream.script(status(400, body='{"error":{"message":"key sk-secret is wrong"}}'))
    async with open_runtime(Config(upstream_url=upstream.url, drain_timeout=0)) as rt:
        await rt.start_job(
            user="bob",
            thread_id="t",
            message_id="m",
            model="any/model",
            messages=[{"role": "user", "content": "hi"}],
        )
        with trio.fail_after(5):
            await rt.wait_idle()
    _, end = _lines(caplog)
    assert end.levelno == logging.WARNING
    assert end.fields["status"] == "failed" and end.fields["error"]  # type: ignore[attr-defined]
    assert f"status=failed error={end.fields['error']}" in end.getMessage()  # type: ignore[attr-defined]
    assert "sk-secret" not in end.getMessage()
