"""Redis backend behaviour beyond the shared conformance tests: outages, restarts, time.

Every test starts its own redis-server (a few milliseconds) because they stop, kill or
freeze it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from harness.multihost.redis_server import RedisServer
from host.storage.redis import RedisBackend
from provisioner.ports import Entry, StorageConflict, StorageUnavailable
from tests.conftest import require_redis_server

NS = "account/e2b"


def _server(persistent: bool) -> Iterator[RedisServer]:
    require_redis_server()
    with RedisServer(persistent=persistent) as server:
        yield server


@pytest.fixture
def server() -> Iterator[RedisServer]:
    yield from _server(persistent=True)


@pytest.fixture
def forgetful_server() -> Iterator[RedisServer]:
    yield from _server(persistent=False)


def _every_call_is_unavailable(backend: RedisBackend) -> None:
    with pytest.raises(StorageUnavailable):
        backend.get(NS, "k")
    with pytest.raises(StorageUnavailable):
        backend.compare_and_swap(NS, "k", None, b"x", None)
    with pytest.raises(StorageUnavailable):
        backend.delete(NS, "k", None)
    with pytest.raises(StorageUnavailable):
        backend.keys(NS)


def test_killed_redis_is_unavailable_then_recovers_without_a_new_backend(
    server: RedisServer,
) -> None:
    """Bug caught: redis-py errors escaping (they would trap the guest), or a backend that
    stays broken after Redis returns."""
    backend = RedisBackend.from_url(server.url)
    version = backend.compare_and_swap(NS, "k", None, b"before", None)
    server.kill()
    _every_call_is_unavailable(backend)
    server.start()
    # A crash may lose the last second of the append-only file; either state is whole.
    assert backend.get(NS, "k") in (None, Entry(b"before", version))
    backend.delete(NS, "k", None)
    new = backend.compare_and_swap(NS, "k", None, b"after", None)
    assert new != version
    assert backend.get(NS, "k") == Entry(b"after", new)
    backend.close()


def test_first_call_after_a_restart_succeeds(server: RedisServer) -> None:
    """Bug caught: a pooled connection, dead after a restart, failing the next call (redis-py
    checks pooled connections for EOF; the backend also retries once on a dropped one)."""
    backend = RedisBackend.from_url(server.url)
    version = backend.compare_and_swap(NS, "k", None, b"kept", None)
    server.restart()
    assert backend.get(NS, "k") == Entry(b"kept", version)
    backend.close()


def test_restart_losing_all_data_never_repeats_a_version(forgetful_server: RedisServer) -> None:
    """Bug caught: the version counter restarting at 1 after Redis lost its data, letting a
    holder of an old version overwrite a newer, unrelated entry (ABA)."""
    backend = RedisBackend.from_url(forgetful_server.url)
    versions = []
    version = None
    for _ in range(5):
        version = backend.compare_and_swap(NS, "k", version, b"old", None)
        versions.append(version)
    forgetful_server.restart()
    assert backend.get(NS, "k") is None, "this server was meant to forget everything"
    new_versions = []
    new = None
    for _ in range(5):
        new = backend.compare_and_swap(NS, "k", new, b"new", None)
        new_versions.append(new)
    assert min(new_versions) > max(versions)
    for stale in versions:
        with pytest.raises(StorageConflict):
            backend.compare_and_swap(NS, "k", stale, b"stale writer", None)
    backend.close()


def test_flushed_counter_never_repeats_a_version(server: RedisServer) -> None:
    backend = RedisBackend.from_url(server.url)
    old = backend.compare_and_swap(NS, "k", None, b"x", None)
    backend.client.flushdb()
    new = backend.compare_and_swap(NS, "k", None, b"y", None)
    assert new > old
    backend.close()


def test_frozen_redis_times_out_as_unavailable_then_answers_correctly(
    server: RedisServer,
) -> None:
    """Bug caught: a hung Redis blocking callers indefinitely, or a timed-out connection
    reused so that a later call reads the previous call's late reply."""
    backend = RedisBackend.from_url(f"{server.url}?socket_timeout=0.2")
    a = backend.compare_and_swap(NS, "a", None, b"value of a", None)
    b = backend.compare_and_swap(NS, "b", None, b"value of b", None)
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        with pytest.raises(StorageUnavailable):
            backend.get(NS, "a")
    finally:
        os.kill(server.pid, signal.SIGCONT)
    # A loaded machine may take longer than the 0.2 s socket timeout to schedule the thawed
    # server: a timeout then is the same answer again, not the bug. The bug is a wrong value.
    assert _get_when_answered(backend, "b") == Entry(b"value of b", b)
    assert _get_when_answered(backend, "a") == Entry(b"value of a", a)
    backend.close()


