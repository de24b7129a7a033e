"""The Redis backend on a real Redis Cluster (three masters with a replica each, on loopback
ports; see conftest.py): hash-slot layout, the contract, a master failover under load, and
the guest's admission decisions running on it."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
import redis
from redis.crc import key_slot

from host.runtime.component_runtime import HostServices
from host.runtime.native import NativeRuntime
from host.services.http_gateway import HttpGateway
from host.services.namespaces import account_namespace
from host.storage import UnknownStorageScheme, known_schemes, storage_from_uri
from host.storage.base import MAX_VALUE_BYTES
from host.storage.redis_cluster import RedisClusterBackend
from provisioner.model import Invocation
from provisioner.ports import (
    Entry,
    StorageConflict,
    StorageInvalidKey,
    StorageTooLarge,
    StorageUnavailable,
)
from tests.builders import invocation
from tests.conftest import API_KEY
from tests.doubles import RecordingTelemetrySink
from tests.host.storage.conftest import LocalRedisCluster

NS = "account/e2b"
WAIT_S = 30.0


def entry_key(prefix: str, namespace: str, key: str) -> bytes:
    """The documented layout (host/storage/redis_cluster.py)."""
    return f"{prefix}{{n:{quote(namespace, safe='')}}}e:{key}".encode()


def counter_key(prefix: str, namespace: str) -> bytes:
    return f"{prefix}{{n:{quote(namespace, safe='')}}}version".encode()


@pytest.fixture
def backend(
    redis_cluster: LocalRedisCluster, request: pytest.FixtureRequest
) -> Iterator[RedisClusterBackend]:
    # A prefix per test keeps the tests sharing one cluster apart.
    built = storage_from_uri(redis_cluster.url(f"key_prefix={request.node.name[:40]}:"))
    assert isinstance(built, RedisClusterBackend)
    yield built
    built.close()


# --- layout and contract -----------------------------------------------------------------------


def test_every_key_of_a_namespace_shares_its_slot_with_the_version_counter(
    backend: RedisClusterBackend, redis_cluster: LocalRedisCluster, request: pytest.FixtureRequest
) -> None:
    """Bug caught: keys without a hash tag, so that the compare-and-swap script (entry and
    counter) spans two slots, which a cluster refuses (CROSSSLOT), or keys of one account
    spread over the cluster."""
    prefix = f"{request.node.name[:40]}:"
    client = backend.client
    for namespace in (NS, "tenant/acme", "", "a:b", "x{y}z"):
        keys = ["adm/gate", "adm/w/job-1", "rec/job-1", "{brace}", "k:with:colons"]
        for key in keys:
            version = backend.compare_and_swap(namespace, key, None, b"v", None)
            assert backend.get(namespace, key) == Entry(b"v", version)
        slots = {key_slot(entry_key(prefix, namespace, key)) for key in keys}
        slots.add(key_slot(counter_key(prefix, namespace)))
        assert len(slots) == 1, (namespace, slots)
        assert client.exists(*(entry_key(prefix, namespace, key) for key in keys)) == len(keys)
        assert backend.keys(namespace) == sorted(keys)
    # Different accounts are spread over the masters, not all on one.
    spread = {key_slot(counter_key(prefix, f"account/{n}")) // 5462 for n in range(30)}
    assert len(spread) == 3


def test_compare_and_swap_delete_and_ttl_hold_on_the_cluster(
    backend: RedisClusterBackend, request: pytest.FixtureRequest
) -> None:
    b = backend
    v1 = b.compare_and_swap(NS, "k", None, b"one", None)
    with pytest.raises(StorageConflict):
        b.compare_and_swap(NS, "k", None, b"again", None)
    v2 = b.compare_and_swap(NS, "k", v1, b"two", 60_000)
    assert v2 > v1
    with pytest.raises(StorageConflict):
        b.compare_and_swap(NS, "k", v1, b"stale", None)
    with pytest.raises(StorageConflict):
        b.delete(NS, "k", v1)
    assert b.get(NS, "k") == Entry(b"two", v2)
    ttl = b.client.pttl(entry_key(f"{request.node.name[:40]}:", NS, "k"))
    assert 0 < ttl <= 60_000
    assert b.delete(NS, "k", v2) is True
    assert b.delete(NS, "k", None) is False
    v3 = b.compare_and_swap(NS, "k", None, b"three", 2**64 - 1)
    assert v3 not in (v1, v2), "a version repeated after a delete"
    with pytest.raises(StorageInvalidKey):
        b.get(NS, "bad\nkey")
    with pytest.raises(StorageTooLarge):
        b.compare_and_swap(NS, "k", v3, b"x" * (MAX_VALUE_BYTES + 1), None)
    assert b.get(NS, "k") == Entry(b"three", v3)


def test_now_ms_is_the_clock_of_one_cluster_node(redis_cluster: LocalRedisCluster) -> None:
    """Bug caught: now_ms on the host's clock, or on whichever node a call lands (hosts
    would then disagree). The nodes share this machine's clock, so the estimate is checked
    between two TIME readings of the clock node, give or take the backend's reported error."""
    backend = RedisClusterBackend.from_url(
        redis_cluster.url("key_prefix=clock:&clock_refresh_ms=0")
    )
    clock_node = backend.client.get_node_from_key(b"clock:{clock}")  # type: ignore[no-untyped-call]

    def server_ms() -> int:
        seconds, micros = backend.client.time(target_nodes=clock_node)
        return int(seconds) * 1000 + int(micros) // 1000

    for _ in range(10):
        before = server_ms()
        now = backend.now_ms()
        after = server_ms()
        # now_ms() never goes back, so the slowest calibration so far bounds its error
        # (the backend reports half that round trip), not this call's own round trip.
        error_ms = backend.clock_error_ms
        assert before - 1 - error_ms <= now <= after + 1 + error_ms
    backend.close()


