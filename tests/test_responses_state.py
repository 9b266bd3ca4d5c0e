"""Conversation state over the Responses API, driven by the official ``openai`` package:
``previous_response_id``, ``input_items``, ``DELETE``, ``store: false``, client-side
function tools (OpenAI's function-calling guide) and approvals as MCP approval items."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
import trio

from backstream.client import open_client
from tests.test_responses_api import in_thread, served
from tests.upstream_server import FakeUpstream, events, finish_chunk, streams, tool_chunk


def calls(*pieces: tuple[str, str, str]) -> Any:
    """A turn of the upstream that calls tools: (call id, name, arguments) each."""
    chunks = [tool_chunk(i, call_id=c, name=n, arguments=a) for i, (c, n, a) in enumerate(pieces)]
    return events([*chunks, finish_chunk("tool_calls"), "[DONE]"])


def roles_and_text(messages: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(m["role"], m.get("content")) for m in messages]


async def test_a_three_turn_conversation_by_previous_response_id_only(upstream: FakeUpstream) -> None:
    upstream.script(streams(["Hello ", "Ann"]), streams(["You are ", "Ann"]), streams(["Bye"]))
    async with served(upstream) as server:
        client = server.client()
        first = await in_thread(
            lambda: client.responses.create(model="m", input="I am Ann", instructions="be brief")
        )
        second = await in_thread(
            lambda: client.responses.create(model="m", input="Who am I?", previous_response_id=first.id)
        )
        assert second.output_text == "You are Ann"
        third = await in_thread(
            lambda: client.responses.create(
                model="m", input="bye", previous_response_id=second.id, instructions="be kind"
            )
        )
        assert third.output_text == "Bye" and third.status == "completed"
        # Each turn sent the whole conversation upstream; a response's own instructions go
        # first, an earlier one's are not carried over (as OpenAI does).
        assert roles_and_text(upstream.requests[1]["messages"]) == [
            ("user", "I am Ann"),
            ("assistant", "Hello Ann"),
            ("user", "Who am I?"),
        ]
        assert roles_and_text(upstream.requests[2]["messages"]) == [
            ("system", "be kind"),
            ("user", "I am Ann"),
            ("assistant", "Hello Ann"),
            ("user", "Who am I?"),
            ("assistant", "You are Ann"),
            ("user", "bye"),
        ]
        # The whole chain is one thread.
        async with open_client(server.ws_url, "tok-alice") as ws:
            threads = {(await ws.get(r.id)).job.thread_id for r in (first, second, third)}
        assert len(threads) == 1


async def test_input_items_are_paged_as_openai_pages_them_and_delete_removes(upstream: FakeUpstream) -> None:
    upstream.script(streams(["one"]), streams(["two"]))
    async with served(upstream) as server:
        client = server.client()
        items: Any = [
            {"role": "user", "content": f"m{i}"} if i % 2 == 0 else {"role": "assistant", "content": f"m{i}"}
            for i in range(5)
        ]
        first = await in_thread(lambda: client.responses.create(model="m", input=items, instructions="x"))
        listed = await in_thread(lambda: client.responses.input_items.list(first.id, order="asc"))
        assert [item.content[0].text for item in listed.data] == ["m0", "m1", "m2", "m3", "m4"]  # type: ignore[union-attr]
        assert listed.data[0].type == "message" and listed.data[0].role == "user"  # type: ignore[union-attr]
        newest = await in_thread(lambda: client.responses.input_items.list(first.id, limit=2))
        assert [item.content[0].text for item in newest.data] == ["m4", "m3"]  # type: ignore[union-attr]
        assert (
            newest.has_more and newest.first_id == newest.data[0].id and newest.last_id == newest.data[1].id
        )
        # The SDK's auto-paging follows ``after`` = last_id through every page.
        every = await in_thread(
            lambda: [i.content[0].text for i in client.responses.input_items.list(first.id, limit=2)]  # type: ignore[union-attr]
        )
        assert every == ["m4", "m3", "m2", "m1", "m0"]
        auth = {"Authorization": "Bearer tok-alice"}
        async with httpx.AsyncClient(base_url=server.base_url, headers=auth) as http:
            before = await http.get(
                f"/responses/{first.id}/input_items",
                params={"before": listed.data[3].id, "order": "asc", "limit": 2},
            )
            assert [i["content"][0]["text"] for i in before.json()["data"]] == ["m1", "m2"]
            assert before.json()["has_more"] is True
            bad = await http.get(f"/responses/{first.id}/input_items", params={"limit": 101})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
        # A continued response lists only its own input.
        second = await in_thread(
            lambda: client.responses.create(model="m", input="next", previous_response_id=first.id)
        )
        own = await in_thread(lambda: client.responses.input_items.list(second.id))
        assert [item.content[0].text for item in own.data] == ["next"]  # type: ignore[union-attr]
        # Another user can neither list nor delete it; DELETE removes it for its owner.
        bob = server.client("tok-bob")
        for call in (
            lambda: bob.responses.input_items.list(first.id),
            lambda: bob.responses.delete(first.id),
        ):
            with pytest.raises(openai.NotFoundError):
                await in_thread(call)
        await in_thread(lambda: client.responses.delete(first.id))
        for call in (
            lambda: client.responses.retrieve(first.id),
            lambda: client.responses.delete(first.id),
            lambda: client.responses.input_items.list(first.id),
        ):
            with pytest.raises(openai.NotFoundError):
                await in_thread(call)
        # The continued response holds the whole conversation: deleting the first changes nothing.
        assert (await in_thread(lambda: client.responses.retrieve(second.id))).output_text == "two"


async def test_previous_response_of_another_user_missing_or_deleted_is_a_404(upstream: FakeUpstream) -> None:
    upstream.script(streams(["secret"]), streams(["x"]))
    async with served(upstream) as server:
        alice, bob = server.client(), server.client("tok-bob")
        mine = await in_thread(lambda: alice.responses.create(model="m", input="my secret"))
        for previous in (mine.id, "j_does_not_exist"):
            with pytest.raises(openai.NotFoundError) as missing:
                await in_thread(
                    lambda p=previous: bob.responses.create(
                        model="m", input="tell me", previous_response_id=p
                    )
                )
            assert missing.value.body == {
                "message": f"Previous response with id '{previous}' not found.",
                "type": "invalid_request_error",
                "param": "previous_response_id",
                "code": "not_found",
            }
        assert len(upstream.requests) == 1  # bob's requests reached no model
        # store=false keeps nothing once the reply is out: it cannot be continued either.
        unstored = await in_thread(lambda: alice.responses.create(model="m", input="forget me", store=False))
        assert unstored.output_text == "x"
        with pytest.raises(openai.NotFoundError):
            await in_thread(lambda: alice.responses.retrieve(unstored.id))
        with pytest.raises(openai.NotFoundError):
            await in_thread(
                lambda: alice.responses.create(model="m", input="again", previous_response_id=unstored.id)
            )
        with pytest.raises(openai.BadRequestError) as bad:
            await in_thread(
                lambda: alice.responses.create(model="m", input="x", store=False, background=True)
            )
        assert bad.value.body["param"] == "store"  # type: ignore[index]


async def test_chains_are_bounded_in_depth_and_bytes(upstream: FakeUpstream) -> None:
    upstream.script(*(streams(["ok"]) for _ in range(4)))
    async with served(upstream, max_chain_depth=2, max_chain_bytes=2000) as server:
        client = server.client()
        first = await in_thread(lambda: client.responses.create(model="m", input="a"))
        second = await in_thread(
            lambda: client.responses.create(model="m", input="b", previous_response_id=first.id)
        )
        with pytest.raises(openai.BadRequestError) as deep:
            await in_thread(
                lambda: client.responses.create(model="m", input="c", previous_response_id=second.id)
            )
        assert deep.value.body["param"] == "previous_response_id" and "max_chain_depth" in deep.value.message  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as big:
            await in_thread(
                lambda: client.responses.create(model="m", input="x" * 3000, previous_response_id=first.id)
            )
        assert "max_chain_bytes" in big.value.message
        assert len(upstream.requests) == 2


WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Get current temperature for a given location.",
    "parameters": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "City and country e.g. Bogotá, Colombia"}
        },
        "required": ["location"],
        "additionalProperties": False,
    },
    "strict": True,
}


def get_weather(location: str) -> str:
    return f"14 degrees in {location}"


async def test_the_function_calling_round_trip_of_openais_guide(upstream: FakeUpstream) -> None:
    """The weather example: the response ends with a ``function_call``; the client runs it
    and sends a ``function_call_output`` with ``previous_response_id``; the model goes on.
    A server tool called in the same turn runs on the server meanwhile."""
    upstream.script(
        calls(
            ("call_w", "get_weather", '{"location": "Paris, France"}'),
            ("call_c", "calculate", '{"expression": "6*7"}'),
        ),
        streams(["It is 14 degrees in Paris; 6*7 is 42."]),
    )
    async with served(upstream) as server:
        client = server.client()
        tools: Any = [WEATHER, {"type": "function", "name": "calculate"}]
        input_messages: Any = [
            {"role": "user", "content": "What's the weather like in Paris today? And 6*7?"}
        ]
        response = await in_thread(
            lambda: client.responses.create(model="m", input=input_messages, tools=tools)
        )
        assert response.status == "completed"
        kinds = [(item.type, getattr(item, "name", None)) for item in response.output]
        assert kinds == [
            ("function_call", "get_weather"),
            ("function_call", "calculate"),
            ("function_call_output", "calculate"),  # ran on the server
        ]
        offered = {tool["function"]["name"] for tool in upstream.requests[0]["tools"]}
        assert offered == {"get_weather", "calculate"}
        answers: Any = []
        for item in response.output:
            if item.type == "function_call" and item.name == "get_weather":
                result = get_weather(**json.loads(item.arguments))
                answers.append({"type": "function_call_output", "call_id": item.call_id, "output": result})
        final = await in_thread(
            lambda: client.responses.create(
                model="m", input=answers, tools=tools, previous_response_id=response.id
            )
        )
        assert final.output_text == "It is 14 degrees in Paris; 6*7 is 42."
        sent = upstream.requests[1]["messages"]
        assert sent[0] == input_messages[0]
        assert [c["id"] for c in sent[1]["tool_calls"]] == ["call_w", "call_c"]
        assert {(m["tool_call_id"], m["content"]) for m in sent[2:4]} == {
            ("call_c", "42"),
            ("call_w", "14 degrees in Paris, France"),
        }
        assert len(sent) == 4
        # Its input items are the client's output.
        listed = await in_thread(lambda: client.responses.input_items.list(final.id))
        assert [(i.type, i.call_id) for i in listed.data] == [("function_call_output", "call_w")]  # type: ignore[union-attr]
        # An unanswered call is refused before anything runs, in OpenAI's words.
        with pytest.raises(openai.BadRequestError) as unanswered:
            await in_thread(
                lambda: client.responses.create(model="m", input="and?", previous_response_id=response.id)
            )
        assert "No tool output found for function call call_w" in unanswered.value.message
        assert len(upstream.requests) == 2


async def test_the_guide_without_previous_response_id_sends_the_output_back(upstream: FakeUpstream) -> None:
    """The guide's other way: the client appends ``response.output`` and its results to
    its own input list and sends it all."""
    upstream.script(calls(("call_w", "get_weather", '{"location": "Oslo"}')), streams(["Cold."]))
    async with served(upstream) as server:
        client = server.client()
        input_messages: Any = [{"role": "user", "content": "Weather in Oslo?"}]
        response = await in_thread(
            lambda: client.responses.create(model="m", input=input_messages, tools=[WEATHER])
        )
        call = response.output[0]
        assert call.type == "function_call"
        input_messages += [item.model_dump(exclude_none=True) for item in response.output]
        input_messages.append({"type": "function_call_output", "call_id": call.call_id, "output": "-3"})
        final = await in_thread(
            lambda: client.responses.create(model="m", input=input_messages, tools=[WEATHER])
        )
        assert final.output_text == "Cold."
        sent = upstream.requests[1]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
        assert sent[1]["tool_calls"][0]["function"] == {
            "name": "get_weather",
            "arguments": '{"location": "Oslo"}',
        }


async def test_an_approval_round_trip_with_mcp_approval_response(upstream: FakeUpstream) -> None:
    """A server tool that needs approval shows as an ``mcp_approval_request`` item of a
    background response that waits; an ``mcp_approval_response`` with
    ``previous_response_id`` resumes that response, which runs the tool and goes on."""
    upstream.script(
        calls(("call_d", "delete_files", '{"a": 2, "b": 3}')),
        streams(["Deleted."]),
        calls(("call_e", "delete_files", '{"a": 1}')),
        streams(["Kept them."]),
    )
    async with served(upstream, tools=("tests.sample_tools:delete_files",)) as server:
        client = server.client()
        tools: Any = [{"type": "function", "name": "delete_files"}]
        started = await in_thread(
            lambda: client.responses.create(model="m", input="clean up", tools=tools, background=True)
        )
        waiting = await in_thread(lambda: until_approval_asked(client, started.id))
        request = waiting.output[-1]
        assert request.type == "mcp_approval_request" and request.name == "delete_files"
        assert json.loads(request.arguments) == {"a": 2, "b": 3} and request.server_label == "backstream"
        assert waiting.status == "in_progress"
        answer: Any = [{"type": "mcp_approval_response", "approval_request_id": request.id, "approve": True}]
        resumed = await in_thread(
            lambda: client.responses.create(
                model="m", input=answer, previous_response_id=started.id, background=True
            )
        )
        assert resumed.id == started.id  # the same response goes on
        done = await in_thread(lambda: until_done(client, started.id))
        assert done.output_text == "Deleted."
        result = next(item for item in done.output if item.type == "function_call_output")
        assert result.output == "5"  # type: ignore[union-attr]
        # Declined in the foreground: the create waits for the end and answers it.
        second = await in_thread(
            lambda: client.responses.create(
                model="m", input="again", tools=tools, previous_response_id=done.id
            )
        )
        asked = next(item for item in second.output if item.type == "mcp_approval_request")
        no: Any = [{"type": "mcp_approval_response", "approval_request_id": asked.id, "approve": False}]
        ended = await in_thread(
            lambda: client.responses.create(model="m", input=no, previous_response_id=second.id)
        )
        assert ended.id == second.id and ended.status == "completed" and ended.output_text == "Kept them."
        # Answering again: the call waits no more.
        with pytest.raises(openai.ConflictError):
            await in_thread(
                lambda: client.responses.create(model="m", input=no, previous_response_id=second.id)
            )


def until_approval_asked(client: openai.OpenAI, response_id: str) -> Any:
    for _ in range(500):
        found = client.responses.retrieve(response_id)
        if any(item.type == "mcp_approval_request" for item in found.output):
            return found
        import time

        time.sleep(0.02)
    raise AssertionError("no approval was asked")


def until_done(client: openai.OpenAI, response_id: str) -> Any:
    import time

    for _ in range(500):
        found = client.responses.retrieve(response_id)
        if found.status not in ("queued", "in_progress"):
            return found
        time.sleep(0.02)
    raise AssertionError("the response did not end")


async def test_the_guides_conversation_example_runs(upstream: FakeUpstream) -> None:
    import pathlib
    import re
    import subprocess
    import sys

    guide = (pathlib.Path(__file__).parent.parent / "docs" / "http-apis.md").read_text()
    example = next(
        b for b in re.findall(r"```python\n(.*?)```", guide, flags=re.S) if "previous_response_id=first" in b
    )
    async with served(upstream, token=("tokA=alice",), echo_words_per_s=1000.0) as server:
        code = example.replace("127.0.0.1:8766", f"127.0.0.1:{server.handle.http_port}")
        result = await trio.to_thread.run_sync(
            lambda: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["what is my name?", "['what is my name?']", "completed"]
