"""Several host processes sharing one Redis and one E2B account (issue 6).

Every test runs real `python -m host.multihost.worker` processes against a real
redis-server and a mock E2B, all on loopback. With CI set, a missing redis-server fails
the tests instead of skipping them.
"""

from __future__ import annotations

import argparse
import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from host.mock_e2b import MockE2BConfig, MockE2BServer
from host.multihost.redis_server import RedisServer
from host.multihost.run import (
    Cluster,
    ClusterOutcome,
    Event,
    add_multihost_arguments,
    answered_creates,
    creates_in_flight,
    creating_with_sessions_queued,
    grants_after,
    iter_jobs,
    max_tenant_lead,
    read_gate,
    run_multihost,
    wait_until_leases_leave,
)
from host.multihost.worker import WorkerSettings
from host.runtime.loader import LoadedComponent
from host.sessions.invocations import ENTITY_TYPE
from tests.conftest import require_redis_server

API_KEY = "e2b_multihost_key_0123456789"
CREATE_SLOTS = 4
MAX_SANDBOXES = 10
CREATE_LEASE_MS = 3_000



@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    require_redis_server()
    with RedisServer() as server:
        yield server


def _integration_config(e2b_url: str, **overrides: str) -> tuple[tuple[str, str], ...]:
    """Short leases and polls, so a dead host's permits come back within seconds."""
    config = {
        "e2b_api_url": e2b_url,
        "create_slots": str(CREATE_SLOTS),
        "create_rate_per_s": "50",
        "create_burst": str(CREATE_SLOTS),
        "max_sandboxes": str(MAX_SANDBOXES),
        "create_latency_ms": "300",
        "create_timeout_ms": "2500",
        "create_lease_ms": str(CREATE_LEASE_MS),
        "waiter_ttl_ms": "2000",
        "poll_min_ms": "100",
        "poll_max_ms": "1000",
        "backoff_base_ms": "100",
        "backoff_cap_ms": "1000",
        "sandbox_timeout_s": "300",
    }
    config.update(overrides)
    return tuple(config.items())


def _settings(
    redis_server: RedisServer,
    mock: MockE2BServer,
    loaded: LoadedComponent,
    cache_dir: Path,
    *,
    turns: int = 2,
    turn_s: float = 0.2,
    **config: str,
) -> WorkerSettings:
    run_id = secrets.token_hex(3)
    return WorkerSettings(
        storage_url=redis_server.url,
        e2b_url=mock.url,
        api_key=API_KEY,
        account=f"multihost-{run_id}",
        run_id=run_id,
        config=_integration_config(mock.url, **config),
        turns=turns,
        turn_s=turn_s,
        session_threads=12,
        component=str(loaded.path),
        cache_dir=str(cache_dir),
    )


def _mock(**changes: object) -> MockE2BServer:
    config = MockE2BConfig(
        api_key=API_KEY,
        max_concurrent_creates=CREATE_SLOTS,
        max_sandboxes=MAX_SANDBOXES,
        create_latency_ms=300,
    ).replace(**changes)
    return MockE2BServer(config)


def _assert_every_job_completed(outcome: ClusterOutcome, jobs: int) -> None:
    states = {job_id: result["state"] for job_id, result in outcome.results.items()}
    assert len(states) == jobs
    assert set(states.values()) == {"Completed"}, states
    assert not [r for r in outcome.results.values() if r.get("release_error")]


def _assert_nothing_left(
    mock: MockE2BServer, redis_server: RedisServer, account: str, jobs: int
) -> None:
    stats = mock.stats()
    # Every session released what it held: whatever still runs belongs to nobody.
    assert mock.orphans(set()) == []
    assert stats.duplicates == 0, "two sandboxes for one idempotency key"
    assert stats.sandboxes_created == jobs, "one sandbox per job, no more"
    gate, _ = read_gate(redis_server.url, account)
    assert gate.create_slots.leases == (), "a create slot leaked"
    assert gate.capacity.leases == (), "a capacity permit leaked"
    assert gate.waiters == (), "a waiter was left in the queue"