# --- URIs --------------------------------------------------------------------------------------


def test_the_cluster_scheme_is_registered() -> None:
    assert "redis+cluster" in known_schemes()
    with pytest.raises(UnknownStorageScheme) as raised:
        storage_from_uri("redis-cluster://127.0.0.1:7000")
    assert "redis+cluster://" in str(raised.value)
    assert raised.value.scheme == "redis-cluster"


@pytest.mark.parametrize(
    "uri",
    [
        "redis+cluster://127.0.0.1:1/1",
        "redis+cluster://127.0.0.1:1/?db=2",
        "redis+cluster://127.0.0.1:1/?socket_timeout=soon",
        "redis+cluster://127.0.0.1",
        "redis+cluster://127.0.0.1:1,",
        "redis+cluster://127.0.0.1:notaport",
        "redis+cluster://127.0.0.1:1/?key_prefix=has{brace}:",
        "redis+cluster://127.0.0.1:1/?decode_responses=true",
    ],
)
def test_malformed_cluster_uris_are_refused_before_connecting(uri: str) -> None:
    """Each names port 1, where nothing listens: a ValueError, not an outage, shows the URI
    was refused before any connection was tried."""
    with pytest.raises(ValueError):
        storage_from_uri(uri)


def test_an_unreachable_cluster_is_unavailable() -> None:
    with pytest.raises(StorageUnavailable):
        storage_from_uri("redis+cluster://127.0.0.1:1/?socket_connect_timeout=0.2")


def test_any_reachable_startup_node_will_do(redis_cluster: LocalRedisCluster) -> None:
    last = redis_cluster.ports[-1]
    backend = storage_from_uri(f"redis+cluster://127.0.0.1:1,127.0.0.1:{last}/?key_prefix=any:")
    version = backend.compare_and_swap(NS, "k", None, b"x", None)
    assert backend.get(NS, "k") == Entry(b"x", version)
    backend.close()


# --- failover ----------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the incrementing threads saw, under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acknowledged: dict[str, int] = field(default_factory=dict)  # op -> version it got
    found_applied: list[str] = field(default_factory=list)  # unknown outcome, then seen
    unavailable: int = 0
    in_cas: int = 0
    at_halfway: int = 0
    errors: list[BaseException] = field(default_factory=list)


