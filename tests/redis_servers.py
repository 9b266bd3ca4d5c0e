"""Real Redis topologies for the tests: a Cluster of primaries with a replica each, and a
Sentinel group (one primary, one replica, three sentinels), on spare ports.

Every server is a ``redis-server`` process of the test's own, with no persistence, in a
temporary directory; ``kill`` is ``kill -9``. Waits poll with ``redis-cli`` until the
topology says it is ready (cluster state ok, replicas in sync, sentinels agreeing).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = [
    "PORT_RANGE",
    "RedisCluster",
    "RedisNode",
    "SentinelGroup",
    "redis_cluster_group",
    "require_redis_binaries",
    "sentinel_group",
]

HOST = "127.0.0.1"
PORT_RANGE = range(
    int(os.environ.get("BACKSTREAM_TEST_REDIS_PORTS_FROM", "43000")),
    int(os.environ.get("BACKSTREAM_TEST_REDIS_PORTS_TO", "44000")),
)
"""Ports for our own servers; a cluster node's bus (port + 10000) must be free too."""
_next_port = [PORT_RANGE.start + (os.getpid() * 7) % len(PORT_RANGE)]


def require_redis_binaries() -> None:
    """Under CI the topology tests must run: no redis-server is a failure there, a skip elsewhere."""
    if shutil.which("redis-server") and shutil.which("redis-cli"):
        return
    message = "redis-server and redis-cli are needed for the Redis Cluster and Sentinel tests"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {message}")
    pytest.skip(f"{message} (apt install redis-server)")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def spare_port() -> int:
    """The next port of ``PORT_RANGE`` free with its bus port (+10000)."""
    for _ in range(len(PORT_RANGE)):
        port = _next_port[0]
        _next_port[0] = PORT_RANGE.start + (port + 1 - PORT_RANGE.start) % len(PORT_RANGE)
        if _free(port) and _free(port + 10000):
            return port
    raise RuntimeError(f"no free port in {PORT_RANGE}")


def cli(port: int, *args: str, timeout: float = 5) -> str:
    done = subprocess.run(
        ["redis-cli", "-h", HOST, "-p", str(port), *args], capture_output=True, text=True, timeout=timeout
    )
    return done.stdout.strip()


def wait_until(what: str, check: object, timeout: float = 30, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(every)


def info(port: int, section: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in cli(port, "info", section).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


class RedisNode:
    """One ``redis-server`` (or sentinel, with ``sentinel_conf``) that can be killed and
    started again on its port with its directory (a cluster node keeps its identity)."""

    def __init__(
        self, directory: Path, args: Sequence[str] = (), *, sentinel_conf: str | None = None
    ) -> None:
        self.port = spare_port()
        self.directory = directory / str(self.port)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.args = list(args)
        self.sentinel_conf = sentinel_conf
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = False

    def start(self) -> RedisNode:
        """Start it and wait until it answers. On its first start, a port taken meanwhile
        (the range is also the system's for outgoing connections) moves it to another;
        started again, it keeps its port (its peers know it by it)."""
        for _attempt in range(5):
            with (self.directory / "server.log").open("ab") as log:
                self.proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 10
            while cli(self.port, "ping") != "PONG":
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            else:
                self.started = True
                return self
            self.kill()
            if self.started:
                break
            self.port = spare_port()
        log = (self.directory / "server.log").read_text()[-2000:]
        raise RuntimeError(f"redis-server on {self.port} did not start:\n{log}")

    def _command(self) -> list[str]:
        if self.sentinel_conf is not None:
            conf = self.directory / "sentinel.conf"
            if not self.started:  # later, the sentinel's rewrite of it holds what it learnt
                conf.write_text(f"port {self.port}\nbind {HOST}\ndir {self.directory}\n{self.sentinel_conf}")
            return ["redis-server", str(conf), "--sentinel"]
        return [
            "redis-server",
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            *self.args,
        ]  # fmt: skip

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """``kill -9``: whatever was not replicated is lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def role(self) -> str:
        return info(self.port, "replication").get("role", "")


class RedisCluster:
    """``primaries`` primaries with ``replicas`` replicas each, cluster-node-timeout short,
    so that a dead primary's replica takes over within a couple of seconds."""

    def __init__(self, directory: Path, primaries: int = 3, replicas: int = 1) -> None:
        args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "1000",
            "--cluster-replica-validity-factor", "0",  # any replica may take over
        ]  # fmt: skip
        self.replicas = replicas
        self.nodes = [RedisNode(directory, args) for _ in range(primaries * (1 + replicas))]

    @property
    def url(self) -> str:
        return f"redis+cluster://{HOST}:{self.nodes[0].port}"

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                "redis-cli", "--cluster", "create",
                *(f"{HOST}:{node.port}" for node in self.nodes),
                "--cluster-replicas", str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )  # fmt: skip
        self.wait_healthy()
        return self

    def live(self) -> list[RedisNode]:
        return [node for node in self.nodes if node.alive]

    def wait_healthy(self, timeout: float = 30) -> None:
        """Every live node sees the cluster ok, and every live replica is in sync."""

        def healthy() -> bool:
            for node in self.live():
                if info(node.port, "cluster").get("cluster_enabled") != "1":
                    return False
                if "cluster_state:ok" not in cli(node.port, "cluster", "info"):
                    return False
                replication = info(node.port, "replication")
                if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                    return False
            return True

        wait_until("the cluster to be ok", healthy, timeout=timeout, every=0.1)

    def primary_of_key(self, key: str) -> RedisNode:
        slot = int(cli(self.live()[0].port, "cluster", "keyslot", key))
        for line in cli(self.live()[0].port, "cluster", "nodes").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for ranges in fields[8:]:
                first, _, last = ranges.partition("-")
                if first.isdigit() and int(first) <= slot <= int(last or first):
                    port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                    return next(node for node in self.nodes if node.port == port)
        raise LookupError(f"no primary holds the slot of {key!r}")

    def restore(self) -> None:
        """Start the killed nodes again (each rejoins as a replica) and wait until healthy."""
        for node in self.nodes:
            if not node.alive:
                node.start()
        self.wait_healthy()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