def test_three_hosts_share_the_limits_and_stay_fair(
    redis_server: RedisServer,
    loaded_component: LoadedComponent,
    component_cache_dir: Path,
    tmp_path: Path,
) -> None:
    """Bugs caught: hosts enforcing limits each on their own (3 hosts x 4 slots reach E2B
    at once), a queue that serves one tenant's burst before the other's (FIFO across
    hosts), lost or duplicated sandboxes when hosts interleave compare-and-swaps."""
    jobs = list(iter_jobs(secrets.token_hex(2), ["tenant-a", "tenant-b"], 12))
    # Creates of 2 s: tenant-a's first grants are still in flight when tenant-b arrives,
    # even on a loaded machine (at 1 s, a slow start let a second wave of a's through first
    # and left too few a's waiting to tell FIFO apart).
    with _mock(create_latency_ms=2000) as mock:
        settings = _settings(
            redis_server, mock, loaded_component, component_cache_dir, create_latency_ms="2000"
        )
        with Cluster(settings, hosts=3, workdir=tmp_path) as cluster:
            cluster.start()
            # All of tenant-a's sessions ask first (on every host), then tenant-b's.
            first, second = jobs[:12], jobs[12:]
            cluster.assign(first)
            cluster.wait_for(
                lambda events: (
                    {j.id for j in first} <= {e["job"] for e in events if e["event"] == "outcome"}
                ),
                timeout=30,
                what="every tenant-a session answered",
            )
            cluster.assign(second)
            outcome = cluster.finish(timeout=90)
        stats = mock.stats()
        print(
            f"\ncreates in flight at E2B at most {stats.max_concurrent_creates} "
            f"(limit {CREATE_SLOTS}); sandboxes running at most {stats.max_running_sandboxes} "
            f"(limit {MAX_SANDBOXES}); outcomes {outcome.to_json()['outcomes']}"
        )
        assert stats.max_concurrent_creates <= CREATE_SLOTS
        assert stats.max_running_sandboxes <= MAX_SANDBOXES
        assert stats.throttled == 0, "E2B refused a create: a limit was overrun"
        assert stats.max_concurrent_creates == CREATE_SLOTS, "the workload never filled the slots"
        _assert_every_job_completed(outcome, len(jobs))
        # Every host did part of the work.
        assert all(host.results() for host in outcome.hosts)
        _assert_nothing_left(mock, redis_server, settings.account, len(jobs))

    # Fairness across hosts: all of tenant-a's sessions were waiting before tenant-b's
    # arrived. From the moment both tenants wait, first come, first served would grant
    # every waiting a before any b; the ring alternates between them. A tenant can still
    # get ahead by the permits whose front waiter of the other tenant has not polled yet
    # (each poll comes back after its retry_after_ms), at most a wave of CREATE_SLOTS.
    grants = outcome.grant_order()
    assert len(grants) == len(jobs)
    both_waiting = grants_after(grants, outcome.events, {job.id for job in second})
    a_waiting = sum(1 for e in both_waiting if e["tenant"] == "tenant-a")
    print(
        f"grant order: {_letters(grants)}; once both tenants wait: "
        f"{_letters(both_waiting)} (max lead {max_tenant_lead(both_waiting)}, first come "
        f"first served: {a_waiting})"
    )
    assert a_waiting > CREATE_SLOTS, "too few of a's sessions waiting to tell FIFO apart"
    assert max_tenant_lead(both_waiting) <= CREATE_SLOTS


def _letters(order: list[dict[str, object]]) -> str:
    return "".join(str(event["tenant"])[-1] for event in order)


