"""The acceptance scenarios of issue 3, run in the deterministic simulation."""

from __future__ import annotations

import math

import pytest

from harness.mocks.e2b.config import FaultRule
from provisioner.config import AdmissionConfig
from tests.guest.harness import (
    SIMULATED_E2B,
    SessionSpec,
    SimReport,
    Storm,
    lower_bound_ms,
    run,
    uniform_sessions,
)


def assert_everyone_served(report: SimReport) -> None:
    assert report.failures() == {}
    assert report.completed == len(report.sessions)


@pytest.mark.parametrize(
    ("rate", "latency", "jitter"),
    [
        (1.0, 3_000, 0),  # rate-bound: E2B Hobby
        (100.0, 5_000, 0),  # slot-bound
        (1.0, 6_000, 500),  # slot- and rate-bound, uneven latency
        (5.0, 2_000, 1_000),  # E2B Pro rate
    ],
)
def test_ten_sessions_at_once_all_get_sandboxes_near_the_lower_bound(
    rate: float, latency: int, jitter: int
) -> None:
    # Catches: the incident (6 of 10 starved), more than C creates in flight, or a queue
    # that wastes time (polling too late) compared with what the limits allow.
    config = AdmissionConfig(create_slots=4, create_rate_per_s=rate)
    report = run(
        uniform_sessions(10, hold_ms=20_000),
        admission=config,
        e2b=SIMULATED_E2B.replace(create_latency_ms=latency, create_latency_jitter_ms=jitter),
        seed=7,
    )
    assert_everyone_served(report)
    assert report.e2b.max_in_flight <= 4
    bound = lower_bound_ms(10, 4, latency, rate, 20_000)
    assert report.makespan_ms <= 1.10 * (bound + jitter)


def test_a_holder_vanishing_mid_create_frees_its_slot_when_the_lease_expires() -> None:
    # Catches: a crashed invocation's create slot lost for good (needing an operator).
    config = AdmissionConfig(create_slots=1, create_rate_per_s=10.0, create_lease_ms=30_000)
    sessions = [SessionSpec("tenant-a", "CurationJob/crash", vanish_mid_create=True)]
    sessions += [SessionSpec("tenant-a", f"CurationJob/{i}", arrive_ms=10) for i in range(3)]
    report = run(sessions, admission=config, seed=1)
    crashed, *others = report.sessions
    assert crashed.vanished and crashed.created_ms is None
    assert all(s.released_ms is not None for s in others)
    next_grant = min(s.granted_ms[0] for s in others)
    assert 30_000 <= next_grant <= 30_000 + config.poll_max_ms


def test_a_second_tenant_is_served_within_two_grants_of_the_gate() -> None:
    # Catches: FIFO across tenants (B behind A's 50 jobs) instead of round-robin.
    config = AdmissionConfig(create_slots=4, create_rate_per_s=1.0)
    sessions = uniform_sessions(50, tenant="tenant-a", hold_ms=5_000)
    sessions += uniform_sessions(2, tenant="tenant-b", hold_ms=5_000, arrive_ms=1)
    report = run(sessions, admission=config, seed=3)
    assert_everyone_served(report)
    after = [tenant for when, tenant, _ in report.grants if when >= 1]
    b_places = [index for index, tenant in enumerate(after) if tenant == "tenant-b"]
    assert b_places[0] <= 1, f"B's first job waited for {b_places[0]} grants"
    assert b_places[1] - b_places[0] <= 2, "B's second job waited more than one round"


def test_fifo_within_a_tenant() -> None:
    # Catches: a later job of a tenant overtaking an earlier one.
    config = AdmissionConfig(create_slots=2, create_rate_per_s=2.0)
    sessions = [
        SessionSpec("tenant-a", f"CurationJob/{i:02d}", arrive_ms=i * 10, hold_ms=1_000)
        for i in range(20)
    ]
    report = run(sessions, admission=config, seed=5)
    assert_everyone_served(report)
    assert [entity for _, _, entity in report.grants] == [s.entity for s in sessions]


def test_a_429_storm_with_retry_after_silences_creates_during_the_cooldown() -> None:
    # Catches: invocations hammering E2B while it asked everyone to wait.
    config = AdmissionConfig(create_slots=4, create_rate_per_s=5.0)
    storm = Storm(start_ms=2_000, end_ms=12_000)
    e2b = SIMULATED_E2B.replace(create_latency_ms=1_000, storms=(storm,))
    report = run(uniform_sessions(30, hold_ms=5_000), admission=config, e2b=e2b, seed=11)
    assert_everyone_served(report)
    first_429_recorded = min(
        when
        for when, _, what, detail in report.trace
        if what == "settled" and detail == "RateLimited"
    )
    during = [t for t in report.e2b.create_times if first_429_recorded <= t < storm.end_ms]
    assert during == []
    assert report.e2b.answers["429_storm"] <= 4, "only creates already in flight hit the storm"


def test_e2b_rate_limit_429s_are_rare_when_the_configured_rate_matches() -> None:
    # Catches: a rate gate that does not pace creates to the account's real limit.
    config = AdmissionConfig(create_slots=4, create_rate_per_s=1.0)
    e2b = SIMULATED_E2B.replace(create_latency_ms=2_000, create_rate_per_s=1.0)
    report = run(uniform_sessions(15, hold_ms=5_000), admission=config, e2b=e2b, seed=2)
    assert_everyone_served(report)
    assert report.e2b.answers.get("429_rate", 0) == 0