class SentinelGroup:
    """One primary, one replica and three sentinels (quorum 2) watching them as ``service``;
    a primary unreachable for a second is failed over."""

    service = "bstest"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers = [RedisNode(directory), RedisNode(directory)]
        self.sentinels = [RedisNode(directory, sentinel_conf="") for _ in range(3)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}"

    def start(self) -> SentinelGroup:
        """The primary first: the replica and the sentinels are told its port."""
        primary, replica = self.servers
        primary.start()
        replica.args = ["--replicaof", HOST, str(primary.port)]
        replica.start()
        for sentinel in self.sentinels:
            sentinel.sentinel_conf = (
                f"sentinel monitor {self.service} {HOST} {primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} 5000\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
            sentinel.start()
        self.wait_healthy()
        return self

    def primary(self) -> RedisNode:
        """The server the sentinels name as primary."""
        reply = cli(self.sentinels[0].port, "sentinel", "get-master-addr-by-name", self.service).split()
        port = int(reply[1])
        return next(node for node in self.servers if node.port == port)

    def wait_healthy(self, timeout: float = 30, *, sentinels_informed: bool = True) -> None:
        """The sentinels agree on a live primary that has a replica in sync, and (unless
        ``sentinels_informed`` is false: they learn it within ten seconds) each knows the
        other sentinels and the replica, as a failover needs."""

        def healthy() -> bool:
            named = {cli(s.port, "sentinel", "get-master-addr-by-name", self.service) for s in self.sentinels}
            if len(named) != 1:
                return False
            primary = self.primary()
            if not primary.alive or primary.role() != "master":
                return False
            if info(primary.port, "replication").get("connected_slaves", "0") == "0":
                return False
            for sentinel in self.sentinels if sentinels_informed else ():
                fields = cli(sentinel.port, "sentinel", "master", self.service).splitlines()
                state = dict(zip(fields[::2], fields[1::2], strict=False))
                if state.get("num-other-sentinels") != "2" or state.get("num-slaves") == "0":
                    return False
                if "s_down" in state.get("flags", "") or "o_down" in state.get("flags", ""):
                    return False
            replicas = [node for node in self.servers if node is not primary]
            return all(
                info(node.port, "replication").get("master_link_status") == "up"
                for node in replicas
                if node.alive
            )

        wait_until("the sentinels to agree", healthy, timeout=timeout, every=0.1)

    def wait_failover(self, old: RedisNode, timeout: float = 30) -> RedisNode:
        """Until every sentinel names a primary other than ``old``, and that one is a primary."""

        def moved() -> bool:
            for sentinel in self.sentinels:
                reply = cli(sentinel.port, "sentinel", "get-master-addr-by-name", self.service).split()
                if len(reply) != 2 or int(reply[1]) == old.port:
                    return False
            return self.primary().role() == "master"

        wait_until("the sentinels to fail over", moved, timeout=timeout, every=0.1)
        return self.primary()

    def restore(self) -> None:
        """Start the killed servers again, each as a replica of the primary the sentinels
        name (as they would make it, only sooner), and wait until each is in sync."""
        primary = self.primary()
        for node in self.sentinels:
            if not node.alive:
                node.start()
        restarted = [node for node in self.servers if not node.alive]
        for node in restarted:
            node.args = ["--replicaof", HOST, str(primary.port)]
            node.start()
        wait_until(
            "the restarted replicas to sync",
            lambda: all(info(n.port, "replication").get("master_link_status") == "up" for n in restarted),
        )

    def stop(self) -> None:
        for node in self.sentinels + self.servers:
            node.kill()


@contextmanager
def redis_cluster_group(directory: Path, primaries: int = 3, replicas: int = 1) -> Iterator[RedisCluster]:
    require_redis_binaries()
    cluster = RedisCluster(directory, primaries, replicas)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@contextmanager
def sentinel_group(directory: Path) -> Iterator[SentinelGroup]:
    require_redis_binaries()
    group = SentinelGroup(directory)
    try:
        yield group.start()
    finally:
        group.stop()