def test_outage_mid_run_loses_no_acknowledged_write_and_invents_none(
    server: RedisServer,
) -> None:
    """Bug caught: a partial or lost write across an outage. Threads increment one counter
    while Redis stops and starts again; every acknowledged increment must be in the final
    count, and nothing beyond the increments whose outcome was unknown."""
    threads, quota = 4, 40
    backend = RedisBackend.from_url(server.url)
    acknowledged = [0] * threads
    unknown = [0] * threads
    errors: list[BaseException] = []
    halfway = threading.Barrier(threads + 1)
    outage_seen = threading.Barrier(threads + 1)

    def worker(me: int) -> None:
        went_through_outage = False
        try:
            while acknowledged[me] < quota:
                if acknowledged[me] >= quota // 2 and not went_through_outage:
                    went_through_outage = True
                    halfway.wait()  # main stops Redis now
                    _increment_until_unavailable(backend, me, acknowledged, unknown)
                    outage_seen.wait()  # main starts Redis again
                    continue
                try:
                    _increment_once(backend)
                    acknowledged[me] += 1
                except StorageUnavailable:
                    unknown[me] += 1
                except StorageConflict:
                    pass
        except BaseException as error:
            errors.append(error)
            halfway.abort()
            outage_seen.abort()

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    halfway.wait(timeout=60)
    server.stop()
    outage_seen.wait(timeout=60)
    server.start()
    for thread in pool:
        thread.join(timeout=60)
    assert not errors
    found = backend.get(NS, "counter")
    assert found is not None
    assert min(unknown) >= 1, "every worker must have seen the outage"
    assert sum(acknowledged) <= int(found.value) <= sum(acknowledged) + sum(unknown)
    backend.close()


def _increment_once(backend: RedisBackend) -> None:
    found = backend.get(NS, "counter")
    count = 0 if found is None else int(found.value)
    version = None if found is None else found.version
    backend.compare_and_swap(NS, "counter", version, str(count + 1).encode(), None)


def _increment_until_unavailable(
    backend: RedisBackend, me: int, acknowledged: list[int], unknown: list[int]
) -> None:
    while True:
        try:
            _increment_once(backend)
            acknowledged[me] += 1
        except StorageConflict:
            pass
        except StorageUnavailable:
            unknown[me] += 1
            return


def test_now_ms_is_the_redis_servers_clock(server: RedisServer) -> None:
    """Bug caught: now_ms reading the host's own clock, which other hosts do not share."""
    backend = RedisBackend.from_url(f"{server.url}?clock_refresh_ms=0")
    for _ in range(20):
        _assert_between_server_readings(backend)
    backend.close()


