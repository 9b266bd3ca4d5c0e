"""The upstream client through a real forward proxy (proxy.py, a separate process) on
loopback, as the environment's HTTP_PROXY / HTTPS_PROXY / NO_PROXY name it.

Proof that a request went through the proxy: the proxy's own access log names it, and the
upstream's end of the connection belongs to no socket of this process (it is the
proxy's). For ``http://`` the upstream also sees the proxy's ``Via`` header; for
``https://`` the proxy only tunnelled (CONNECT) and TLS ran end to end with a
certificate made here (trustme).
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio
import trustme

from backstream import Config, open_runtime
from backstream.runtime.models.proxies import ProxyConfigError, ProxyURL, environment_proxy
from backstream.runtime.models.upstream import open_http_client
from tests.helpers import collect, joined_text, terminal
from tests.upstream_server import FakeUpstream, Reply, Scenario, open_fake_upstream, streams

MSG = [{"role": "user", "content": "hi"}]
USER, PASSWORD = "proxyuser", "s3cret"
PROXY_VARIABLES = [
    f"{name}{suffix}" for name in ("http", "https", "all", "no") for suffix in ("_proxy", "_PROXY")
]


@attrs.frozen
class RunningProxy:
    port: int
    log: Path
    scheme: str = "http"

    def url(self, password: str = PASSWORD) -> str:
        return f"{self.scheme}://{USER}:{password}@127.0.0.1:{self.port}"

    def access_lines(self, needle: str, *, wait: float = 10.0) -> list[str]:
        """The proxy's access-log lines containing ``needle``; it writes a connection's
        line when the connection ends, so wait up to ``wait`` seconds for one."""
        deadline = time.monotonic() + wait
        while True:
            text = self.log.read_text() if self.log.exists() else ""
            lines = [line for line in text.splitlines() if "access_log" in line and needle in line]
            if lines or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    """proxy.py on a free loopback port, asking for Basic credentials."""
    yield from _run_proxy(tmp_path_factory.mktemp("proxy"), "http", [])


@pytest.fixture(scope="module")
def tls_proxy(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[RunningProxy]:
    """The same, spoken to over TLS (an ``https://`` proxy), with a certificate from ``ca``."""
    folder = tmp_path_factory.mktemp("tls_proxy")
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    tls = ["--cert-file", str(folder / "cert.pem"), "--key-file", str(folder / "key.pem")]
    yield from _run_proxy(folder, "https", tls)


def _run_proxy(folder: Path, scheme: str, extra: list[str]) -> Iterator[RunningProxy]:
    port_file, log = folder / "port", folder / "proxy.log"
    command = [
        sys.executable, "-m", "proxy",
        "--hostname", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
        "--num-acceptors", "1", "--num-workers", "1",
        "--basic-auth", f"{USER}:{PASSWORD}",
        "--log-file", str(log), "--log-level", "INFO", *extra,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert process.poll() is None, f"proxy.py exited: {log.read_text() if log.exists() else ''}"
            assert time.monotonic() < deadline, "proxy.py did not start"
            time.sleep(0.05)
        yield RunningProxy(int(port_file.read_text().split()[0]), log, scheme)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in [*PROXY_VARIABLES, "REQUEST_METHOD", "SSL_CERT_FILE", "SSL_CERT_DIR"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def own_local_ports() -> set[int]:
    """The local TCP ports of this process's sockets (Linux /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def noting_our_ports(scenario: Scenario, found: set[int]) -> Scenario:
    """``scenario``, first adding to ``found`` the upstream's peer ports that are this
    process's own sockets (looked up while the client waits for the answer)."""

    async def noting(reply: Reply) -> None:
        transport = (
            reply.stream.transport_stream if isinstance(reply.stream, trio.SSLStream) else reply.stream
        )
        assert isinstance(transport, trio.SocketStream)
        found.update(own_local_ports() & {transport.socket.getpeername()[1]})
        await scenario(reply)

    return noting


async def run_job(upstream: FakeUpstream, texts: list[str], **config: object) -> tuple[str, str, set[int]]:
    """One job against ``upstream`` that streams ``texts``: its end status, its text, and
    the upstream's peer ports that are this process's own."""
    mine: set[int] = set()
    upstream.script(noting_our_ports(streams(texts), mine))
    async with open_runtime(Config(upstream_url=upstream.url, drain_timeout=0, **config)) as rt:  # type: ignore[arg-type]
        started = await rt.start_job(
            user="alice", thread_id="t", message_id="m", model="gpt-test", messages=MSG
        )
        batches = await collect(rt, started.job_id)
        end = terminal(batches)
        status = end.status if end.error is None else f"{end.status}/{end.error.code}: {end.error.message}"
        return status, joined_text(batches), mine


pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc")


async def test_an_http_upstream_is_reached_through_the_proxy_with_its_credentials(
    proxy: RunningProxy, clean_env: pytest.MonkeyPatch, nursery: trio.Nursery
) -> None:
    upstream = await open_fake_upstream(nursery)
    clean_env.setenv("http_proxy", proxy.url())
    clean_env.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # another scheme's: unused
    status, text, mine = await run_job(upstream, ["via", " proxy"])
    assert (status, text) == ("completed", "via proxy")
    ((request_line, headers),) = upstream.heads
    assert request_line == "POST /v1/chat/completions HTTP/1.1"  # the proxy's origin form
    assert "proxy.py" in headers["via"] and "proxy-authorization" not in headers
    assert headers["host"] == f"127.0.0.1:{upstream.port}"
    assert upstream.peers and not mine  # the upstream's peer is the proxy, not us
    lines = proxy.access_lines(f"POST 127.0.0.1:{upstream.port}/v1/chat/completions")
    assert len(lines) == 1 and "200 OK" in lines[0]


async def test_an_https_upstream_is_tunnelled_through_connect_with_tls_to_the_origin(
    proxy: RunningProxy, clean_env: pytest.MonkeyPatch, nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA
) -> None:
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    clean_env.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))  # the client's trust, as httpx reads it
    upstream = await open_fake_upstream(nursery, tls=server_tls)
    clean_env.setenv("HTTPS_PROXY", proxy.url())
    clean_env.setenv("NO_PROXY", "example.com,.internal")  # not this upstream
    status, text, mine = await run_job(upstream, ["secret", " tunnel"])
    assert (status, text) == ("completed", "secret tunnel")
    ((request_line, headers),) = upstream.heads
    # Tunnelled: the proxy never read the request, so it added and removed nothing.
    assert request_line == "POST /v1/chat/completions HTTP/1.1"
    assert "via" not in headers and "proxy-authorization" not in headers
    assert upstream.connections == 1 and not mine
    lines = proxy.access_lines(f"CONNECT 127.0.0.1:{upstream.port}")
    assert len(lines) == 1


async def test_an_https_proxy_carries_the_tunnel_inside_its_own_tls(
    tls_proxy: RunningProxy,
    clean_env: pytest.MonkeyPatch,
    nursery: trio.Nursery,
    tmp_path: Path,
    ca: trustme.CA,
) -> None:
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    clean_env.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))  # trusts both the proxy and the upstream
    upstream = await open_fake_upstream(nursery, tls=server_tls)
    clean_env.setenv("https_proxy", tls_proxy.url())
    status, text, mine = await run_job(upstream, ["tls", " in", " tls"])
    assert (status, text) == ("completed", "tls in tls")
    assert upstream.connections == 1 and not mine
    assert len(tls_proxy.access_lines(f"CONNECT 127.0.0.1:{upstream.port}")) == 1


