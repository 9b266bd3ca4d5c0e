"""What ``--http-port`` serves for browsers: the JavaScript client, the demo page (``--web``),
``/api/config``; the ``backstream/tools-demo`` model; ``backstream demo --web``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from websockets.sync.client import connect

from backstream import Config, open_runtime
from backstream.runtime.models.tools_demo import find_expression, plan_calls
from backstream.runtime.server.serve import ServeHandle, serve
from backstream.runtime.server.settings import ServeSettings, add_serve_arguments, load_settings
from backstream.runtime.server.web_assets import find_asset
from backstream.runtime.tools.demo import DEMO_TOOLS
from backstream.runtime.tools.registry import ToolRegistry
from tests.test_cli_errors import one_line_failure, run
from tests.upstream_server import FakeUpstream

REPO = Path(__file__).resolve().parent.parent
JS_SOURCE = REPO / "clients" / "js" / "src"
DEMO = REPO / "backstream" / "web" / "demo"


def test_find_asset_serves_only_the_shipped_files() -> None:
    client = find_asset("/client/backstream-client.js", web=False)
    assert client is not None and client.content_type.startswith("text/javascript")
    assert client.body == (JS_SOURCE / "backstream-client.js").read_bytes()
    assert ("access-control-allow-origin", "*") in client.headers  # pages elsewhere may import it
    assert find_asset("/", web=False) is None and find_asset("/demo/app.js", web=False) is None
    page = find_asset("/", web=True)
    assert page is not None and page.content_type.startswith("text/html")
    assert page == find_asset("/demo/index.html", web=True)
    policy = dict(page.headers)["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    for path in ("/demo/../client/client.js", "/client/", "/client/nope.js", "/client/../../pyproject.toml"):
        assert find_asset(path, web=True) is None


def _imports(path: Path) -> list[str]:
    return re.findall(r'^(?:import|export)\s[^"]*?from\s+"([^"]+)"', path.read_text(), re.MULTILINE)


def test_every_module_and_file_the_page_loads_is_served() -> None:
    """The browser resolves the imports relative to each module's URL; every one must exist."""
    for folder, prefix in ((JS_SOURCE, "/client/"), (DEMO, "/demo/")):
        for module in folder.glob("*.js"):
            for spec in _imports(module):
                url = httpx.URL(f"http://x{prefix}{module.name}").join(spec).path
                assert find_asset(url, web=True) is not None, (
                    f"{module.name} imports {spec}: {url} is not served"
                )
    page = (DEMO / "index.html").read_text()
    for url in re.findall(r'(?:href|src)="(/[^"]+)"', page):
        assert find_asset(url, web=True) is not None, url


async def _serve(settings: ServeSettings, nursery: trio.Nursery) -> ServeHandle:
    handle: ServeHandle = await nursery.start(
        lambda task_status: serve(
            settings, handle_signals=False, announce=lambda _: None, task_status=task_status
        )
    )
    return handle


async def test_http_port_serves_the_client_and_with_web_the_page_and_config(
    upstream: FakeUpstream, nursery: trio.Nursery
) -> None:
    base = {"port": 0, "http_port": 0, "token": ("tok=alice",), "store": "memory", "drain_timeout": 0.0}
    plain = await _serve(ServeSettings.defaults(**base), nursery)
    web = await _serve(ServeSettings.defaults(**base, web=True, upstream_url=upstream.url), nursery)
    async with httpx.AsyncClient() as http:
        served = await http.get(f"http://127.0.0.1:{plain.http_port}/client/backstream-client.js")
        assert served.status_code == 200 and served.headers["content-type"].startswith("text/javascript")
        assert served.headers["access-control-allow-origin"] == "*"
        assert (await http.get(f"http://127.0.0.1:{plain.http_port}/")).status_code == 404
        assert (await http.get(f"http://127.0.0.1:{plain.http_port}/api/config")).status_code == 404
        page = await http.get(f"http://127.0.0.1:{web.http_port}/")
        assert page.status_code == 200 and "<title>backstream chat</title>" in page.text
        assert "content-security-policy" in page.headers
        config = (await http.get(f"http://127.0.0.1:{web.http_port}/api/config")).json()
        head = await http.head(f"http://127.0.0.1:{web.http_port}/demo/app.js")
        app = await http.get(f"http://127.0.0.1:{web.http_port}/demo/app.js")
        assert head.status_code == 200 and head.content == b"" and len(app.content) > 1000
        assert head.headers["content-length"] == str(len(app.content))
        assert head.headers["content-security-policy"] == app.headers["content-security-policy"]
        posted = await http.post(f"http://127.0.0.1:{web.http_port}/demo/app.js")
        assert posted.status_code == 405
        healthz = await http.get(f"http://127.0.0.1:{web.http_port}/healthz")
        assert healthz.text == "ok\n"  # the status routes are still there
    assert config["websocket"] == {"port": web.port, "path": "/v1", "scheme": "ws"}
    assert config["models"] == [
        {"id": "backstream/echo", "builtin": True},
        {"id": "backstream/lorem", "builtin": True},
        {"id": "backstream/tools-demo", "builtin": True},
        {"id": "workflow/demo", "builtin": True},
        {"id": "upstream/alpha", "builtin": False},
        {"id": "upstream/beta", "builtin": False},
    ]
    assert config["upstream"] == {"configured": True, "error": None}
    plain.shutdown.set()
    web.shutdown.set()


