"""A real Redis Cluster on loopback ports: three masters, each with one replica.

Skips when redis-server or redis-cli is missing, except under CI=true, where it fails: CI
must run the cluster tests, not skip them (as tests/test_storage_backends.py does for
Redis).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from harness.multihost.redis_server import RedisServer, find_redis_server

MASTERS = 3
# Short, so that failure detection is quick; a killed master is detected by the others
# and its replica elected within a few seconds (the failover test forces it even sooner).
NODE_TIMEOUT_MS = 1000
FORM_TIMEOUT_S = 30.0


def ci_requires_everything() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def find_redis_cli() -> str | None:
    server = find_redis_server()
    beside = None if server is None else Path(server).with_name("redis-cli")
    if beside is not None and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("redis-cli")


@dataclass(frozen=True)
class NodeInfo:
    """One line of CLUSTER NODES."""

    node_id: str
    port: int
    is_master: bool
    failed: bool
    master_id: str | None
    slots: tuple[tuple[int, int], ...]

    def serves(self, slot: int) -> bool:
        return any(low <= slot <= high for low, high in self.slots)


class LocalRedisCluster:
    """Six redis-server cluster nodes formed into three masters with a replica each."""

    def __init__(self, redis_cli: str, stack: ExitStack) -> None:
        self.redis_cli = redis_cli
        self.servers: list[RedisServer] = []
        for _ in range(MASTERS * 2):
            server = RedisServer(
                persistent=False,
                cluster_node=True,
                extra_args=("--cluster-node-timeout", str(NODE_TIMEOUT_MS)),
            )
            stack.enter_context(server)
            self.servers.append(server)

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]

    def url(self, query: str = "") -> str:
        # Two startup nodes, so the client bootstraps even if one of them is down.
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports[:2])
        return f"redis+cluster://{hosts}/" + (f"?{query}" if query else "")

    def form(self) -> None:
        result = subprocess.run(
            [
                self.redis_cli, "--cluster", "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas", "1", "--cluster-yes",
            ],
            capture_output=True, text=True, timeout=FORM_TIMEOUT_S, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed:\n{result.stdout}{result.stderr}"
            )
        self.wait_until(self.healthy, "the cluster to form")

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0)

    def server_on(self, port: int) -> RedisServer:
        return next(server for server in self.servers if server.port == port)

    def nodes(self, port: int) -> list[NodeInfo]:
        """CLUSTER NODES as the node on `port` sees the cluster (redis-py parses it)."""
        with self.client(port) as client:
            parsed: dict[str, dict[str, Any]] = client.execute_command("CLUSTER NODES")
        found = []
        for address, node in parsed.items():
            flags = str(node["flags"]).split(",")
            found.append(
                NodeInfo(
                    node_id=str(node["node_id"]),
                    port=int(address.rsplit(":", 1)[1].split("@")[0]),
                    is_master="master" in flags,
                    failed="fail" in flags or "fail?" in flags,
                    master_id=None if node["master_id"] == "-" else str(node["master_id"]),
                    slots=tuple((int(low), int(high)) for low, high in node["slots"]),
                )
            )
        return found

    def cluster_info(self, port: int) -> dict[str, str]:
        with self.client(port) as client:
            info: dict[str, str] = client.execute_command("CLUSTER INFO")
        return info

    def role(self, port: int) -> str:
        with self.client(port) as client:
            answer = client.execute_command("ROLE")
        return bytes(answer[0]).decode()

    def healthy(self) -> bool:
        """Every live node says the cluster is ok and knows every node, and every replica's
        link to its master is up."""
        for server in self.servers:
            if not server.running:
                continue
            info = self.cluster_info(server.port)
            if info["cluster_state"] != "ok":
                return False
            if int(info["cluster_known_nodes"]) != len(self.servers):
                return False
            with self.client(server.port) as client:
                replication = client.info("replication")
            if replication["role"] == "slave" and replication["master_link_status"] != "up":
                return False
        return True

    def master_of_slot(self, slot: int, *, seen_from: int) -> NodeInfo:
        return next(
            node
            for node in self.nodes(seen_from)
            if node.is_master and not node.failed and node.serves(slot)
        )

    def replica_of(self, master: NodeInfo, *, seen_from: int) -> NodeInfo:
        return next(node for node in self.nodes(seen_from) if node.master_id == master.node_id)

    @staticmethod
    def wait_until(
        condition: Callable[[], bool], what: str, timeout_s: float = FORM_TIMEOUT_S
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if condition():
                    return
            except redis.RedisError:
                pass  # a node still starting or just killed: ask again
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
            time.sleep(0.05)


def _start_cluster() -> Iterator[LocalRedisCluster]:
    redis_cli = find_redis_cli()
    if find_redis_server() is None or redis_cli is None:
        message = "redis-server or redis-cli not installed (apt-get install redis-server)"
        if ci_requires_everything():
            pytest.fail(f"{message}; CI is set, so redis cluster tests must run, not skip")
        pytest.skip(message)
    with ExitStack() as stack:
        cluster = LocalRedisCluster(redis_cli, stack)
        cluster.form()
        yield cluster


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """A cluster shared by a module's tests, which must leave it whole."""
    yield from _start_cluster()


@pytest.fixture
def own_redis_cluster() -> Iterator[LocalRedisCluster]:
    """A cluster for one test, which may break it (kill a master)."""
    yield from _start_cluster()
