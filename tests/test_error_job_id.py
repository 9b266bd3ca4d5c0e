"""An ``error`` that concerns a job carries its ``job_id``: the job a request named, or the
job whose watch the server ended (``id`` null). Clients route a watch's end by that field."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import trio
import trio.testing

from backstream import BadRequestError
from backstream.client import open_client
from backstream.protocol.schema import json_schema
from tests.ws_helpers import raw_client, served, start_fields

SERVER_MESSAGES = jsonschema.Draft202012Validator({**json_schema(), "$ref": "#/properties/server"})


def valid(message: dict[str, Any]) -> dict[str, Any]:
    SERVER_MESSAGES.validate(message)
    return message


async def test_errors_of_requests_that_name_a_job_carry_it(autojump_clock: trio.testing.MockClock) -> None:
    async with served() as srv, raw_client(srv.url) as alice, raw_client(srv.url) as bob:
        await alice.hello()
        await bob.hello("tok-bob")
        for kind, fields in [
            ("job.get", {}),
            ("job.watch", {}),
            ("job.abort", {}),
            ("job.approve", {"call_id": "c1", "approved": True}),
        ]:
            missing = valid(await alice.request(kind, job_id="j_missing", **fields))
            assert missing["type"] == "error" and missing["code"] == "not_found"
            assert missing["job_id"] == "j_missing", kind
        refused = valid(await alice.request("job.start", **start_fields(model="backstream/nope")))
        assert refused["code"] == "bad_request" and "job_id" not in refused  # no job yet
        unreadable = valid(await alice.request("job.get", job_id=5))
        assert unreadable["code"] == "bad_request" and "job_id" not in unreadable

        # Another user's job: the same answer as a missing one, naming only what was asked.
        job_id = (await alice.request("job.start", **start_fields()))["job"]["job_id"]
        theirs = await bob.request("job.get", job_id=job_id, id="same")
        missing = await bob.request("job.get", job_id="j_missing", id="same")
        assert theirs["job_id"] == job_id
        assert {**theirs, "job_id": None} == {**missing, "job_id": None}


async def test_a_watch_the_server_ends_names_its_job(autojump_clock: trio.testing.MockClock) -> None:
    async with served() as srv, raw_client(srv.url) as c:
        await c.hello()
        fields = start_fields(params={"max_tokens": 20, "tokens_per_s": 100})
        job_id = (await c.request("job.start", **fields))["job"]["job_id"]
        watching = await c.request("job.watch", job_id=job_id, after_seq=500)  # past where it ends
        assert watching["type"] == "job.watching"
        with trio.fail_after(30):
            ended = valid(await c.recv())
        assert ended["type"] == "error" and ended["id"] is None
        assert ended["code"] == "bad_request" and ended["job_id"] == job_id
        assert json.dumps(ended).count(job_id) == 2  # the field, and the human text


async def test_the_python_client_ends_only_the_watch_the_error_names(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fields: dict[str, Any] = {
        "thread_id": "t",
        "model": "backstream/lorem",
        "messages": [{"role": "user", "content": "x"}],
        "params": {"max_tokens": 40, "tokens_per_s": 100},
    }
    async with served() as srv, open_client(srv.url, "tok-alice") as client:
        ended = await client.start_job(message_id="m1", **fields)
        other = await client.start_job(message_id="m2", **fields)
        spans: list[tuple[int, int]] = []
        statuses: list[str] = []

        async def watch_other() -> None:
            async with client.watch(other.job.job_id) as watch:
                async for batch in watch:
                    spans.append((batch.from_seq, batch.to_seq))
                    if batch.terminal is not None:
                        statuses.append(batch.terminal.status)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_other)
                with pytest.raises(BadRequestError, match="beyond"):
                    async with client.watch(ended.job.job_id, after_seq=500) as watch:
                        async for _ in watch:
                            pass
        assert statuses == ["completed"]
        assert [start for start, _ in spans] == [1] + [end + 1 for _, end in spans[:-1]]
        assert spans[-1][1] == (await client.get(other.job.job_id)).job.seq
        assert client.reconnects == 0