def test_now_ms_follows_the_server_even_when_it_disagrees_with_this_host(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug caught: now_ms reading this host's clock. The test server shares this machine's
    clock, so the server is made to answer TIME one hour ahead."""
    backend = RedisBackend.from_url(f"{server.url}?clock_refresh_ms=0")
    real_time = backend.client.time
    hour_ms = 3_600_000

    def hour_ahead() -> tuple[int, int]:
        seconds, micros = real_time()
        return seconds + 3600, micros

    monkeypatch.setattr(backend.client, "time", hour_ahead)
    now = _assert_between_server_readings(backend)
    assert now - time.time() * 1000 > hour_ms / 2
    backend.close()


def test_now_ms_never_goes_back_when_the_server_clock_does(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug caught: a refreshed offset (server clock stepped back, or a slower round trip)
    making now_ms go backwards, so a lease could seem to un-expire."""
    backend = RedisBackend.from_url(f"{server.url}?clock_refresh_ms=0")
    seconds, micros = backend.client.time()
    answers = iter([(seconds, micros), (seconds - 1, micros), (seconds - 1, micros)])
    monkeypatch.setattr(backend.client, "time", lambda: next(answers))
    readings = [backend.now_ms() for _ in range(3)]
    assert readings == sorted(readings)
    backend.close()


def test_cached_clock_never_goes_back_and_survives_an_outage(server: RedisServer) -> None:
    """Bug caught: the clock raising when Redis is down (a clock has no error channel, so the
    guest would trap) or stepping backwards when the offset is refreshed."""
    backend = RedisBackend.from_url(f"{server.url}?clock_refresh_ms=1")
    readings = [backend.now_ms() for _ in range(200)]
    assert readings == sorted(readings)
    assert abs(readings[-1] - _server_ms(backend)) < 1_000
    server.kill()
    during = [backend.now_ms() for _ in range(50)]
    assert during == sorted(during)
    assert during[0] >= readings[-1]
    backend.close()


def test_unreachable_clock_is_not_asked_again_before_the_refresh_interval(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug caught: every clock read retrying TIME against a hung Redis, each waiting out a
    socket timeout (the guest reads the clock often)."""
    backend = RedisBackend.from_url(f"{server.url}?clock_refresh_ms=60000")
    attempts = []

    def hung() -> tuple[int, int]:
        attempts.append(1)
        raise redis.TimeoutError("simulated hung server")

    monkeypatch.setattr(backend.client, "time", hung)
    wall_before = time.time_ns() // 1_000_000
    readings = [backend.now_ms() for _ in range(50)]
    assert len(attempts) == 1
    assert readings == sorted(readings)
    assert readings[0] >= wall_before, "with no server time yet, the local wall clock"
    backend.close()


def test_several_backends_on_one_redis_share_versions_and_data(server: RedisServer) -> None:
    """Several hosts: separate backend objects (separate connection pools) see one store."""
    hosts = [RedisBackend.from_url(server.url) for _ in range(3)]
    version = hosts[0].compare_and_swap(NS, "k", None, b"from host 0", None)
    assert hosts[1].get(NS, "k") == Entry(b"from host 0", version)
    with pytest.raises(StorageConflict):
        hosts[2].compare_and_swap(NS, "k", None, b"from host 2", None)
    newer = hosts[2].compare_and_swap(NS, "k", version, b"from host 2", None)
    assert hosts[0].get(NS, "k") == Entry(b"from host 2", newer)

    errors: list[BaseException] = []

    def worker(host: RedisBackend) -> None:
        try:
            for _ in range(30):
                while True:
                    try:
                        _increment_once(host)
                        break
                    except StorageConflict:
                        continue
        except BaseException as error:
            errors.append(error)

    pool = [threading.Thread(target=worker, args=(host,)) for host in hosts for _ in range(2)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=60)
    assert not errors
    assert hosts[0].get(NS, "counter") is not None
    assert int(hosts[1].get(NS, "counter").value) == 6 * 30  # type: ignore[union-attr]
    for host in hosts:
        host.close()


def test_key_prefixes_keep_backends_apart(server: RedisServer) -> None:
    left = RedisBackend.from_url(f"{server.url}?key_prefix=left:")
    right = RedisBackend.from_url(f"{server.url}?key_prefix=right:")
    left.compare_and_swap(NS, "k", None, b"left", None)
    assert right.get(NS, "k") is None
    assert left.keys(NS) == ["k"]
    assert right.keys(NS) == []
    left.close()
    right.close()


def test_ttl_is_held_by_redis(server: RedisServer) -> None:
    """Redis itself expires the entry (PEXPIRE), so it goes even if no host is alive."""
    backend = RedisBackend.from_url(f"{server.url}?key_prefix=ttl:")
    backend.compare_and_swap(NS, "lease", None, b"x", 60_000)
    backend.compare_and_swap(NS, "plain", None, b"x", None)
    ttl = backend.client.pttl(b"ttl:e:account%2Fe2b:lease")
    assert 0 < ttl <= 60_000
    assert backend.client.pttl(b"ttl:e:account%2Fe2b:plain") == -1
    backend.close()


def _assert_between_server_readings(backend: RedisBackend) -> int:
    """now_ms() lies between two TIME readings taken around it, give or take its own error.

    The backend assumes the server read its clock halfway through a TIME round trip; the
    truth is anywhere in it, so the estimate can be off by half the longest calibration
    round trip so far (the backend reports it: a loaded machine can make one slow, long
    before this call), plus a millisecond of truncation."""
    before = _server_ms(backend)
    now = backend.now_ms()
    after = _server_ms(backend)
    error_ms = backend.clock_error_ms
    assert before - 1 - error_ms <= now <= after + 1 + error_ms
    return now


def _get_when_answered(backend: RedisBackend, key: str, attempts: int = 50) -> Entry | None:
    for _ in range(attempts - 1):
        try:
            return backend.get(NS, key)
        except StorageUnavailable:
            continue
    return backend.get(NS, key)


def _server_ms(backend: RedisBackend) -> int:
    seconds, micros = backend.client.time()
    return int(seconds * 1000 + micros // 1000)


def test_outage_is_reported_quickly(server: RedisServer) -> None:
    """Not a timing assertion: prints how long a call takes to fail against a dead server."""
    backend = RedisBackend.from_url(server.url)
    backend.get(NS, "warm-up")
    server.kill()
    started = time.perf_counter()
    with pytest.raises(StorageUnavailable):
        backend.get(NS, "k")
    print(f"unavailable after {(time.perf_counter() - started) * 1000:.2f} ms")
    backend.close()