def _apply_once(backend: RedisClusterBackend, op: str, tally: Tally) -> None:
    """Append `op` to the log held in one key, exactly once, through CAS retries.

    An outage leaves a write's outcome unknown; the next read tells (the log names `op`), so
    a retry never applies it twice."""
    while True:
        try:
            found = backend.get(NS, "log")
        except StorageUnavailable:
            with tally.lock:
                tally.unavailable += 1
            time.sleep(0.01)
            continue
        log: list[str] = [] if found is None else json.loads(found.value)
        if op in log:
            with tally.lock:
                tally.found_applied.append(op)
            return
        with tally.lock:
            tally.in_cas += 1
        try:
            version = backend.compare_and_swap(
                NS,
                "log",
                None if found is None else found.version,
                json.dumps([*log, op]).encode(),
                None,
            )
        except StorageConflict:
            continue
        except StorageUnavailable:
            with tally.lock:
                tally.unavailable += 1
            time.sleep(0.01)
            continue
        finally:
            with tally.lock:
                tally.in_cas -= 1
        with tally.lock:
            tally.acknowledged[op] = version
        return


def test_cas_increments_across_a_master_failover_lose_none_double_none(
    own_redis_cluster: LocalRedisCluster,
) -> None:
    """Bug caught: a backend that stays on the dead master (no refresh of the slot map),
    a version reissued after the failover, an acknowledged write lost, an op applied twice,
    or keys of one namespace split across slots (the script would fail on the cluster).

    Threads append their ops to one key with CAS. At halfway the key's master is paused for
    writes (CLIENT PAUSE WRITE), the threads resume and block in compare-and-swap on it,
    the replica is shown caught up with the master's replication offset, and the master is
    killed with SIGKILL with those writes in flight; its replica is made master
    (CLUSTER FAILOVER FORCE), which the test waits to see on every live node. Redis
    replicates asynchronously, so catching up first is what makes "no acknowledged write
    lost" Redis's to keep. The writes in flight at the kill were held unexecuted by the
    pause: their outcome is unknown to the threads, which must find out by reading."""
    cluster = own_redis_cluster
    threads, quota = 4, 10
    backend = RedisClusterBackend.from_url(cluster.url("key_prefix=failover:&socket_timeout=10"))
    slot = key_slot(entry_key("failover:", NS, "log"))
    master = cluster.master_of_slot(slot, seen_from=cluster.ports[0])
    replica = cluster.replica_of(master, seen_from=cluster.ports[0])
    tally = Tally()
    resume = threading.Event()

    def worker(me: int) -> None:
        try:
            for j in range(quota):
                if j == quota // 2:
                    with tally.lock:
                        tally.at_halfway += 1
                    assert resume.wait(WAIT_S)
                _apply_once(backend, f"{me}.{j}", tally)
        except BaseException as error:  # surfaced by the assertions below
            tally.errors.append(error)

    pool = [threading.Thread(target=worker, args=(me,), daemon=True) for me in range(threads)]
    for thread in pool:
        thread.start()
    cluster.wait_until(lambda: tally.at_halfway == threads or bool(tally.errors), "halfway")
    assert not tally.errors
    before_kill = dict(tally.acknowledged)
    assert len(before_kill) == threads * (quota // 2)

    with cluster.client(master.port) as master_client:
        master_client.execute_command("CLIENT", "PAUSE", str(int(WAIT_S * 1000)), "WRITE")
    resume.set()
    cluster.wait_until(lambda: tally.in_cas >= 1, "a compare-and-swap in flight")

    def replica_caught_up() -> bool:
        with cluster.client(master.port) as m, cluster.client(replica.port) as r:
            master_offset = int(m.info("replication")["master_repl_offset"])
            replica_offset = int(r.info("replication")["slave_repl_offset"])
        return replica_offset == master_offset

    cluster.wait_until(replica_caught_up, "the replica to catch up")
    in_flight_at_kill = tally.in_cas
    cluster.server_on(master.port).kill()
    # An automatic failover may be under way already: waited for below either way.
    with cluster.client(replica.port) as replica_client, contextlib.suppress(redis.ResponseError):
        replica_client.execute_command("CLUSTER", "FAILOVER", "FORCE")

    live = [port for port in cluster.ports if port != master.port]

    def promoted() -> bool:
        if cluster.role(replica.port) != "master":
            return False
        return all(
            cluster.cluster_info(port)["cluster_state"] == "ok"
            and cluster.master_of_slot(slot, seen_from=port).node_id == replica.node_id
            for port in live
        )

    cluster.wait_until(promoted, "the replica to be master of the slot on every node")
    for thread in pool:
        thread.join(WAIT_S)
    assert not any(thread.is_alive() for thread in pool)
    assert not tally.errors, tally.errors

    ops = sorted(f"{me}.{j}" for me in range(threads) for j in range(quota))
    final = backend.get(NS, "log")
    assert final is not None
    log = json.loads(final.value)
    assert len(log) == len(set(log)), "an op applied twice"
    assert sorted(log) == ops, "an op lost"
    assert in_flight_at_kill >= 1
    after_kill = set(tally.acknowledged) - set(before_kill)
    assert len(after_kill) + len(tally.found_applied) == threads * (quota - quota // 2)
    versions = [tally.acknowledged[op] for op in log if op in tally.acknowledged]
    assert versions == sorted(versions) and len(set(versions)) == len(versions), (
        "versions must rise with every write and never repeat, across the failover"
    )
    stale = before_kill[log[len(before_kill) - 1]]
    with pytest.raises(StorageConflict):
        backend.compare_and_swap(NS, "log", stale, b"[]", None)
    print(
        f"failover: {len(after_kill)} ops acknowledged after it, "
        f"{len(tally.found_applied)} found applied after an unknown outcome, "
        f"{tally.unavailable} unavailable answers, {in_flight_at_kill} in flight at the kill"
    )
    backend.close()


# --- the guest on the cluster ------------------------------------------------------------------


def _invocation(url: str, entity_id: str, operation: str = "provision") -> Invocation:
    config = {
        "operation": operation,
        "e2b_api_url": url,
        "create_rate_per_s": "1000",
        "max_sandboxes": "1",
    }
    return invocation(config, entity_id=entity_id, session_id="s-1", trace_id="t-1")


def test_admission_decisions_run_on_the_cluster(
    redis_cluster: LocalRedisCluster, mock_e2b: Any
) -> None:
    """The guest's admission (a cap of one sandbox per account) decided on cluster storage:
    the second job queues behind the cap and gets its sandbox once the first releases; the
    account's records share one hash slot."""
    backend = storage_from_uri(redis_cluster.url("key_prefix=admission:"))
    assert isinstance(backend, RedisClusterBackend)
    gateway = HttpGateway(mock_e2b.url, API_KEY, allow_private_network=True)
    runtime = NativeRuntime(HostServices(backend, gateway, RecordingTelemetrySink()))
    try:
        first = runtime.invoke(_invocation(mock_e2b.url, "job-1"))
        assert first.action == "SandboxReady", first
        second = runtime.invoke(_invocation(mock_e2b.url, "job-2"))
        assert second.action == "SandboxQueued", second
        assert len(mock_e2b.running_sandboxes()) == 1
        released = runtime.invoke(_invocation(mock_e2b.url, "job-1", "release"))
        assert released.action == "SandboxReleased", released
        again = runtime.invoke(_invocation(mock_e2b.url, "job-2"))
        assert again.action == "SandboxReady", again
        assert [s["sandbox_id"] for s in mock_e2b.running_sandboxes()] == [
            again.params["sandbox_id"]
        ]
        namespace = account_namespace("default")
        stored = backend.keys(namespace)
        assert stored, "the admission state lives in the account namespace"
        slots = {key_slot(entry_key("admission:", namespace, k)) for k in stored}
        assert len(slots) == 1
    finally:
        runtime.close()
        gateway.close()
        backend.close()
