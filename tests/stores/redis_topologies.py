"""Real Redis topologies for tests, on free loopback ports, stopped by PID: a 3-master Redis
Cluster, a Sentinel-managed master with one replica, and a TLS redis-server. Session-scoped
fixtures (registered for every test package by tests/conftest.py) start each once; tests that
kill a node put it back (`restart`) and wait for the topology to be whole again."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.stores.redis_server import RedisServer
from tests.support.process import free_port
from tests.support.tls import TLSMaterial, make_tls_material

REDIS_CLI = shutil.which("redis-cli")
READY_TIMEOUT_S = 15.0
# Short enough that a killed master is marked failed (Cluster) or failed over (Sentinel) in a
# second or two; long enough that a busy 2-core machine does not fail nodes over by itself.
CLUSTER_NODE_TIMEOUT_MS = 1000
SENTINEL_DOWN_AFTER_MS = 500
SENTINEL_FAILOVER_TIMEOUT_MS = 2000
SENTINEL_MASTER = "mymaster"


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(0.05)


def _info_field(reply: bytes, field: str) -> str | None:
    for line in reply.decode(errors="replace").splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return value.strip()
    return None


def _safe_command(server: RedisServer, *args: str) -> bytes:
    try:
        return server.command(*args)
    except OSError:
        return b""


class RedisClusterNodes:
    """Three masters sharing the 16384 slots; `kill(i)`/`restart(i)` one of them (it comes
    back with its nodes.conf, so with its identity and its slots). `with_replica`: a fourth
    node, `nodes[3]`, replicates `nodes[0]` and takes its slots over when it dies."""

    def __init__(self, directory: Path, *, with_replica: bool = False) -> None:
        self.masters = 3
        self.nodes = [
            RedisServer(
                args=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",  # the bus port, free too (port + 10000 may not be)
                    str(free_port()),
                    "--cluster-config-file",
                    f"nodes-{i}.conf",
                    "--cluster-node-timeout",
                    str(CLUSTER_NODE_TIMEOUT_MS),
                    # Slots of a dead master fail alone; the others keep serving.
                    "--cluster-require-full-coverage",
                    "no",
                ),
                cwd=directory,
            )
            for i in range(4 if with_replica else 3)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[: self.masters])

    def start(self) -> None:
        assert REDIS_CLI is not None, "redis-cli is not installed"
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes[: self.masters]),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=READY_TIMEOUT_S,
        )
        if len(self.nodes) > self.masters:
            self.wait_ok(known=self.masters)
            master_id = self.nodes[0].command("CLUSTER", "MYID").split(b"\r\n")[1].decode()
            subprocess.run(
                [
                    REDIS_CLI,
                    "--cluster",
                    "add-node",
                    f"127.0.0.1:{self.nodes[3].port}",
                    f"127.0.0.1:{self.nodes[0].port}",
                    "--cluster-slave",
                    "--cluster-master-id",
                    master_id,
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=READY_TIMEOUT_S,
            )
            wait_for(
                lambda: (
                    _info_field(_safe_command(self.nodes[3], "INFO", "replication"), "master_link_status")
                    == "up"
                ),
                "the replica to sync",
            )
        self.wait_ok()

    def wait_ok(self, timeout_s: float = READY_TIMEOUT_S, *, known: int | None = None) -> None:
        """Every live node answers, agrees the cluster is ok, and knows every node."""
        want = str(known or len(self.nodes))

        def whole() -> bool:
            for node in self.nodes[: int(want)]:
                if node.process is None:
                    continue
                info = _safe_command(node, "CLUSTER", "INFO")
                if _info_field(info, "cluster_state") != "ok":
                    return False
                if _info_field(info, "cluster_known_nodes") != want:
                    return False
                if _info_field(info, "cluster_slots_ok") != "16384":
                    return False
            return True

        wait_for(whole, "the Redis Cluster to be ok", timeout_s)

    def node_for(self, key: str) -> int:
        """Index of the master serving `key` (the others answer MOVED)."""
        for i, node in enumerate(self.nodes):
            if node.process is not None and node.command("EXISTS", key).startswith(b":"):
                return i
        raise AssertionError(f"no live node serves {key!r}")

    def kill(self, index: int) -> None:
        self.nodes[index].kill()

    def restart(self, index: int) -> None:
        self.nodes[index].start()
        self.wait_ok()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


class RedisSentinelSetup:
    """A master, its replica and one Sentinel watching them (quorum 1). After `kill_master`
    the Sentinel promotes the replica; `restart_old_master` brings the killed one back (the
    Sentinel turns it into a replica of the new master)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers = [RedisServer(cwd=directory)]
        self.servers.append(
            RedisServer(args=("--replicaof", "127.0.0.1", str(self.servers[0].port)), cwd=directory)
        )
        config = directory / "sentinel.conf"
        self.sentinel = RedisServer(args=(str(config), "--sentinel"), cwd=directory)
        config.write_text(
            f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {self.servers[0].port} 1\n"
            f"sentinel down-after-milliseconds {SENTINEL_MASTER} {SENTINEL_DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SENTINEL_MASTER} {SENTINEL_FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {SENTINEL_MASTER} 1\n"
        )

    @property
    def url(self) -> str:
        return f"sentinel://127.0.0.1:{self.sentinel.port}/{SENTINEL_MASTER}"

    def start(self) -> None:
        for server in self.servers:
            server.start()
        self.sentinel.start()
        self.wait_ready()

    def master_port(self) -> int | None:
        """The master's port as the Sentinel sees it."""
        reply = _safe_command(self.sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER)
        parts = reply.split(b"\r\n")
        return int(parts[4]) if len(parts) > 4 and parts[4].isdigit() else None

    def master(self) -> RedisServer:
        port = self.master_port()
        return next(s for s in self.servers if s.port == port)

    def replica(self) -> RedisServer:
        port = self.master_port()
        return next(s for s in self.servers if s.port != port)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """The Sentinel names a live master, whose replica is in sync and known to it."""

        def ready() -> bool:
            port = self.master_port()
            if port is None:
                return False
            master = next((s for s in self.servers if s.port == port), None)
            if master is None or master.process is None:
                return False
            info = _safe_command(master, "INFO", "replication")
            if _info_field(info, "role") != "master" or _info_field(info, "connected_slaves") != "1":
                return False
            replica = next(s for s in self.servers if s.port != port)
            if _info_field(_safe_command(replica, "INFO", "replication"), "master_link_status") != "up":
                return False
            known = _safe_command(self.sentinel, "SENTINEL", "REPLICAS", SENTINEL_MASTER)
            return str(replica.port).encode() in known and b"s_down" not in known

        wait_for(ready, "the Sentinel setup to be ready", timeout_s)

    def stop(self) -> None:
        self.sentinel.kill()
        for server in self.servers:
            server.kill()


