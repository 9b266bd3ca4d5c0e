"""Redis servers of a bench run: a plain redis-server or a Redis Cluster of primaries
(no replicas), on ports of the bench's own, torn down afterwards; and what they count
(``INFO commandstats``, ``INFO cpu``).

Each server is a ``redis-server`` without persistence in a temporary directory. The
ports come from ``BACKSTREAM_BENCH_REDIS_PORTS`` (``FROM-TO``, default 47000-47999); a
cluster node's bus port (port + 10000) must be free too.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

HOST = "127.0.0.1"


def _port_range() -> range:
    first, _, last = os.environ.get("BACKSTREAM_BENCH_REDIS_PORTS", "47000-47999").partition("-")
    return range(int(first), int(last))


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def spare_ports(count: int, bus: bool) -> list[int]:
    """``count`` free ports of the range (each with its bus port free, for a cluster)."""
    ports = [p for p in _port_range() if _free(p) and (not bus or _free(p + 10000))]
    if len(ports) < count:
        raise RuntimeError(f"fewer than {count} free ports in {_port_range()}")
    return ports[:count]


def cli(port: int, *args: str) -> str:
    done = subprocess.run(
        ["redis-cli", "-h", HOST, "-p", str(port), *args], capture_output=True, text=True, timeout=10
    )
    return done.stdout.strip()


def info(port: int, section: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in cli(port, "info", section).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def command_calls(port: int) -> dict[str, int]:
    """Calls per command since the server started (commands inside scripts included)."""
    calls = {}
    for name, value in info(port, "commandstats").items():
        fields = dict(part.split("=", 1) for part in value.split(","))
        calls[name.removeprefix("cmdstat_")] = int(fields["calls"])
    return calls


def cpu_seconds(port: int) -> float:
    """The server's CPU (user + system) since it started."""
    cpu = info(port, "cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def _start_server(port: int, directory: str, cluster: bool) -> subprocess.Popen[bytes]:
    node_dir = os.path.join(directory, str(port))
    os.makedirs(node_dir)
    cmd = ["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    cmd += ["--dir", node_dir]
    if cluster:
        cmd += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait(what: str, check: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


@contextmanager
def redis_servers(primaries: int) -> Iterator[tuple[str, list[int]]]:
    """``primaries`` = 0: one plain redis-server; otherwise a cluster of that many
    primaries. Yields the store URL and the ports of the primaries; kills them all after."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        raise RuntimeError("redis-server and redis-cli are needed (apt-get install redis-server)")
    cluster = primaries > 0
    ports = spare_ports(max(primaries, 1), bus=cluster)
    directory = tempfile.mkdtemp(prefix="bench-redis-")
    procs = [_start_server(port, directory, cluster) for port in ports]
    try:
        for port in ports:
            _wait(f"redis-server on {port}", lambda port=port: cli(port, "ping") == "PONG")
        if not cluster:
            yield f"redis://{HOST}:{ports[0]}/0", ports
            return
        create = ["redis-cli", "--cluster", "create", *(f"{HOST}:{p}" for p in ports), "--cluster-yes"]
        subprocess.run(create, check=True, capture_output=True, timeout=60)
        for port in ports:
            _wait(
                "the cluster to be ok", lambda port=port: "cluster_state:ok" in cli(port, "cluster", "info")
            )
        yield f"redis+cluster://{HOST}:{ports[0]}", ports
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(directory, ignore_errors=True)