def test_killed_host_mid_create_loses_no_permit_and_no_sandbox(
    redis_server: RedisServer,
    loaded_component: LoadedComponent,
    component_cache_dir: Path,
    tmp_path: Path,
) -> None:
    """kill -9 one host while its creates are in flight (1 s each at E2B) and its other
    sessions wait in the queue; the survivors re-drive its jobs.

    Bugs caught: a dead host's create slots held forever (leases that never expire, or
    expiry read from a host's own clock), a re-driven provision creating a second sandbox
    instead of adopting the one the dead host's create made (idempotency key not kept),
    a sandbox nobody releases, a limit overrun while the dead host's slots come back."""
    jobs = list(iter_jobs(secrets.token_hex(2), ["tenant-a", "tenant-b"], 12))
    victim = "host-2"
    with _mock(create_latency_ms=1000) as mock:
        settings = _settings(
            redis_server,
            mock,
            loaded_component,
            component_cache_dir,
            turns=3,
            turn_s=0.3,
            create_latency_ms="1000",
        )
        with Cluster(settings, hosts=3, workdir=tmp_path) as cluster:
            cluster.start()
            cluster.assign(jobs)
            events = cluster.wait_for(
                creating_with_sessions_queued(victim),
                timeout=30,
                what=f"{victim} creating with sessions queued",
            )
            # Every create sent so far has reached E2B, the victim's among them.
            sent = sum(1 for e in events if e["event"] == "create_sent")
            mock.wait_for(lambda stats: stats.creates_attempted >= sent, timeout=10)
            victim_jobs = {job.id for job in cluster.host(victim).assigned}
            victim_entities = {f"{ENTITY_TYPE}/{job_id}" for job_id in victim_jobs}
            unfinished = cluster.kill(victim)
            gate, killed_at_ms = read_gate(redis_server.url, settings.account)
            orphaned_leases = {
                lease.lease_id
                for lease in gate.create_slots.leases
                if lease.entity in victim_entities
            }
            # Killed while holding create slots, with sessions still queued.
            assert orphaned_leases, "the victim held no create slot when it died"
            assert len(unfinished) == len(victim_jobs)
            lease_expiry_ms = (
                max(
                    lease.expires_ms
                    for lease in gate.create_slots.leases
                    if lease.lease_id in orphaned_leases
                )
                - killed_at_ms
            )
            reclaimed_at_ms = wait_until_leases_leave(
                redis_server.url, settings.account, orphaned_leases, timeout=30
            )
            outcome = cluster.finish(timeout=90)
        stats = mock.stats()
        print(
            f"\nkilled {victim} holding {len(orphaned_leases)} create slot(s) with "
            f"{len(unfinished)} unfinished jobs; its leases expired {lease_expiry_ms} ms and "
            f"were reclaimed {reclaimed_at_ms - killed_at_ms} ms after the kill (create lease "
            f"{CREATE_LEASE_MS} ms); creates in flight at E2B at most "
            f"{stats.max_concurrent_creates} (limit {CREATE_SLOTS}); sandboxes created "
            f"{stats.sandboxes_created} for {len(jobs)} jobs, adopted by idempotency key "
            f"{stats.idempotent_replays}; outcomes {outcome.to_json()['outcomes']}"
        )
        assert stats.max_concurrent_creates <= CREATE_SLOTS
        assert stats.max_running_sandboxes <= MAX_SANDBOXES
        assert stats.throttled == 0
        _assert_every_job_completed(outcome, len(jobs))
        # The victim's create went on at E2B after it died; a survivor adopted the sandbox.
        assert stats.idempotent_replays >= 1
        # The survivors finished every one of the victim's jobs.
        assert {outcome.results[job_id]["host"] for job_id in victim_jobs} <= {
            "host-1",
            "host-3",
        }
        _assert_nothing_left(mock, redis_server, settings.account, len(jobs))


