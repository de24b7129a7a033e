"""Conformance of every storage backend to the contract in host/storage/base.py.

Each test runs against memory://, sqlite:// and redis:// (a real redis-server on a loopback
port). Time passes through `Harness.pass_time`: an injected clock for memory and SQLite, a
real wait for Redis, which expires keys on its own clock.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from wasmtime.component import Variant

from harness.multihost.redis_server import RedisServer
from host.runtime.component_runtime import _storage_error
from host.storage import storage_from_uri
from host.storage.base import MAX_KEY_BYTES, MAX_VALUE_BYTES, StorageBackend
from host.storage.memory import MemoryBackend
from host.storage.redis import RedisBackend
from host.storage.sqlite import SqliteBackend
from provisioner.ports import (
    Entry,
    StorageConflict,
    StorageError,
    StorageInvalidKey,
    StorageTooLarge,
)
from tests.conftest import require_redis_server

NS = "tenant/acme"
REDIS_EXPIRY_WAIT_S = 5.0


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    require_redis_server()
    with RedisServer(persistent=False) as server:
        yield server


class FakeClock:
    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self.now = start_ms

    def __call__(self) -> int:
        return self.now


@dataclass
class Harness:
    backend: StorageBackend
    pass_time: Callable[[int], None]


def _redis_pass_time(backend: RedisBackend) -> Callable[[int], None]:
    def pass_time(ms: int) -> None:
        # A sentinel written now with the same TTL expires no earlier than any key written
        # before it: its disappearance shows that `ms` passed on the server's clock.
        sentinel = f"sentinel-{uuid.uuid4().hex}"
        backend.compare_and_swap("time", sentinel, None, b"", ms)
        deadline = time.monotonic() + REDIS_EXPIRY_WAIT_S + ms / 1000
        while backend.get("time", sentinel) is not None:
            assert time.monotonic() < deadline, "redis did not expire a key in time"
            time.sleep(0.005)

    return pass_time


@pytest.fixture(params=["memory", "sqlite", "redis"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    kind: str = request.param
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        # A fresh prefix per test keeps tests apart on the shared server.
        redis_backend = RedisBackend.from_url(f"{server.url}?key_prefix=test-{uuid.uuid4().hex}:")
        yield Harness(redis_backend, _redis_pass_time(redis_backend))
        redis_backend.close()
        return
    clock = FakeClock()

    def advance(ms: int) -> None:
        clock.now += ms

    backend: StorageBackend
    if kind == "memory":
        backend = MemoryBackend(clock)
    else:
        backend = SqliteBackend(tmp_path / "state" / "storage.db", clock=clock)
    yield Harness(backend, advance)
    backend.close()


# --- get / compare-and-swap / delete ---------------------------------------------------------


def test_absent_key_reads_as_none(harness: Harness) -> None:
    assert harness.backend.get(NS, "missing") is None


def test_create_then_read_back(harness: Harness) -> None:
    b = harness.backend
    version = b.compare_and_swap(NS, "k", None, b"hello", None)
    assert b.get(NS, "k") == Entry(b"hello", version)


def test_create_when_present_conflicts_and_keeps_value(harness: Harness) -> None:
    """Bug caught: `expected_version=None` overwriting instead of requiring absence."""
    b = harness.backend
    version = b.compare_and_swap(NS, "k", None, b"first", None)
    with pytest.raises(StorageConflict):
        b.compare_and_swap(NS, "k", None, b"second", None)
    assert b.get(NS, "k") == Entry(b"first", version)


def test_update_at_current_version_then_stale_version_conflicts(harness: Harness) -> None:
    """Bug caught: a CAS that ignores the expected version (a lost update)."""
    b = harness.backend
    v1 = b.compare_and_swap(NS, "k", None, b"one", None)
    v2 = b.compare_and_swap(NS, "k", v1, b"two", None)
    assert v2 != v1
    with pytest.raises(StorageConflict):
        b.compare_and_swap(NS, "k", v1, b"three", None)
    assert b.get(NS, "k") == Entry(b"two", v2)


def test_expected_version_on_absent_key_conflicts(harness: Harness) -> None:
    """Bug caught: a versioned CAS creating a key that does not exist."""
    b = harness.backend
    with pytest.raises(StorageConflict):
        b.compare_and_swap(NS, "k", 1, b"x", None)
    with pytest.raises(StorageConflict):
        b.compare_and_swap(NS, "k", 2**64 - 1, b"x", None)
    assert b.get(NS, "k") is None


def test_out_of_range_expected_version_conflicts_on_present_key(harness: Harness) -> None:
    """Bug caught: a u64 version from the guest overflowing the backend instead of conflicting."""
    b = harness.backend
    version = b.compare_and_swap(NS, "k", None, b"x", None)
    for wrong in (2**64 - 1, 2**63, 0):
        with pytest.raises(StorageConflict):
            b.compare_and_swap(NS, "k", wrong, b"y", None)
        with pytest.raises(StorageConflict):
            b.delete(NS, "k", wrong)
    assert b.get(NS, "k") == Entry(b"x", version)


def test_delete_semantics(harness: Harness) -> None:
    b = harness.backend
    assert b.delete(NS, "k", None) is False
    assert b.delete(NS, "k", 7) is False
    version = b.compare_and_swap(NS, "k", None, b"x", None)
    with pytest.raises(StorageConflict):
        b.delete(NS, "k", version + 1)
    assert b.get(NS, "k") == Entry(b"x", version)
    assert b.delete(NS, "k", version) is True
    assert b.get(NS, "k") is None
    b.compare_and_swap(NS, "k", None, b"y", None)
    assert b.delete(NS, "k", None) is True, "an unversioned delete is unconditional"
    assert b.get(NS, "k") is None


def test_versions_never_repeat_after_delete(harness: Harness) -> None:
    """Bug caught: a per-key counter restarting after delete (ABA: a stale CAS succeeds)."""
    b = harness.backend
    seen: set[int] = set()
    stale = b.compare_and_swap(NS, "k", None, b"0", None)
    seen.add(stale)
    assert b.delete(NS, "k", stale)
    for round_ in range(5):
        version = b.compare_and_swap(NS, "k", None, str(round_).encode(), None)
        assert version not in seen
        seen.add(version)
        with pytest.raises(StorageConflict):
            b.compare_and_swap(NS, "k", stale, b"stale writer", None)
        assert b.delete(NS, "k", version)


def test_versions_never_repeat_across_keys_and_namespaces(harness: Harness) -> None:
    b = harness.backend
    versions = [
        b.compare_and_swap(ns, f"k{i}", None, b"", None) for ns in ("a", "b") for i in range(10)
    ]
    assert len(set(versions)) == len(versions)


def test_namespaces_are_separate(harness: Harness) -> None:
    """Bug caught: namespace and key joined ambiguously ("a" + "b:c" == "a:b" + "c")."""
    b = harness.backend
    places = [("a", "b:c"), ("a:b", "c"), ("a%3Ab", "c"), ("a/b", "c"), ("a", "b/c"), ("", "a:b:c")]
    versions = {
        place: b.compare_and_swap(*place, None, repr(place).encode(), None) for place in places
    }
    for place, version in versions.items():
        assert b.get(*place) == Entry(repr(place).encode(), version)
    assert b.delete("a", "b:c", None)
    assert b.get("a:b", "c") is not None


def test_binary_values_and_unicode_keys_round_trip(harness: Harness) -> None:
    b = harness.backend
    cases = {
        "empty": b"",
        "nul-bytes": b"\x00\x01\x00",
        "high-bytes": bytes(range(256)),
        "ключ/🔑 key with spaces": b"x",
        "*?[glob]\\": b"glob characters in a key",
        "x" * MAX_KEY_BYTES: b"longest key",
    }
    versions = {key: b.compare_and_swap(NS, key, None, value, None) for key, value in cases.items()}
    for key, value in cases.items():
        assert b.get(NS, key) == Entry(value, versions[key])
    largest = b"v" * MAX_VALUE_BYTES
    version = b.compare_and_swap(NS, "largest", None, largest, None)
    assert b.get(NS, "largest") == Entry(largest, version)


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_key",
    ["", "x" * (MAX_KEY_BYTES + 1), "é" * (MAX_KEY_BYTES // 2 + 1), "new\nline", "nul\x00", "\x7f"],
    ids=["empty", "too-long", "too-long-in-utf8", "newline", "nul", "del"],
)
def test_invalid_keys_are_refused_everywhere(harness: Harness, bad_key: str) -> None:
    b = harness.backend
    with pytest.raises(StorageInvalidKey):
        b.get(NS, bad_key)
    with pytest.raises(StorageInvalidKey):
        b.compare_and_swap(NS, bad_key, None, b"x", None)
    with pytest.raises(StorageInvalidKey):
        b.delete(NS, bad_key, None)


def test_too_large_value_is_refused_and_nothing_changes(harness: Harness) -> None:
    b = harness.backend
    version = b.compare_and_swap(NS, "k", None, b"small", None)
    with pytest.raises(StorageTooLarge) as raised:
        b.compare_and_swap(NS, "k", version, b"v" * (MAX_VALUE_BYTES + 1), None)
    assert raised.value.limit == MAX_VALUE_BYTES
    assert b.get(NS, "k") == Entry(b"small", version)


@pytest.mark.parametrize("ttl_ms", [0, -1])
def test_non_positive_ttl_is_refused(harness: Harness, ttl_ms: int) -> None:
    with pytest.raises(StorageInvalidKey):
        harness.backend.compare_and_swap(NS, "k", None, b"x", ttl_ms)
    assert harness.backend.get(NS, "k") is None


def test_every_failure_is_a_storage_error(harness: Harness) -> None:
    """The guest adapter (`_storage_error` in host/runtime/component_runtime.py) maps
    StorageError subclasses to the WIT storage errors; anything else becomes an opaque
    "host error", so each way this backend really fails must raise one of them.

    Bug caught: a backend raising its driver's own exception (sqlite3.Error, RedisError)
    or a bare ValueError, which the guest would see as an unexplained outage."""
    b = harness.backend
    version = b.compare_and_swap(NS, "k", None, b"v", None)

    def raised(call: Callable[[], object]) -> StorageError:
        with pytest.raises(StorageError) as caught:
            call()
        return caught.value

    failures = {
        "conflict": raised(lambda: b.compare_and_swap(NS, "k", version + 1, b"w", None)),
        "invalid-key": raised(lambda: b.get(NS, "k" * (MAX_KEY_BYTES + 1))),
        "too-large": raised(
            lambda: b.compare_and_swap(NS, "k", version, b"v" * (MAX_VALUE_BYTES + 1), None)
        ),
    }
    if isinstance(b, SqliteBackend):
        b.close()
        failures["unavailable"] = raised(lambda: b.get(NS, "k"))
    elif isinstance(b, RedisBackend):  # a server that went away: nothing listens there now
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        gone = RedisBackend.from_url(f"redis://127.0.0.1:{port}/0")
        failures["unavailable"] = raised(lambda: gone.get(NS, "k"))
        gone.close()
    for tag, error in failures.items():
        mapped = _storage_error(error).payload
        assert isinstance(mapped, Variant) and mapped.tag == tag, (type(error), mapped)
        assert "host error" not in str(getattr(mapped, "payload", "")), error


# --- TTL ---------------------------------------------------------------------------------------


def test_ttl_expiry_makes_key_absent(harness: Harness) -> None:
    """Bug caught: TTL ignored, or expired rows still returned by get."""
    b = harness.backend
    b.compare_and_swap(NS, "lease", None, b"held", 80)
    forever = b.compare_and_swap(NS, "forever", None, b"kept", None)
    long_lived = b.compare_and_swap(NS, "long", None, b"kept", 600_000)
    harness.pass_time(80)
    assert b.get(NS, "lease") is None
    assert b.get(NS, "forever") == Entry(b"kept", forever)
    assert b.get(NS, "long") == Entry(b"kept", long_lived)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_ttl_boundary_with_injected_clock(kind: str, tmp_path: Path) -> None:
    """Bug caught: an off-by-one at the expiry instant, or now_ms ignoring the clock.

    Redis is left out: its server clock cannot be injected (the other TTL tests cover it).
    """
    clock = FakeClock()
    b: StorageBackend = (
        MemoryBackend(clock) if kind == "memory" else SqliteBackend(tmp_path / "s.db", clock=clock)
    )
    version = b.compare_and_swap(NS, "lease", None, b"held", 100)
    clock.now += 99
    assert b.get(NS, "lease") == Entry(b"held", version)
    clock.now += 1
    assert b.get(NS, "lease") is None
    with pytest.raises(StorageConflict):
        b.compare_and_swap(NS, "lease", version, b"renewed at the expiry instant", 100)
    assert b.delete(NS, "lease", version) is False
    assert b.compare_and_swap(NS, "lease", None, b"taken over", 100) != version
    assert b.now_ms() == clock.now
    b.close()


def test_expired_key_behaves_as_absent(harness: Harness) -> None:
    """Bug caught: CAS or delete still matching the version of an expired entry."""
    b = harness.backend
    version = b.compare_and_swap(NS, "lease", None, b"held", 60)
    harness.pass_time(60)
    with pytest.raises(StorageConflict):
        b.compare_and_swap(NS, "lease", version, b"renewed too late", None)
    assert b.delete(NS, "lease", version) is False
    assert b.delete(NS, "lease", None) is False


def test_versions_never_repeat_after_expiry(harness: Harness) -> None:
    """Bug caught: ABA through expiry, a holder of the old version writing over a new entry."""
    b = harness.backend
    old = b.compare_and_swap(NS, "lease", None, b"first holder", 60)
    harness.pass_time(60)
    new = b.compare_and_swap(NS, "lease", None, b"second holder", 600_000)
    assert new != old
    with pytest.raises(StorageConflict):
        b.compare_and_swap(NS, "lease", old, b"first holder renews", 600_000)
    assert b.get(NS, "lease") == Entry(b"second holder", new)


def test_cas_sets_replaces_and_clears_ttl(harness: Harness) -> None:
    """Bug caught: a rewrite keeping the previous TTL (Redis HSET does keep it)."""
    b = harness.backend
    cleared = b.compare_and_swap(NS, "cleared", None, b"x", 60)
    cleared = b.compare_and_swap(NS, "cleared", cleared, b"no ttl now", None)
    extended = b.compare_and_swap(NS, "extended", None, b"x", 60)
    extended = b.compare_and_swap(NS, "extended", extended, b"longer ttl", 600_000)
    shortened = b.compare_and_swap(NS, "shortened", None, b"x", 600_000)
    shortened = b.compare_and_swap(NS, "shortened", shortened, b"short ttl", 60)
    harness.pass_time(60)
    assert b.get(NS, "cleared") == Entry(b"no ttl now", cleared)
    assert b.get(NS, "extended") == Entry(b"longer ttl", extended)
    assert b.get(NS, "shortened") is None


def test_huge_ttl_means_practically_forever(harness: Harness) -> None:
    """Bug caught: a u64 TTL from the guest overflowing `now + ttl`."""
    b = harness.backend
    version = b.compare_and_swap(NS, "k", None, b"x", 2**64 - 1)
    harness.pass_time(50)
    assert b.get(NS, "k") == Entry(b"x", version)


# --- concurrency -------------------------------------------------------------------------------


def increment(backend: StorageBackend, namespace: str, key: str) -> int:
    """Add one to a counter with a CAS retry loop; return how many conflicts it took."""
    conflicts = 0
    while True:
        found = backend.get(namespace, key)
        count = 0 if found is None else int(found.value)
        try:
            backend.compare_and_swap(
                namespace,
                key,
                None if found is None else found.version,
                str(count + 1).encode(),
                None,
            )
            return conflicts
        except StorageConflict:
            conflicts += 1


def test_threads_incrementing_one_counter_lose_no_update(harness: Harness) -> None:
    """Bug caught: a non-atomic CAS (read-compare-write racing) losing increments."""
    threads, per_thread = 6, 30
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            start.wait()
            for _ in range(per_thread):
                increment(harness.backend, NS, "counter")
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert not errors
    found = harness.backend.get(NS, "counter")
    assert found is not None
    assert int(found.value) == threads * per_thread


# --- storage_from_uri --------------------------------------------------------------------------


def test_uri_memory() -> None:
    clock = FakeClock(42)
    backend = storage_from_uri("memory://", clock=clock)
    assert isinstance(backend, MemoryBackend)
    assert backend.now_ms() == 42


def test_uri_sqlite_absolute_creates_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "state.db"
    backend = storage_from_uri(f"sqlite://{path}?busy_timeout_ms=250", clock=FakeClock(7))
    assert isinstance(backend, SqliteBackend)
    assert backend.path == path
    assert backend.now_ms() == 7
    backend.compare_and_swap(NS, "k", None, b"x", None)
    backend.close()
    assert path.is_file()


def test_uri_sqlite_four_slashes_is_the_same_absolute_path(tmp_path: Path) -> None:
    backend = storage_from_uri(f"sqlite:///{tmp_path}/state.db")
    assert isinstance(backend, SqliteBackend)
    assert backend.path == tmp_path / "state.db"
    backend.close()


def test_uri_sqlite_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    backend = storage_from_uri("sqlite://state/relative.db")
    assert isinstance(backend, SqliteBackend)
    backend.close()
    assert (tmp_path / "state" / "relative.db").is_file()


def test_uri_redis_options(redis_server: RedisServer) -> None:
    backend = storage_from_uri(f"{redis_server.url}?key_prefix=opts:&socket_timeout=0.25")
    assert isinstance(backend, RedisBackend)
    backend.compare_and_swap("ns", "k", None, b"x", None)
    assert backend.client.exists(b"opts:e:ns:k") == 1
    assert backend.client.connection_pool.connection_kwargs["socket_timeout"] == 0.25
    backend.close()


@pytest.mark.parametrize(
    "uri",
    [
        "postgres://localhost/db",
        "memcached://localhost",
        "sqlite:",
        "/var/lib/state.db",
        "memory://something",
        "sqlite://",
        "sqlite:///",
        "sqlite:///x.db?journal=delete",
        "sqlite:///x.db?busy_timeout_ms=soon",
        "redis://localhost?decode_responses=true",
    ],
)
def test_uri_rejected_with_value_error(uri: str) -> None:
    with pytest.raises(ValueError):
        storage_from_uri(uri)


def test_uri_redis_refuses_an_injected_clock() -> None:
    with pytest.raises(ValueError, match="Redis server"):
        storage_from_uri("redis://127.0.0.1:1/0", clock=FakeClock())