async def test_no_proxy_sends_the_upstream_past_the_proxy(
    proxy: RunningProxy, clean_env: pytest.MonkeyPatch, nursery: trio.Nursery
) -> None:
    upstream = await open_fake_upstream(nursery)
    clean_env.setenv("HTTP_PROXY", proxy.url())
    clean_env.setenv("NO_PROXY", f"example.com, 127.0.0.1:{upstream.port}")
    status, text, mine = await run_job(upstream, ["direct"])
    assert (status, text) == ("completed", "direct")
    ((_, headers),) = upstream.heads
    assert "via" not in headers
    assert len(upstream.peers) == 1 and mine == {upstream.peers[0][1]}  # our own socket, straight to it
    assert proxy.access_lines(f"127.0.0.1:{upstream.port}", wait=0.5) == []


async def test_a_proxy_refusing_the_credentials_fails_the_job_with_its_answer(
    proxy: RunningProxy, clean_env: pytest.MonkeyPatch, nursery: trio.Nursery
) -> None:
    upstream = await open_fake_upstream(nursery)
    clean_env.setenv("ALL_PROXY", proxy.url(password="wrong"))
    clean_env.setenv("SSL_CERT_FILE", "/nonexistent")  # never read: CONNECT fails before TLS
    upstream.scheme = "https"
    status, text, _ = await run_job(upstream, ["never"], upstream_max_retries=0)
    assert status.startswith("failed/upstream_unreachable: ")
    assert f"answered CONNECT 127.0.0.1:{upstream.port} with HTTP 407" in status
    assert text == "" and upstream.connections == 0