class TlsRedis:
    """A redis-server speaking TLS only on `tls_port` (plaintext `port` for the harness),
    certificates from trustme, client certificates required."""

    def __init__(self, directory: Path) -> None:
        self.material: TLSMaterial = make_tls_material(directory)
        cert, key = directory / "server-cert.pem", directory / "server-key.pem"
        self.material.server_cert.cert_chain_pems[0].write_to_path(str(cert))
        self.material.server_cert.private_key_pem.write_to_path(str(key))
        self.tls_port = free_port()
        self.server = RedisServer(
            args=(
                "--tls-port",
                str(self.tls_port),
                "--tls-cert-file",
                str(cert),
                "--tls-key-file",
                str(key),
                "--tls-ca-cert-file",
                str(self.material.ca_file),
                "--tls-auth-clients",
                "yes",
            ),
            cwd=directory,
        )

    def url(self, host: str = "127.0.0.1") -> str:
        return f"rediss://{host}:{self.tls_port}/0"


@contextlib.contextmanager
def temp_directory() -> Iterator[Path]:
    """A temporary directory for servers' files (nodes.conf, sentinel.conf, certificates)."""
    with tempfile.TemporaryDirectory(prefix="ra-redis-") as name:
        yield Path(name)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    with temp_directory() as directory:
        cluster = RedisClusterNodes(directory)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinelSetup]:
    with temp_directory() as directory:
        setup = RedisSentinelSetup(directory)
        try:
            setup.start()
            yield setup
        finally:
            setup.stop()


@pytest.fixture(scope="session")
def tls_redis() -> Iterator[TlsRedis]:
    with temp_directory() as directory:
        tls = TlsRedis(directory)
        try:
            tls.server.start()
            yield tls
        finally:
            tls.server.kill()