def test_a_shared_account_shrinks_capacity_instead_of_failing() -> None:
    # Catches: sessions failing on the concurrent-sandbox cap someone else fills.
    config = AdmissionConfig(create_slots=4, create_rate_per_s=5.0, max_sandboxes=20)
    e2b = SIMULATED_E2B.replace(create_latency_ms=1_000, max_sandboxes=20, foreign_sandboxes=15)
    report = run(uniform_sessions(30, hold_ms=10_000), admission=config, e2b=e2b, seed=4)
    assert_everyone_served(report)
    assert report.e2b.max_sandboxes <= 5
    assert report.e2b.answers.get("429_cap", 0) <= 10


def test_random_5xx_answers_are_retried_within_the_budget() -> None:
    # Catches: one 503 failing a session, or retries unbounded.
    config = AdmissionConfig(create_slots=4, create_rate_per_s=5.0)
    e2b = SIMULATED_E2B.replace(
        create_latency_ms=1_000, faults=(FaultRule(status=503, probability=0.2),)
    )
    report = run(uniform_sessions(40, hold_ms=5_000), admission=config, e2b=e2b, seed=9)
    assert report.failures().keys() <= {"retry_budget_exhausted"}
    assert report.completed >= 38
    retries = sum(s.attempts - 1 for s in report.sessions)
    assert retries <= config.retry_budget + config.retry_ratio * 40 + report.end_ms / 1000 * 0.1 + 1


def test_sessions_that_stop_polling_do_not_block_the_rest() -> None:
    # Catches: dead sessions' tickets holding the queue (the "stuck" look of the incident).
    config = AdmissionConfig(create_slots=2, create_rate_per_s=2.0, waiter_ttl_ms=20_000)
    sessions = [
        SessionSpec("tenant-a", f"CurationJob/{i}", stop_polling_after=1 if i % 3 == 1 else None)
        for i in range(15)
    ]
    report = run(sessions, admission=config, seed=6)
    dead = [s for s in report.sessions if s.spec.stop_polling_after is not None]
    alive = [s for s in report.sessions if s.spec.stop_polling_after is None]
    assert all(s.released_ms is not None for s in alive)
    assert all(s.created_ms is None for s in dead if s.vanished)
    assert report.makespan_ms <= 200_000


def test_the_queue_timeout_ends_waits_with_a_typed_failure() -> None:
    # Catches: waiters kept waiting past the configured queue timeout.
    config = AdmissionConfig(max_sandboxes=2, queue_timeout_ms=30_000)
    report = run(uniform_sessions(10, hold_ms=60_000), admission=config, seed=8)
    assert report.completed >= 1
    assert set(report.failures()) == {"queue_timeout"}
    for session in report.sessions:
        if session.failure == "queue_timeout":
            assert session.created_ms is None


def test_a_run_replays_exactly_from_its_seed() -> None:
    # Catches: hidden nondeterminism (wall clock, OS randomness, dict order).
    config = AdmissionConfig(create_slots=3, create_rate_per_s=2.0)
    e2b = SIMULATED_E2B.replace(
        create_latency_ms=1_500,
        create_latency_jitter_ms=800,
        faults=(FaultRule(status=503, probability=0.1),),
    )
    sessions = uniform_sessions(25, hold_ms=3_000) + uniform_sessions(5, tenant="tenant-b")
    first = run(sessions, admission=config, e2b=e2b, seed=42)
    again = run(sessions, admission=config, e2b=e2b, seed=42)
    other = run(sessions, admission=config, e2b=e2b, seed=43)
    assert first.trace == again.trace
    assert first.trace != other.trace


def test_thousands_of_sessions_across_tenants_respect_every_limit() -> None:
    # Catches: limits or fairness that only hold for small queues.
    config = AdmissionConfig(
        create_slots=20, create_rate_per_s=50.0, max_sandboxes=100, max_sandboxes_per_tenant=40
    )
    sessions = [
        SessionSpec(
            f"tenant-{i % 7}", f"CurationJob/{i}", arrive_ms=(i * 37) % 20_000, hold_ms=8_000
        )
        for i in range(2_000)
    ]
    e2b = SIMULATED_E2B.replace(create_latency_ms=2_000, create_latency_jitter_ms=1_000)
    report = run(sessions, admission=config, e2b=e2b, seed=12)
    assert_everyone_served(report)
    assert report.e2b.max_in_flight <= 20
    assert report.e2b.max_sandboxes <= 100
    ideal = max(2_000 / 20 * 2_500, 2_000 / 50 * 1000, math.ceil(2_000 / 100) * 10_500)
    assert report.makespan_ms <= 1.25 * ideal


def test_a_fast_rate_is_not_throttled_by_the_polling_interval() -> None:
    # Catches: waiters held only by the rate told to come back after poll_min (200 ms),
    # which caps grants at 5/s whatever the configured rate.
    config = AdmissionConfig(create_slots=20, create_rate_per_s=20.0, max_sandboxes=200)
    e2b = SIMULATED_E2B.replace(create_latency_ms=500)
    report = run(uniform_sessions(200, hold_ms=1_000), admission=config, e2b=e2b, seed=13)
    assert_everyone_served(report)
    assert report.makespan_ms <= 1.10 * lower_bound_ms(200, 20, 500, 20.0, 1_000)