def _fsync_every_write(redis_server: RedisServer) -> None:
    """Redis acknowledges a write before the append-only file is synced (`everysec`), so a
    crash may lose the last second: a lost grant would let its slot be granted twice. A
    deployment that must hold its limits across a Redis crash syncs every write."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.config_set("appendfsync", "always")
    finally:
        client.close()


def _storage_trouble(event: Event) -> bool:
    return event["event"] == "outcome" and (
        event.get("reason") == "storage" or event.get("code") == "storage_unavailable"
    )


def test_redis_killed_and_restarted_mid_run(
    redis_server: RedisServer,
    loaded_component: LoadedComponent,
    component_cache_dir: Path,
    tmp_path: Path,
) -> None:
    """kill -9 Redis while three hosts are mid-run, then start it again.

    Bugs caught: a storage error escaping as a trap or a non-retryable failure (the session
    would be lost), a host granting without storage (fail open: a limit overrun), a backend
    that stays broken after Redis returns, a create answered during the outage leaving an
    orphan or being made twice."""
    _fsync_every_write(redis_server)
    jobs = list(iter_jobs(secrets.token_hex(2), ["tenant-a", "tenant-b"], 12))
    with _mock(create_latency_ms=1000) as mock:
        settings = _settings(
            redis_server, mock, loaded_component, component_cache_dir, create_latency_ms="1000"
        )
        with Cluster(settings, hosts=3, workdir=tmp_path) as cluster:
            cluster.start()
            cluster.assign(jobs)
            cluster.wait_for(
                lambda events: (
                    sum(e["event"] == "granted" for e in events) >= 6
                    and bool(creates_in_flight(events))
                ),
                timeout=30,
                what="six grants and a create in flight",
            )
            redis_server.kill()
            down_at = time.monotonic()
            # Answers already on their way may still land before the kill: a create of
            # 1 s leaves the next ones in flight.
            in_flight = creates_in_flight(cluster.events())
            assert in_flight
            # Redis stays down until E2B has answered the creates in flight (so their
            # results cannot be recorded) and every host has met the outage.
            cluster.wait_for(
                lambda events: (
                    in_flight <= answered_creates(events)
                    and len({e["host"] for e in events if _storage_trouble(e)}) == 3
                ),
                timeout=30,
                what="the creates in flight answered and every host meeting the outage",
            )
            redis_server.start()
            outage_s = time.monotonic() - down_at
            _fsync_every_write(redis_server)
            outcome = cluster.finish(timeout=90)
        stats = mock.stats()
        counts = outcome.to_json()["outcomes"]
        print(
            f"\nRedis down {outage_s:.2f} s; creates in flight at E2B at most "
            f"{stats.max_concurrent_creates} (limit {CREATE_SLOTS}); sandboxes created "
            f"{stats.sandboxes_created} for {len(jobs)} jobs, adopted "
            f"{stats.idempotent_replays}; outcomes {counts}"
        )
        failures = [e for e in outcome.events if e["event"] == "outcome" and "code" in e]
        assert all(e["retryable"] for e in failures), failures
        assert {e.get("code") for e in failures} <= {"storage_unavailable"}, failures
        assert any(_storage_trouble(e) for e in outcome.events)
        # A create answered while Redis was down was adopted afterwards, not made again.
        assert stats.idempotent_replays >= 1
        assert stats.max_concurrent_creates <= CREATE_SLOTS
        assert stats.max_running_sandboxes <= MAX_SANDBOXES
        assert stats.throttled == 0
        _assert_every_job_completed(outcome, len(jobs))
        _assert_nothing_left(mock, redis_server, settings.account, len(jobs))


def test_fairness_measure_tells_first_come_first_served_from_round_robin() -> None:
    """The bound above fails for a queue that serves one tenant's waiters first."""

    def grants(letters: str) -> list[Event]:
        return [{"tenant": f"tenant-{letter}"} for letter in letters]

    assert max_tenant_lead(grants("aaaaaaabbbbbbbb")) == 7 > CREATE_SLOTS
    assert max_tenant_lead(grants("abababaabbabbbb")) <= CREATE_SLOTS
    # Once tenant-a has nobody left waiting, tenant-b's tail is not a lead (seen in CI).
    assert max_tenant_lead(grants("abababababbbbbb")) == 1