async def _web_config(nursery: trio.Nursery, **settings: Any) -> dict[str, Any]:
    """What ``/api/config`` answers on a ``--web`` server with ``settings``."""
    handle = await _serve(
        ServeSettings.defaults(
            port=0, http_port=0, token=("tok=alice",), store="memory", web=True, drain_timeout=0.0, **settings
        ),
        nursery,
    )
    async with httpx.AsyncClient() as http:
        config: dict[str, Any] = (await http.get(f"http://127.0.0.1:{handle.http_port}/api/config")).json()
    handle.shutdown.set()
    return config


async def test_config_offers_only_the_models_allowed(upstream: FakeUpstream, nursery: trio.Nursery) -> None:
    config = await _web_config(
        nursery, upstream_url=upstream.url, allow_model=("upstream/al*", "!backstream/echo")
    )
    assert [m["id"] for m in config["models"]] == [
        "backstream/lorem",
        "backstream/tools-demo",
        "workflow/demo",
        "upstream/alpha",
    ]


async def test_config_says_when_the_upstream_cannot_list_its_models(nursery: trio.Nursery) -> None:
    config = await _web_config(nursery, upstream_url="http://127.0.0.1:9/v1")  # nothing listens there
    assert [m["id"] for m in config["models"]] == [
        "backstream/echo",
        "backstream/lorem",
        "backstream/tools-demo",
        "workflow/demo",
    ]
    assert config["upstream"]["configured"] is True and "could not be read" in config["upstream"]["error"]


def test_web_setting() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert load_settings(parser.parse_args(["--web", "--http-port", "8766"]), env={}).web is True
    assert load_settings(parser.parse_args([]), env={}).web is False
    assert load_settings(
        parser.parse_args([]), env={"BACKSTREAM_WEB": "yes", "BACKSTREAM_HTTP_PORT": "1"}
    ).web
    assert load_settings(parser.parse_args([]), env={"BACKSTREAM_WEB": "off"}).web is False
    with pytest.raises(ValueError, match=r"--web \(BACKSTREAM_WEB\): .* set --http-port"):
        load_settings(parser.parse_args(["--web"]), env={})
    with pytest.raises(ValueError, match="BACKSTREAM_WEB: expected true or false, got 'maybe'"):
        load_settings(parser.parse_args([]), env={"BACKSTREAM_WEB": "maybe"})