def test_a_socks_proxy_is_refused_at_startup_by_name(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("all_proxy", "socks5://127.0.0.1:1080")
    with pytest.raises(ValueError, match="all_proxy names a socks5:// proxy"):
        open_http_client(Config(upstream_url="https://api.example.com/v1"))


def _proxy(environ: dict[str, str], url: str = "https://api.example.com/v1/chat/completions") -> str | None:
    found = environment_proxy(url, environ)
    return None if found is None else f"{found.variable}={found.address}"


def test_the_variables_are_read_as_httpx_reads_them() -> None:
    http, https = "http://api.example.com/v1", "https://api.example.com/v1"
    assert _proxy({}) is None
    assert _proxy({"HTTP_PROXY": "p:1"}, http) == "HTTP_PROXY=http://p:1"
    assert _proxy({"HTTP_PROXY": "p:1"}, https) is None
    assert _proxy({"HTTPS_PROXY": "https://p"}, https) == "HTTPS_PROXY=https://p:443"
    assert _proxy({"ALL_PROXY": "p"}, https) == "ALL_PROXY=http://p:80"
    assert _proxy({"ALL_PROXY": "a:1", "HTTPS_PROXY": "b:2"}, https) == "HTTPS_PROXY=http://b:2"
    # Lower case wins, and an empty lower-case variable unsets its upper-case twin.
    assert _proxy({"HTTPS_PROXY": "a:1", "https_proxy": "b:2"}) == "https_proxy=http://b:2"
    assert _proxy({"HTTPS_PROXY": "a:1", "https_proxy": ""}) is None
    # Under CGI, HTTP_PROXY is a request header (httpoxy): ignored; the lower case is not.
    assert _proxy({"HTTP_PROXY": "a:1", "REQUEST_METHOD": "GET"}, http) is None
    assert _proxy({"http_proxy": "a:1", "REQUEST_METHOD": "GET"}, http) == "http_proxy=http://a:1"


@pytest.mark.parametrize(
    ("no_proxy", "url", "bypassed"),
    [
        ("*", "https://api.example.com", True),
        ("other.org, *", "https://api.example.com", True),
        ("example.com", "https://api.example.com", True),
        ("example.com", "https://example.com", True),
        ("example.com", "https://notexample.com", False),
        (".example.com", "https://api.example.com", True),
        (".example.com", "https://example.com", False),
        ("API.Example.com", "https://api.example.com", True),
        ("127.0.0.1", "http://127.0.0.1:8000", True),
        ("127.0.0.1", "http://127.0.0.12:8000", False),
        ("::1", "http://[::1]:8000", True),
        ("localhost", "http://localhost:8000", True),
        ("localhost", "http://notlocalhost:8000", False),
        ("example.com:8443", "https://api.example.com:8443", True),
        ("example.com:8443", "https://api.example.com", False),
        ("example.com:443", "https://api.example.com", True),
        ("http://example.com", "http://example.com", True),
        ("http://example.com", "https://example.com", False),
        ("", "https://api.example.com", False),
    ],
)
def test_no_proxy_entries(no_proxy: str, url: str, bypassed: bool) -> None:
    environ = {"ALL_PROXY": "http://proxy:3128", "NO_PROXY": no_proxy}
    assert (environment_proxy(url, environ) is None) is bypassed


def test_the_proxy_url_gives_the_credentials_and_hides_them() -> None:
    proxy = ProxyURL.parse("http://us%40er:p%3Ass@[::1]:3128", "HTTPS_PROXY")
    assert (proxy.host, proxy.port, proxy.address) == ("::1", 3128, "http://[::1]:3128")
    assert proxy.authorization == "Basic dXNAZXI6cDpzcw=="  # base64 of "us@er:p:ss"
    assert "p:ss" not in repr(proxy) and "dXNA" not in repr(proxy)
    with pytest.raises(ProxyConfigError, match="HTTPS_PROXY names a ftp:// proxy"):
        ProxyURL.parse("ftp://p", "HTTPS_PROXY")
