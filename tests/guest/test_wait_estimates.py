"""When a permit should be free for a waiter (provisioner/gates/policies.py): capacity
(`capacity_wait_ms`) from the sandbox leases' expiries, or from the observed hold time once
one is known, in waves of the capacity limit; a create slot (`slot_wait_ms`) from the
creates in flight and the create latency, in waves of the slots."""

from __future__ import annotations

import pytest

from provisioner.config import AdmissionConfig
from provisioner.gates.document import CreateLease, GateState, SandboxLease
from provisioner.gates.policies import capacity_wait_ms, slot_wait_ms

NOW = 1_000_000
LATENCY_MS = AdmissionConfig().create_latency_ms


def holding(*leases: tuple[int, int], hold_ms: int | None = None) -> GateState:
    """A gate whose sandboxes started `ago` ms before now and last `ttl` ms each."""
    state = GateState(hold_ms=hold_ms)
    for i, (ago, ttl) in enumerate(leases):
        started = NOW - ago
        lease = SandboxLease(f"c{i}", "tenant-a", f"Job/{i}", started + ttl, started, f"sbx-{i}")
        state.sandbox_leases.append(lease)
    return state


@pytest.mark.parametrize(
    ("position", "expected"),
    [
        (1, 9_000),  # the first lease to expire
        (2, 19_500),  # the second
        (3, 9_000 + 19_500),  # the first again, a whole cycle (the longest wait) later
    ],
)
def test_without_a_hold_time_capacity_frees_as_the_leases_expire(
    position: int, expected: int
) -> None:
    # Catches: the waves counted from the wrong position, or later waves not added.
    state = holding((1_000, 10_000), (500, 20_000))
    config = AdmissionConfig(max_sandboxes=2)
    assert capacity_wait_ms(state, config, NOW, position) == expected


@pytest.mark.parametrize(
    ("position", "expected"),
    [(1, 0), (2, 3_500), (3, 0 + 4_000), (4, 3_500 + 4_000)],
)
def test_with_a_hold_time_capacity_frees_when_the_holds_should_end(
    position: int, expected: int
) -> None:
    # Catches: the observed hold time ignored (lease expiries used instead), added the
    # wrong way, a hold already over counted as 1 ms away, or the cycle between waves not
    # the hold time.
    state = holding((10_000, 60_000), (500, 60_000), hold_ms=4_000)
    config = AdmissionConfig(max_sandboxes=2, create_latency_ms=1_000)
    assert capacity_wait_ms(state, config, NOW, position) == expected


def test_with_one_sandbox_each_later_waiter_waits_one_more_cycle() -> None:
    # Catches: waves divided among more sandboxes than are held.
    state = holding((1_000, 10_000))
    config = AdmissionConfig(max_sandboxes=1)
    waits = [capacity_wait_ms(state, config, NOW, position) for position in (1, 2, 3)]
    assert waits == [9_000, 9_000 + 9_000, 9_000 + 2 * 9_000]


@pytest.mark.parametrize(("position", "expected"), [(1, 0), (2, 9_000)])
def test_a_waiter_within_the_free_capacity_waits_for_nothing(position: int, expected: int) -> None:
    # Catches: a waiter that fits in the free capacity given a wait, or the free capacity
    # counted against the waiters beyond it the wrong way.
    state = holding((1_000, 10_000))
    config = AdmissionConfig(max_sandboxes=2)
    assert capacity_wait_ms(state, config, NOW, position) == expected


def test_with_no_sandbox_held_the_wait_is_the_create_latency() -> None:
    state = GateState(capacity=0)
    assert capacity_wait_ms(state, AdmissionConfig(), NOW, 2) == LATENCY_MS


def test_the_last_waiter_that_fits_the_free_capacity_waits_for_nothing() -> None:
    # Catches: the boundary of the free capacity off by one (the waiter at exactly the
    # free count sent into the waves' arithmetic).
    state = holding((10_000, 60_000), (500, 60_000), hold_ms=4_000)
    config = AdmissionConfig(max_sandboxes=3, create_latency_ms=1_000)
    assert capacity_wait_ms(state, config, NOW, 1) == 0


def creating(*started_ago: int, latency_ms: int) -> GateState:
    """A gate with creates in flight, sent `started_ago` ms before now."""
    leases = [
        CreateLease(f"c{i}", "tenant-a", f"Job/{i}", NOW + 150_000, NOW - ago, NOW + 3_600_000)
        for i, ago in enumerate(started_ago)
    ]
    return GateState(create_leases=leases, latency_ms=latency_ms)


@pytest.mark.parametrize(
    ("position", "expected"),
    [
        (1, 0),  # a free slot
        (2, 0),  # the create sent 5 s ago should have answered already
        (3, 1_000),  # the create sent 1 s ago answers in a second
        (4, 0 + 2_000),  # the free slot again, one latency later
        (6, 1_000 + 2_000),
    ],
)
def test_create_slots_free_as_the_creates_in_flight_should_answer(
    position: int, expected: int
) -> None:
    # Catches: a free slot or an overdue create counted as 1 ms away, or later waves
    # subtracted instead of added.
    state = creating(5_000, 1_000, latency_ms=2_000)
    config = AdmissionConfig(create_slots=3)
    assert slot_wait_ms(state, config, NOW, position) == expected