def test_web_in_a_toml_file(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    toml = tmp_path / "serve.toml"
    toml.write_text("web = true\nhttp_port = 8766\n")
    assert load_settings(parser.parse_args(["--config", str(toml)]), env={}).web is True
    toml.write_text("web = 3\n")
    with pytest.raises(ValueError, match=r"web in .*: unexpected value 3"):
        load_settings(parser.parse_args(["--config", str(toml)]), env={})


def test_serve_web_without_an_http_port_is_one_line() -> None:
    line = one_line_failure(run("serve", "--web", "--store", "memory"))
    assert "--web" in line and "--http-port" in line


# -- backstream/tools-demo --------------------------------------------------------------------


def test_the_tools_demo_plans_calls_from_the_message() -> None:
    assert find_expression("What is 1337 * 42, and what time is it?") == "1337 * 42"
    assert find_expression("(2 + 3) ** 2 please") == "(2 + 3) ** 2"
    assert find_expression("the 3 musketeers, 2024 edition") is None
    assert find_expression("no numbers here") is None
    every = ["calculate", "clock_now", "send_note"]
    assert plan_calls("What is 6 * 7? Then send a note to Ada.", every) == [
        ("calculate", {"expression": "6 * 7"}),
        ("send_note", {"to": "Ada", "text": "What is 6 * 7? Then send a note to Ada."}),
    ]
    assert plan_calls("what time is it", every) == [("clock_now", {})]
    assert plan_calls("hello", every) == [("clock_now", {})]  # nothing asked: it shows a tool anyway
    assert plan_calls("send a note and compute 1+1", ["calculate"]) == [("calculate", {"expression": "1+1"})]
    assert plan_calls("hello", []) == []


async def _run_tools_demo(text: str, tools: list[str], decide: bool | None) -> tuple[str, list[Any], str]:
    registry = ToolRegistry.with_builtins()
    for item in DEMO_TOOLS:
        registry.register(item)
    async with open_runtime(Config(), tools=registry) as rt:
        job = await rt.start_job(
            user="u",
            thread_id="t",
            message_id="m",
            model="backstream/tools-demo",
            messages=[{"role": "user", "content": text}],
            params={"tokens_per_s": 2000},
            tools=tools,
        )
        kinds: list[Any] = []
        async with rt.watch(job.job_id, user="u") as batches:
            async for batch in batches:
                for event in batch.events:
                    kinds.append(event.kind)
                    if event.kind == "approval_required" and decide is not None:
                        await rt.approve(job.job_id, event.call_id, decide, user="u")
        info = await rt.get_job(job.job_id, user="u", include_content=True)
        return info.content or "", kinds, info.job.status


async def test_the_tools_demo_model_calls_tools_and_asks_for_approval() -> None:
    # A real clock: the tools run on worker threads, which a jumping clock would time out.
    every = ["calculate", "clock_now", "send_note"]
    text, kinds, status = await _run_tools_demo("What is 1337 * 42? Then send a note to Ada.", every, True)
    assert status == "completed"
    assert kinds.count("tool_call") == 2 and kinds.count("tool_result") == 2
    assert kinds.index("approval_required") < kinds.index("approval")
    assert text.startswith("Let me use calculate and send_note for that. 1337 * 42 = 56154.")
    assert "With your approval, send_note took a note of" in text and "sends nothing anywhere" in text
    denied, _, _ = await _run_tools_demo("Send a note to Ada.", every, False)
    assert denied.endswith("You declined send_note, so I did not run it.")
    nothing, kinds, status = await _run_tools_demo("What is 2 + 2?", [], None)
    assert status == "completed" and "tool_call" not in kinds
    assert "none of them is enabled for this job" in nothing
    clock, _, _ = await _run_tools_demo("What time is it?", ["clock_now"], None)
    assert re.search(r"The time on the server is \d{4}-\d\d-\d\dT[\d:.]+Z \(UTC\)\.", clock)


# -- backstream demo --web ----------------------------------------------------------------------


def test_demo_web_prints_a_url_that_serves_the_page_and_its_token_works() -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "backstream", "demo", "--web", "--port", "0", "--http-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("BACKSTREAM_")},
    )
    try:
        assert demo.stdout is not None
        line = ""
        while "open http" not in line:
            line = demo.stdout.readline()
            assert line, "the demo ended without printing its URL"
        url = re.search(r"(http://\S+)/#token=(\S+)", line)
        assert url is not None, line
        base, token = url.group(1), url.group(2)
        assert "<title>backstream chat</title>" in httpx.get(f"{base}/").text
        config = httpx.get(f"{base}/api/config").json()
        assert "backstream/tools-demo" in [m["id"] for m in config["models"]]
        with connect(f"ws://127.0.0.1:{config['websocket']['port']}/v1") as ws:
            ws.send(json.dumps({"type": "hello", "id": "h", "protocol": 1, "token": token}))
            welcome = json.loads(ws.recv())
        assert welcome["type"] == "welcome"
        assert welcome["features"]["tools"] == ["calculate", "clock_now", "send_note"]
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=15) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