def test_multihost_command_runs_a_workload_with_a_kill(
    redis_server: RedisServer,
    loaded_component: LoadedComponent,
    component_cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The `multihost` command the CLI wires: two hosts, one killed mid-create; its JSON
    report says every job completed within the limits with nothing left behind."""
    parser = argparse.ArgumentParser()
    add_multihost_arguments(parser)
    args = parser.parse_args(
        [
            "--hosts", "2", "--jobs", "8", "--kill", "host-2", "--storage", redis_server.url,
            "--component", str(loaded_component.path), "--cache-dir", str(component_cache_dir),
            "--create-latency-ms", "500", "--turns", "2", "--json",
        ]
    )  # fmt: skip
    code = run_multihost(args)
    report = json.loads(capsys.readouterr().out)
    summary = report["summary"]
    assert code == 0, summary
    assert summary["completed"] == 8
    assert summary["kill"]["host"] == "host-2"
    assert summary["max_concurrent_creates"] <= summary["create_slots"]
    assert summary["orphaned_sandboxes"] == summary["duplicate_sandboxes"] == 0
    assert summary["permits_left"] == summary["waiters_left"] == 0
    assert {host["name"]: host["killed"] for host in report["hosts"]} == {
        "host-1": False,
        "host-2": True,
    }


def _holding_sandboxes_with_sessions_queued(host: str) -> Callable[[list[Event]], bool]:
    """The host's sessions hold a sandbox while another of its sessions is queued now."""

    def holds(events: list[Event]) -> bool:
        last: dict[str, str] = {}
        for event in events:
            if event["host"] == host and event["event"] == "session":
                last[event["job"]] = event["kind"]
        return any(kind in ("ready", "turn") for kind in last.values()) and any(
            kind == "queued" for kind in last.values()
        )

    return holds


def test_killed_host_holding_sandboxes_hands_them_to_the_survivors(
    redis_server: RedisServer,
    loaded_component: LoadedComponent,
    component_cache_dir: Path,
    tmp_path: Path,
) -> None:
    """kill -9 a host whose sessions hold sandboxes (and others wait). Bugs caught: a
    re-driven provision creating a second sandbox instead of returning the one the entity
    holds, a capacity permit left held by the dead host, a sandbox nobody kills."""
    jobs = list(iter_jobs(secrets.token_hex(2), ["tenant-a", "tenant-b"], 12))
    victim = "host-2"
    with _mock() as mock:
        settings = _settings(
            redis_server, mock, loaded_component, component_cache_dir, turns=4, turn_s=0.3
        )
        with Cluster(settings, hosts=3, workdir=tmp_path) as cluster:
            cluster.start()
            cluster.assign(jobs)
            events = cluster.wait_for(
                _holding_sandboxes_with_sessions_queued(victim),
                timeout=30,
                what=f"{victim} holding a sandbox with sessions queued",
            )
            held = {
                e["job"]: e["detail"]["sandbox_id"]
                for e in events
                if e["host"] == victim and e["event"] == "session" and e["kind"] == "ready"
            }
            unfinished = cluster.kill(victim)
            outcome = cluster.finish(timeout=90)
        stats = mock.stats()
        print(f"\nkilled {victim} holding sandboxes {held}; {len(unfinished)} jobs re-driven")
        assert held and unfinished
        _assert_every_job_completed(outcome, len(jobs))
        # The survivors finished the victim's sessions on the sandboxes it held.
        for job_id, sandbox_id in held.items():
            if job_id in {job.id for job in unfinished}:
                assert outcome.results[job_id]["sandbox_id"] == sandbox_id
        assert stats.max_concurrent_creates <= CREATE_SLOTS
        assert stats.max_running_sandboxes <= MAX_SANDBOXES
        _assert_nothing_left(mock, redis_server, settings.account, len(jobs))
