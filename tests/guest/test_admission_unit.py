"""Admission controller behaviour, one rule at a time, over the in-memory backend."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace

import pytest

from host.services.namespaces import ScopedStorage, account_namespace
from host.storage.base import StorageBackend
from provisioner.config import AdmissionConfig
from provisioner.failures import FailureCode
from provisioner.gates.document import GateState, TenantQueue, ticket_key, waiter_key
from provisioner.gates.place import Place, Stage
from provisioner.gates.policies import backoff_ms
from provisioner.gates.queue import MAX_REMOVED_OUT_OF_ORDER, enqueue, fair_order
from provisioner.gates.results import (
    CapacityExhausted,
    Created,
    CreateFailed,
    CreateResult,
    Grant,
    Queued,
    RateLimited,
    Rejected,
    Unavailable,
    Waiter,
)
from provisioner.gates.view import GateView, inspect_gates
from provisioner.model import Failure
from provisioner.ports import LogLevel, Scope, StorageConflict, StorageUnavailable
from tests.doubles import InterposedBackend
from tests.guest.harness import (
    ACCOUNT,
    FAST,
    START_MS,
    Harness,
    grant_of,
    queued_of,
    retry_promised_the_free_slot,
)


def waiters(count: int, tenant: str = "tenant-a") -> list[Waiter]:
    return [Waiter(tenant, f"CurationJob/{tenant}-{i}") for i in range(count)]


def test_create_slots_bound_concurrent_creates_and_a_settle_frees_one() -> None:
    # Catches: more grants than create slots, or a settled create keeping its slot.
    harness = Harness(AdmissionConfig(create_slots=2, create_rate_per_s=1000, create_burst=100))
    ws = waiters(4)
    first = [harness.admit(w) for w in ws]
    assert [type(d).__name__ for d in first] == ["Grant", "Grant", "Queued", "Queued"]
    third = queued_of(first[2])
    assert (third.reason, third.position, third.in_use, third.limit) == ("create_slots", 1, 2, 2)
    assert queued_of(harness.admit(ws[3])).position == 2
    assert harness.settle(ws[0], grant_of(first[0]), Created("sbx-0", 600_000)) is None
    assert isinstance(harness.admit(ws[3]), Queued), "the fourth may not overtake the third"
    assert isinstance(harness.admit(ws[2]), Grant)


def test_rate_gate_spaces_grants_by_the_interval() -> None:
    # Catches: a rate gate that lets creates through back to back.
    harness = Harness(AdmissionConfig(create_rate_per_s=2.0))
    a, b = waiters(2)
    grant_of(harness.admit(a))
    held = queued_of(harness.admit(b))
    assert held.reason == "rate"
    assert held.eta_ms == 500
    harness.advance(499)
    assert isinstance(harness.admit(b), Queued)
    harness.advance(1)
    assert isinstance(harness.admit(b), Grant)


def test_asking_again_keeps_the_place_and_adds_no_ticket() -> None:
    # Catches: duplicate tickets for a repeated Provision, or a waiter losing its place.
    harness = Harness(AdmissionConfig(create_slots=1, create_rate_per_s=1000))
    ws = waiters(4)
    grant_of(harness.admit(ws[0]))
    places = [queued_of(harness.admit(w)).position for w in ws[1:]]
    again = [queued_of(harness.admit(w)) for w in ws[1:] for _ in range(3)]
    assert places == [1, 2, 3]
    assert [q.position for q in again] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert {q.queue_length for q in again} == {3}


def test_a_waiter_with_its_create_in_flight_gets_no_second_grant() -> None:
    # Catches: a duplicate invocation sending a second create for the same entity.
    harness = Harness(FAST)
    (w,) = waiters(1)
    grant_of(harness.admit(w))
    again = queued_of(harness.admit(w))
    assert (again.reason, again.position) == ("create_slots", 0)
    assert harness.status()["account"]["create_slots"]["in_use"] == 1


def test_a_dead_holders_create_slot_returns_when_its_lease_expires() -> None:
    # Catches: a crashed invocation holding its create slot forever.
    config = AdmissionConfig(create_slots=1, create_rate_per_s=1000, create_lease_ms=10_000)
    harness = Harness(config)
    crashed, patient = waiters(2)
    grant_of(harness.admit(crashed))  # ... and never settles
    assert queued_of(harness.admit(patient)).reason == "create_slots"
    harness.advance(9_999)
    assert isinstance(harness.admit(patient), Queued)
    harness.advance(1)
    assert isinstance(harness.admit(patient), Grant)


def test_capacity_is_held_from_create_to_release() -> None:
    # Catches: capacity counted only while creating, or not returned on release.
    harness = Harness(AdmissionConfig(max_sandboxes=2, create_rate_per_s=1000, create_burst=10))
    ws = waiters(3)
    for w in ws[:2]:
        assert harness.settle(w, grant_of(harness.admit(w)), Created(w.entity, 600_000)) is None
    held = queued_of(harness.admit(ws[2]))
    assert (held.reason, held.in_use, held.limit) == ("capacity", 2, 2)
    assert harness.release(ws[0]) is True
    assert isinstance(harness.admit(ws[2]), Grant)


def test_a_sandbox_lease_expires_with_the_sandbox_timeout() -> None:
    # Catches: a sandbox whose owner never released it blocking capacity forever.
    harness = Harness(AdmissionConfig(max_sandboxes=1, create_rate_per_s=1000))
    a, b = waiters(2)
    harness.settle(a, grant_of(harness.admit(a)), Created("sbx-a", 60_000))
    assert queued_of(harness.admit(b)).reason == "capacity"
    harness.advance(60_000)
    assert isinstance(harness.admit(b), Grant)
    assert harness.release(a) is False, "an expired lease is no longer held"


def test_a_lowered_capacity_waits_for_every_sandbox_held_beyond_it() -> None:
    # Catches: a capacity ETA that ignores the sandboxes held beyond a lowered max_sandboxes
    # (the waiter would be told to come back when the first sandbox ends, still over it).
    harness = Harness(AdmissionConfig(max_sandboxes=3, create_rate_per_s=1000, create_burst=10))
    ws = waiters(4)
    for w in ws[:3]:
        harness.settle(w, grant_of(harness.admit(w)), Created(w.entity, 60_000))
        harness.advance(10_000)
    harness.config = replace(harness.config, max_sandboxes=1)
    held = queued_of(harness.admit(ws[3]))
    # The sandboxes end at 60, 70 and 80 s and it is 30 s: one of one is free after the third.
    assert (held.reason, held.in_use, held.limit, held.eta_ms) == ("capacity", 3, 1, 50_000)


def test_per_tenant_cap_holds_one_tenant_without_blocking_another() -> None:
    # Catches: a full tenant blocking the queue for every other tenant.
    config = AdmissionConfig(
        max_sandboxes=10, max_sandboxes_per_tenant=1, create_rate_per_s=1000, create_burst=10
    )
    harness = Harness(config)
    a1, a2 = waiters(2, "tenant-a")
    (b1,) = waiters(1, "tenant-b")
    harness.settle(a1, grant_of(harness.admit(a1)), Created("sbx-a1", 600_000))
    held = queued_of(harness.admit(a2))
    assert (held.reason, held.in_use, held.limit) == ("capacity", 1, 1)
    assert isinstance(harness.admit(b1), Grant)


def test_retry_after_sets_a_shared_cooldown_and_the_retry_keeps_the_front() -> None:
    # Catches: a cooldown not shared across invocations, or a retried waiter losing its place.
    harness = Harness(AdmissionConfig(create_slots=1, create_rate_per_s=1000))
    first, second = waiters(2)
    grant = grant_of(harness.admit(first))
    cooled = queued_of(harness.settle(first, grant, RateLimited(retry_after_ms=5_000)))
    assert cooled.reason == "backoff"
    assert cooled.retry_after_ms >= 5_000
    other = queued_of(harness.admit(second))
    assert other.reason == "backoff"
    assert other.position == 2
    harness.advance(4_999)
    assert queued_of(harness.admit(first)).reason == "backoff"
    harness.advance(1)
    assert isinstance(harness.admit(second), Queued), "the retry is served first"
    retry = grant_of(harness.admit(first))
    assert retry.attempt == 2


def test_5xx_backs_off_with_full_jitter_below_the_exponential_ceiling() -> None:
    # Catches: backoff without jitter (a synchronised herd) or above the cap.
    seen: list[int] = []
    for seed in range(30):
        harness = Harness(FAST, seed=seed)
        (w,) = waiters(1)
        harness.settle(w, grant_of(harness.admit(w)), Unavailable(503))
        seen.append(harness.status()["account"]["backoff"]["cooling_ms"])
    assert all(0 <= ms <= 500 for ms in seen)
    assert len(set(seen)) > 10


def test_consecutive_failures_grow_the_backoff_ceiling_up_to_the_cap() -> None:
    # Catches: a backoff that never grows, or one that grows past 30 s.
    harness = Harness(FAST, seed=3)
    (w,) = waiters(1)
    cooldowns = []
    config = AdmissionConfig(create_rate_per_s=1000, max_create_attempts=50, retry_budget=100)
    harness.config = config
    for _ in range(12):
        decision = harness.admit(w)
        while isinstance(decision, Queued):
            harness.advance(decision.retry_after_ms)
            decision = harness.admit(w)
        harness.settle(w, grant_of(decision), Unavailable(None))
        cooldowns.append(harness.status()["account"]["backoff"]["cooling_ms"])
    assert max(cooldowns) <= 30_000
    assert max(cooldowns[8:]) > 2_000


def test_capacity_429_shrinks_to_what_was_observed_and_grows_back() -> None:
    # Catches: retrying into a full shared account, or never regaining capacity.
    config = AdmissionConfig(
        max_sandboxes=10, create_rate_per_s=1000, create_burst=10, capacity_grow_after=2
    )
    harness = Harness(config)
    ws = waiters(8)
    for w in ws[:3]:
        harness.settle(w, grant_of(harness.admit(w)), Created(w.entity, 600_000))
    refused = queued_of(
        harness.settle(ws[3], grant_of(harness.admit(ws[3])), CapacityExhausted(10))
    )
    assert refused.reason == "capacity"
    assert harness.status()["account"]["capacity"]["limit"] == 3
    assert queued_of(harness.admit(ws[4])).reason == "capacity"
    harness.release(ws[0])
    harness.release(ws[1])
    for w in (ws[3], ws[4]):
        harness.settle(w, grant_of(harness.admit(w)), Created(w.entity, 600_000))
    assert harness.status()["account"]["capacity"]["limit"] == 4


def test_non_retryable_create_failure_rejects_and_forgets_the_waiter() -> None:
    # Catches: a 401 retried forever, or its slot kept.
    harness = Harness(FAST)
    (w,) = waiters(1)
    failure = Failure("e2b_unauthorized", "bad key", retryable=False)
    rejected = harness.settle(w, grant_of(harness.admit(w)), CreateFailed(failure))
    assert rejected == Rejected(failure)
    assert harness.status()["account"]["create_slots"]["in_use"] == 0
    assert grant_of(harness.admit(w)).attempt == 1


def test_attempts_are_bounded_per_waiter() -> None:
    # Catches: a storm retrying one waiter without end.
    config = AdmissionConfig(create_rate_per_s=1000, max_create_attempts=3)
    harness = Harness(config)
    (w,) = waiters(1)
    outcomes: list[object] = []
    for _ in range(3):
        decision = harness.admit(w)
        while isinstance(decision, Queued):
            harness.advance(decision.retry_after_ms)
            decision = harness.admit(w)
        outcomes.append(harness.settle(w, grant_of(decision), RateLimited(1_000)))
    assert isinstance(outcomes[-1], Rejected)
    assert outcomes[-1].failure == Failure(
        "retry_budget_exhausted",
        "E2B refused 3 create attempts; giving up on this waiter",
        retryable=True,
    )
    assert all(isinstance(o, Queued) for o in outcomes[:-1])


def test_an_empty_retry_budget_holds_retries_but_not_first_attempts() -> None:
    # Catches: retries multiplying load once the budget is spent, or fresh work starved.
    config = AdmissionConfig(
        create_rate_per_s=1000, create_burst=10, retry_budget=1, retry_ratio=0, retry_refill_per_s=0
    )
    harness = Harness(config)
    a, b, c = waiters(3)
    grants = [grant_of(harness.admit(w)) for w in (a, b)]
    for w, grant in zip((a, b), grants, strict=True):
        harness.settle(w, grant, Unavailable(502))
    harness.advance(60_000)
    assert grant_of(harness.admit(a)).attempt == 2  # paid with the only token
    held = queued_of(harness.admit(b))
    assert held.reason == "backoff"
    assert grant_of(harness.admit(c)).attempt == 1


def test_queue_timeout_rejects_with_a_typed_failure() -> None:
    # Catches: a waiter queued forever (the original incident's 30 min liveness death).
    harness = Harness(AdmissionConfig(create_slots=1, queue_timeout_ms=60_000))
    a, b = waiters(2)
    grant_of(harness.admit(a))
    queued_of(harness.admit(b))
    harness.advance(30_000)
    queued_of(harness.admit(b))
    harness.advance(30_000)
    rejected = harness.admit(b)
    assert isinstance(rejected, Rejected)
    assert rejected.failure.code == "queue_timeout"
    assert harness.status()["account"]["queue_length"] == 0


def test_a_waiter_that_stops_polling_drops_out_and_blocks_nobody() -> None:
    # Catches: a dead session's ticket blocking the head of the queue forever.
    config = AdmissionConfig(create_slots=1, create_rate_per_s=1000, waiter_ttl_ms=5_000)
    harness = Harness(config)
    holder, dead, alive = waiters(3)
    grant = grant_of(harness.admit(holder))
    asked = harness.clock.now_ms()
    first = queued_of(harness.admit(dead))  # then never asks again
    # It counts as alive until it is expected back (its retry_at_ms), plus the TTL.
    alive_for = first.expected_back_ms(asked) + 5_000
    queued_of(harness.admit(alive))
    harness.settle(holder, grant, Created("sbx", 600_000))
    waited = 0
    decision = harness.admit(alive)
    while isinstance(decision, Queued):
        assert waited < alive_for, "the dead one is still within its TTL"
        harness.advance(decision.retry_after_ms)
        waited += decision.retry_after_ms
        decision = harness.admit(alive)
    assert isinstance(decision, Grant)
    assert waited <= alive_for + 1_000
    assert harness.status()["account"]["queue_length"] == 0


def test_a_late_waiter_whose_ticket_was_skipped_queues_again() -> None:
    # Catches: a waiter that comes back after being skipped getting stuck or granted twice.
    config = AdmissionConfig(create_slots=1, create_rate_per_s=1000, waiter_ttl_ms=1_000)
    harness = Harness(config)
    holder, late, alive = waiters(3)
    grant = grant_of(harness.admit(holder))
    queued_of(harness.admit(late))
    for _ in range(20):
        harness.advance(1_000)
        queued_of(harness.admit(alive))
    harness.settle(holder, grant, Created("sbx", 600_000))
    grant_of(harness.admit(alive))
    again = queued_of(harness.admit(late))
    assert again.position == 1
    assert again.waited_ms == 20_000, "the original wait still counts toward the timeout"


def test_release_is_harmless_for_unknown_waiters_and_removes_queued_ones() -> None:
    # Catches: release of an unknown waiter failing, or a released waiter left queued.
    harness = Harness(AdmissionConfig(create_slots=1))
    a, b, c = waiters(3)
    assert harness.release(a) is False
    grant_of(harness.admit(a))
    queued_of(harness.admit(b))
    queued_of(harness.admit(c))
    assert harness.release(b) is True
    assert harness.status()["account"]["queue_length"] == 1
    assert queued_of(harness.admit(c)).position == 1
    assert harness.release(a) is True
    assert harness.status()["account"]["create_slots"]["in_use"] == 0


class FailingBackend(InterposedBackend):
    """Storage that fails every call once `failing` is set."""

    def __init__(self, inner: StorageBackend) -> None:
        super().__init__(inner)
        self.failing = False

    def before(self, operation: str, key: str) -> None:
        if self.failing:
            raise StorageUnavailable("backend down")


def test_storage_errors_fail_closed_with_a_retryable_queued_answer() -> None:
    # Catches: a storage outage granting creates (limits unknown) or raising out of the guest.
    from host.storage.memory import MemoryBackend

    harness = Harness(FAST)
    backend = FailingBackend(MemoryBackend(harness.clock.now_ms))
    harness.backend = backend
    a, b = waiters(2)
    grant = grant_of(harness.admit(a))
    backend.failing = True
    down = queued_of(harness.admit(b))
    assert down.reason == "storage"
    assert down.retry_after_ms > 0
    assert queued_of(harness.settle(a, grant, Created("sbx", 60_000))).reason == "storage"
    # A release says it could not write the gate (its caller keeps the entity record to
    # release again), rather than answering as if nothing had been held.
    with pytest.raises(StorageUnavailable):
        harness.release(a)
    assert "error" in harness.status()
    backend.failing = False
    assert harness.settle(a, grant, Created("sbx", 60_000)) is None, "settling again works"
    assert harness.status()["account"]["capacity"]["running"] == 1


def test_every_decision_emits_a_progress_event() -> None:
    # Catches: a queued session reporting nothing (so a liveness timeout kills it).
    harness = Harness(AdmissionConfig(create_slots=1))
    a, b = waiters(2)
    grant = grant_of(harness.admit(a))
    harness.admit(b)
    harness.settle(a, grant, Created("sbx", 60_000))
    harness.release(a)
    events = harness.telemetry.events
    assert [e["event"] for e in events] == [
        "admission_granted",
        "admission_queued",
        "admission_settled",
        "admission_released",
    ]
    assert all(e["tenant"] == "tenant-a" for e in events)
    assert events[1]["entity"] == b.entity
    assert events[1]["reason"] == "create_slots" and events[1]["position"] == 1
    json.dumps(events)


def test_status_is_a_json_snapshot_of_every_gate() -> None:
    # Catches: a status that is not JSON or omits a gate.
    harness = Harness(FAST)
    (w,) = waiters(1)
    grant_of(harness.admit(w))
    status = harness.status()
    json.dumps(status)
    assert set(status["account"]) >= {"create_slots", "rate", "capacity", "backoff", "retry_budget"}
    assert status["tenant"]["creating"] == 1


def test_the_status_snapshot_names_every_gate_and_each_tenants_share() -> None:
    # Catches: a snapshot key renamed or dropped (operators, `status` and /metrics read them
    # by name), the rate's wait asked for more than one token, the retry budget rounded
    # other than to 3 places, and a tenant's counts taken from the other tenants.
    config = AdmissionConfig(
        create_slots=3,
        create_rate_per_s=0.5,
        create_burst=4,
        max_sandboxes=8,
        max_sandboxes_per_tenant=4,
        retry_budget=5.0,
        retry_refill_per_s=0.1234,
    )
    harness = Harness(config)
    a0, a1, a2 = waiters(3, "tenant-a")
    b0, b1, b2 = waiters(3, "tenant-b")
    first = {w: grant_of(harness.admit(w)) for w in (a0, b0, b1)}
    harness.advance(1_000)
    harness.settle(a0, first[a0], Created("sbx-a0", 3_600_000))
    harness.settle(b0, first[b0], Created("sbx-b0", 3_600_000))
    queued_of(harness.settle(b1, first[b1], Unavailable(503)))
    harness.advance(2_000)
    harness.release(a0)  # held 2 s
    retry = grant_of(harness.admit(b1))  # spends a retry token
    grant_of(harness.admit(a1))  # a first attempt earns retry_ratio back
    queued_of(harness.admit(b2))
    queued_of(harness.admit(a2))
    harness.advance(500)
    queued_of(harness.settle(b1, retry, Unavailable(503)))
    harness.advance(1_000)
    account = {
        "create_slots": {"in_use": 1, "limit": 3},
        # 5 tokens spent, 4 + 4.5 s x 0.5/s = 6.25 earned: one whole token, so a second
        # is 1.5 s away.
        "rate": {"per_s": 0.5, "burst": 4, "available": 1, "next_in_ms": 0},
        # b0's sandbox, a1's create, and b1's two unanswered creates (one possible sandbox).
        "capacity": {"in_use": 3, "limit": 8, "configured": 8, "running": 1, "unsettled": 2},
        "backoff": {"cooling_ms": 0, "failures": 2},
        # 5 - 1 (b1's retry) + 0.2 (a1) + 1.5 s x 0.1234/s = 4.3851.
        "retry_budget": {"tokens": 4.385, "max": 5.0},
        "queue_length": 3,
        "waiting_tenants": 2,
        "retrying": 1,
        # Observed 1000, 1000, 1000 then 500 ms, averaged 3:1.
        "create_latency_ms": 875,
        "hold_ms": 2000,
        "grants": 5,
    }
    now = START_MS + 4_500
    assert harness.status("tenant-a") == {
        "now_ms": now,
        "account": account,
        "tenant": {
            "tenant": "tenant-a",
            "in_use": 1,
            "limit": 4,
            "running": 0,
            "creating": 1,
            "queued": 1,
            "retrying": 0,
            "ring_place": 2,
        },
    }
    assert harness.status("tenant-b")["tenant"] == {
        "tenant": "tenant-b",
        "in_use": 2,
        "limit": 4,
        "running": 1,
        "creating": 0,
        "queued": 1,
        "retrying": 1,
        "ring_place": 1,
    }
    assert harness.status("tenant-c")["tenant"] == {
        "tenant": "tenant-c",
        "in_use": 0,
        "limit": 4,
        "running": 0,
        "creating": 0,
        "queued": 0,
        "retrying": 0,
        "ring_place": 0,
    }


def test_queued_params_carry_every_documented_field() -> None:
    # Catches: SandboxQueued missing a field a runtime relies on.
    params = Queued(1, 2, 3, 4, "rate", 5, 6, 7, 8, "v1", 9).params()
    assert params == {
        "position": 1,
        "queue_length": 2,
        "in_use": 3,
        "limit": 4,
        "reason": "rate",
        "retry_after_ms": 5,
        "eta_ms": 6,
        "waited_ms": 7,
        "retry_at_ms": 8,
        "reservation": "v1",
        "claim_by_ms": 9,
    }


@pytest.mark.parametrize("count", [10, 1000])
def test_the_gate_document_does_not_grow_with_waiters(count: int) -> None:
    # Catches: a representation that lists every waiter in one blob.
    harness = Harness(AdmissionConfig(create_slots=1))
    for w in waiters(count):
        harness.admit(w)
    entry = harness.backend.get(account_namespace(ACCOUNT), "adm/gate")
    assert entry is not None
    assert len(entry.value) < 600


def test_a_late_created_answer_takes_the_waiter_out_of_the_queue() -> None:
    # Catches: a waiter that got its sandbox still holding a queue place (blocking others).
    config = AdmissionConfig(create_slots=2, create_rate_per_s=1000, create_lease_ms=5_000)
    harness = Harness(config)
    slow, other = waiters(2)
    grant = grant_of(harness.admit(slow))
    harness.advance(5_000)  # its lease expired: asking again will make it a retry
    harness.settle(other, grant_of(harness.admit(other)), RateLimited(10_000))
    assert queued_of(harness.admit(slow)).reason == "backoff"
    assert harness.status()["account"]["retrying"] == 2
    assert harness.settle(slow, grant, Created("sbx-late", 600_000)) is None
    assert harness.status()["account"]["retrying"] == 1
    assert harness.status()["account"]["capacity"]["running"] == 1


def test_very_long_names_still_make_valid_keys() -> None:
    # Catches: a tenant or entity name over the host's 512-byte key limit failing forever.
    harness = Harness(FAST)
    waiter = Waiter("t" * 600, "CurationJob/" + "é" * 400)
    assert isinstance(harness.admit(waiter), Grant)


def test_temper_spelling_of_the_queue_timeout_is_accepted() -> None:
    # Catches: the [admission] block's queue_timeout_seconds silently ignored.
    assert AdmissionConfig.from_config({"queue_timeout_seconds": "90"}).queue_timeout_ms == 90_000


def test_a_drained_retry_budget_refills_per_second_not_per_millisecond() -> None:
    # Catches: the refill computed per millisecond (the `/ 1000.0` dropped), a budget that
    # refills a thousand times too fast and so never holds a retry storm back.
    config = AdmissionConfig(
        create_rate_per_s=1000,
        create_burst=10,
        retry_budget=1,
        retry_ratio=0,
        retry_refill_per_s=0.1,
        backoff_base_ms=100,
        backoff_cap_ms=100,
    )
    harness = Harness(config)
    (a,) = waiters(1)
    harness.settle(a, grant_of(harness.admit(a)), Unavailable(503))
    harness.advance(200)
    retry = grant_of(harness.admit(a))  # the budget's only token
    assert retry.attempt == 2
    harness.settle(a, retry, Unavailable(503))
    harness.advance(1_000)  # 0.1 token back, the backoff long over
    held = queued_of(harness.admit(a))
    # Held back as a backoff, for as long as the budget needs (the backoff cap is 100 ms):
    # 0.9 tokens missing at 0.1 a second.
    assert (held.reason, held.retry_after_ms, held.eta_ms) == ("backoff", 9_001, 9_001), held
    harness.advance(9_001)  # one whole token back
    assert grant_of(harness.admit(a)).attempt == 3


def test_capacity_met_with_nothing_running_shrinks_to_one_and_grows_after_a_full_streak() -> None:
    # Catches: a shrink that leaves more than the one sandbox E2B may still take, and a
    # success streak not restarted by the shrink (the capacity then grows back early).
    config = AdmissionConfig(create_rate_per_s=1000, create_burst=10, capacity_grow_after=2)
    harness = Harness(config)
    a, b, c = waiters(3)
    queued_of(harness.settle(a, grant_of(harness.admit(a)), CapacityExhausted(None)))
    assert harness.status()["account"]["capacity"]["limit"] == 1
    harness.release(a)
    harness.advance(60_000)
    harness.settle(b, grant_of(harness.admit(b)), Created("sbx-b", 600_000))
    assert harness.status()["account"]["capacity"]["limit"] == 1
    harness.release(b)
    harness.settle(c, grant_of(harness.admit(c)), Created("sbx-c", 600_000))
    assert harness.status()["account"]["capacity"]["limit"] == 2


def test_capacity_met_while_others_run_answers_capacity_at_the_shrunk_limit() -> None:
    # Catches: the retry told a stale place, count or wait instead of the capacity it now
    # waits for (E2B's 429 with sandboxes of ours running: no cooldown, a smaller limit).
    config = AdmissionConfig(
        create_slots=1, create_rate_per_s=1000, create_burst=10, max_sandboxes=10
    )
    harness = Harness(config)
    a, b, c, d = waiters(4)
    for w in (a, b):
        assert harness.settle(w, grant_of(harness.admit(w)), Created(w.entity, 600_000)) is None
    grant = grant_of(harness.admit(c))
    queued_of(harness.admit(d))
    harness.advance(30)
    answer = queued_of(harness.settle(c, grant, CapacityExhausted(None)))
    assert (answer.position, answer.queue_length, answer.in_use, answer.limit) == (1, 2, 2, 2)
    # It waits for a running sandbox's lease (600 s from its start, 30 ms ago).
    assert (answer.reason, answer.eta_ms, answer.waited_ms) == ("capacity", 599_970, 30)
    assert answer.retry_after_ms == config.poll_max_ms


def test_the_backoff_ceiling_doubles_per_failure_from_the_base_up_to_the_cap() -> None:
    # Catches: a ceiling growing by another factor, or jitter outside [0, ceiling).
    config = AdmissionConfig(backoff_base_ms=100, backoff_cap_ms=1_000)
    assert [backoff_ms(n, config, 0.999_999) for n in range(6)] == [99, 199, 399, 799, 999, 999]
    assert backoff_ms(3, config, 0.5) == 400 and backoff_ms(3, config, 0.0) == 0


def test_a_retry_after_of_zero_means_no_cooldown_not_a_backoff() -> None:
    # Catches: E2B's "Retry-After: 0" replaced by an exponential backoff.
    harness = Harness(FAST)
    (w,) = waiters(1)
    harness.settle(w, grant_of(harness.admit(w)), RateLimited(0))
    backoff = harness.status()["account"]["backoff"]
    assert (backoff["cooling_ms"], backoff["failures"]) == (0, 1)


class PlaceWriteLosesOnce(InterposedBackend):
    """Another invocation of the same waiter writes its place first, once: between this
    decision's gate write (the grant) and its own place write."""

    def __init__(self, inner: StorageBackend, waiter: Waiter) -> None:
        super().__init__(inner)
        self.key = waiter_key(waiter.tenant, waiter.entity)
        self.armed = True

    def before(self, operation: str, key: str) -> None:
        if operation == "compare_and_swap" and key == self.key and self.armed:
            self.armed = False
            raise StorageConflict(key)


def test_a_grant_whose_place_write_lost_gives_its_slot_back() -> None:
    # Catches: the undo of a grant that could not be recorded leaving its create lease
    # (a slot held by nobody until the lease expires) or dropping another one.
    config = AdmissionConfig(create_slots=2, create_rate_per_s=1000, create_burst=10)
    (other,) = waiters(1, tenant="tenant-b")
    (w,) = waiters(1)
    harness = Harness(config)
    held = grant_of(harness.admit(other))
    harness.backend = PlaceWriteLosesOnce(harness.backend, w)
    grant = grant_of(harness.admit(w))  # granted again on the decision's second try
    slots = harness.status()["account"]["create_slots"]
    assert slots["in_use"] == 2, slots
    leases = view_leases(harness)
    assert sorted(leases) == sorted([held.lease_id, grant.lease_id])


def view_leases(harness: Harness) -> list[str]:
    storage = ScopedStorage(harness.backend, tenant="anyone", account=ACCOUNT)
    gates = inspect_gates(storage, harness.clock.now_ms(), harness.config)
    return [lease.lease_id for lease in gates.create_slots.leases]


REFUSED = Failure(FailureCode.E2B_BAD_REQUEST, "bad template", retryable=False)


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [(CreateFailed(REFUSED), Rejected(REFUSED)), (Created("sbx-a", 3_600_000), None)],
)
def test_a_late_answer_for_a_waiter_queued_again_takes_its_ticket_out(
    answer: CreateResult, outcome: Rejected | None
) -> None:
    # Catches: a late answer that ends the wait (a refusal, or the sandbox after all) for
    # a waiter that had come back with a fresh ticket meanwhile (its first create went
    # unanswered until it no longer counted), leaving that ticket in its tenant's queue or
    # its liveness key stored: a waiter that is done would hold a turn until the
    # dead-waiter sweep found it.
    harness = Harness(AdmissionConfig(create_rate_per_s=1000.0, max_sandboxes=1))
    storage = ScopedStorage(harness.backend, tenant="anyone", account=ACCOUNT)
    late, holder = Waiter("tenant-a", "Job/a"), Waiter("tenant-b", "Job/b")
    unanswered = grant_of(harness.admit(late))
    while gate_view(harness).capacity.in_use:
        harness.advance(600_000)  # until its create no longer counts
    held = grant_of(harness.admit(holder))
    assert harness.settle(holder, held, Created("sbx-b", 3_600_000)) is None
    queued_of(harness.admit(late))
    [again] = gate_view(harness).waiters
    assert again.entity == late.entity and again.ticket is not None
    ticket = ticket_key(late.tenant, again.ticket)
    assert storage.get(Scope.ACCOUNT, ticket) is not None

    assert harness.settle(late, unanswered, answer) == outcome
    gates = gate_view(harness)
    assert gates.waiters == () and gates.waiting_tenants == ()
    assert storage.get(Scope.ACCOUNT, ticket) is None


def test_a_repeated_settle_of_a_retried_create_reports_the_retry_and_adds_no_second() -> None:
    # Catches: a repeated settle (an invocation that settled, then lost the answer and
    # settled again) that reports the waiter as done instead of still retrying, or that
    # stores the retry twice (the waiter would hold two turns).
    harness = Harness(AdmissionConfig(create_slots=2, create_rate_per_s=1000.0))
    waiter = Waiter("tenant-a", "Job/1")
    grant = grant_of(harness.admit(waiter))
    first = queued_of(harness.settle(waiter, grant, RateLimited(retry_after_ms=10_000)))
    again = queued_of(harness.settle(waiter, grant, RateLimited(retry_after_ms=10_000)))
    assert (again.reason, again.position) == (first.reason, first.position) == ("backoff", 1)
    storage = ScopedStorage(harness.backend, tenant="anyone", account=ACCOUNT)
    gates = inspect_gates(storage, harness.clock.now_ms(), harness.config)
    assert [(w.entity, w.stage.value) for w in gates.waiters] == [("Job/1", "r")]
    assert gates.backoff.failures == 1  # the repeat is not a second failure


def _stops_polling(harness: Harness, gone: Waiter, polling: tuple[Waiter, ...]) -> None:
    for _ in range(2):  # the others keep polling; `gone` does not
        harness.advance(2_000)
        for waiter in polling:
            queued_of(harness.admit(waiter))


def _is_released(harness: Harness, gone: Waiter, polling: tuple[Waiter, ...]) -> None:
    assert harness.release(gone) is True


@pytest.mark.parametrize(
    ("leaves", "waiter_ttl_ms", "rate_spacing_ms"),
    [(_stops_polling, 1_000, 0), (_is_released, AdmissionConfig().waiter_ttl_ms, 10)],
    ids=["dead_ticket_dropped", "released_while_waiting"],
)
def test_a_front_waiter_leaving_out_of_order_keeps_its_tenants_turn_in_the_ring(
    leaves: Callable[[Harness, Waiter, tuple[Waiter, ...]], None],
    waiter_ttl_ms: int,
    rate_spacing_ms: int,
) -> None:
    # Catches: a tenant whose front waiter leaves the queue out of order (it stopped polling
    # and its dead ticket is dropped, or it is released while waiting) sent to the back of
    # the ring, as if it had been granted: its next waiter would lose the round-robin turn
    # to the other tenant.
    config = AdmissionConfig(create_slots=1, create_rate_per_s=1000.0, waiter_ttl_ms=waiter_ttl_ms)
    harness = Harness(config)
    holder = Waiter("holder", "Job/h")
    grant = grant_of(harness.admit(holder))
    gone, other, next_of_a = (
        Waiter("tenant-a", "Job/a1"),
        Waiter("tenant-b", "Job/b1"),
        Waiter("tenant-a", "Job/a2"),
    )
    for waiter in (gone, other, next_of_a):
        queued_of(harness.admit(waiter))
    leaves(harness, gone, (other, next_of_a))
    assert harness.settle(holder, grant, Created("sbx-h", 600_000)) is None
    harness.advance(rate_spacing_ms)  # past the rate gate's spacing
    assert isinstance(harness.admit(next_of_a), Grant)
    assert queued_of(harness.admit(other)).position == 1


def test_a_retry_that_stopped_polling_is_dropped_and_the_next_waiter_granted_at_once() -> None:
    # Catches: a dead retry dropped from the front without the decision looking again, so
    # the waiter behind it is told to wait one more poll for a permit that is free.
    harness = Harness(
        AdmissionConfig(create_slots=1, create_rate_per_s=1000.0, waiter_ttl_ms=1_000)
    )
    gone, behind = Waiter("tenant-a", "Job/1"), Waiter("tenant-b", "Job/2")
    grant = grant_of(harness.admit(gone))
    queued_of(harness.settle(gone, grant, RateLimited(retry_after_ms=1_000)))
    queued_of(harness.admit(behind))
    harness.advance(60_000)  # past the retry's liveness; `behind` asks again now
    assert isinstance(harness.admit(behind), Grant)
    storage = ScopedStorage(harness.backend, tenant="anyone", account=ACCOUNT)
    assert inspect_gates(storage, harness.clock.now_ms(), harness.config).waiters == ()


def test_a_retry_that_keeps_polling_through_a_longer_cooldown_stays_alive() -> None:
    # Catches: a poll that does not extend the waiter's liveness: a retry told to come back
    # later than its settle said would be dropped as dead while still asking.
    harness = Harness(replace(FAST, create_slots=2, waiter_ttl_ms=1_000))
    polling, other, fresh = (Waiter(f"tenant-{t}", f"Job/{t}") for t in "abc")
    grants = [grant_of(harness.admit(w)) for w in (polling, other)]
    queued_of(harness.settle(polling, grants[0], RateLimited(retry_after_ms=10_000)))
    queued_of(harness.settle(other, grants[1], RateLimited(retry_after_ms=60_000)))
    harness.advance(10_500)  # past what its settle said; the cooldown now lasts to 60 s
    assert queued_of(harness.admit(polling)).reason == "backoff"
    harness.advance(50_000)
    # Both retries are alive, and the two free slots are theirs.
    queued_of(harness.admit(fresh))


def gate_view(harness: Harness) -> GateView:
    storage = ScopedStorage(harness.backend, tenant="anyone", account=ACCOUNT)
    return inspect_gates(storage, harness.clock.now_ms(), harness.config)


def test_an_entity_that_creates_again_holds_one_capacity_lease_for_its_new_sandbox() -> None:
    # Catches: a re-create (the entity provisions again while its lease is held) that
    # keeps the old lease beside the new one: one entity would count twice.
    harness = Harness(AdmissionConfig(create_slots=2, create_rate_per_s=1000.0))
    waiter = Waiter("tenant-a", "Job/a")
    for sandbox_id in ("sbx-1", "sbx-2"):
        grant = grant_of(harness.admit(waiter))
        assert harness.settle(waiter, grant, Created(sandbox_id, 600_000)) is None
        harness.advance(10)
    capacity = gate_view(harness).capacity
    assert capacity.in_use == 1
    assert [(lease.entity, lease.sandbox_id) for lease in capacity.leases] == [("Job/a", "sbx-2")]


def test_a_shrunk_capacity_grows_by_one_per_run_of_successes() -> None:
    # Catches: the success streak restarting at 1 instead of 0 after a growth step, which
    # grows the capacity back faster than one per `capacity_grow_after` successes.
    config = AdmissionConfig(
        create_slots=2, create_rate_per_s=1000.0, max_sandboxes=10, capacity_grow_after=2
    )
    harness = Harness(config)
    holder, refused = Waiter("tenant-a", "Job/h"), Waiter("tenant-a", "Job/x")
    grant = grant_of(harness.admit(holder))
    assert harness.settle(holder, grant, Created("sbx-h", 600_000)) is None
    harness.advance(10)
    queued_of(harness.settle(refused, grant_of(harness.admit(refused)), CapacityExhausted()))
    assert gate_view(harness).capacity.effective_limit == 1
    harness.release(holder)
    harness.release(refused)
    harness.advance(10)  # past the rate gate's spacing
    limits = []
    for i in range(4):
        waiter = Waiter("tenant-a", f"Job/{i}")
        grant = grant_of(harness.admit(waiter))
        assert harness.settle(waiter, grant, Created(f"sbx-{i}", 600_000)) is None
        harness.release(waiter)
        harness.advance(10)
        limits.append(gate_view(harness).capacity.effective_limit)
    assert limits == [1, 2, 2, 3]


class RivalPlaceWrite(InterposedBackend):
    """Another invocation of the same waiter writes its place just before this one does."""

    def __init__(self, inner: StorageBackend, key: str) -> None:
        super().__init__(inner)
        self.key = key
        self.armed = False

    def before(self, operation: str, key: str) -> None:
        if self.armed and operation == "compare_and_swap" and key == self.key:
            self.armed = False
            namespace = account_namespace(ACCOUNT)
            current = self.inner.get(namespace, key)
            version = None if current is None else current.version
            self.inner.compare_and_swap(namespace, key, version, b"rival", None)


def test_a_place_written_meanwhile_by_another_invocation_is_replaced_by_the_settle() -> None:
    # Catches: a place write that meets a conflict and then never lands (the version it
    # retries with not re-read), leaving the rival's place to guide the waiter's next call.
    harness = Harness(AdmissionConfig(create_slots=1, create_rate_per_s=1000.0))
    waiter = Waiter("tenant-a", "Job/a")
    key = waiter_key(waiter.tenant, waiter.entity)
    rival = RivalPlaceWrite(harness.backend, key)
    harness.backend = rival
    grant = grant_of(harness.admit(waiter))
    rival.armed = True
    assert harness.settle(waiter, grant, Created("sbx-a", 600_000)) is None
    assert not rival.armed
    entry = rival.inner.get(account_namespace(ACCOUNT), key)
    assert entry is not None and entry.value != b"rival"
    assert Place.from_bytes(entry.value).stage is Stage.HOLDING


def test_a_settled_place_lives_until_its_waiter_is_no_longer_expected() -> None:
    # Catches: a place written by a settle without its TTL: a waiter that stopped calling
    # (a retry that never came back, a holder never released) would leave its key for ever.
    harness = Harness(AdmissionConfig(create_slots=2, create_rate_per_s=1000.0))
    retrying, holding = Waiter("tenant-a", "Job/r"), Waiter("tenant-a", "Job/h")
    assert harness.settle(holding, grant_of(harness.admit(holding)), Created("sbx", 60_000)) is None
    harness.advance(10)
    queued_of(harness.settle(retrying, grant_of(harness.admit(retrying)), RateLimited(1_000)))
    namespace = account_namespace(ACCOUNT)
    keys = [waiter_key(w.tenant, w.entity) for w in (retrying, holding)]
    assert all(harness.backend.get(namespace, key) is not None for key in keys)
    harness.advance(harness.config.queue_timeout_ms + 3_600_000)
    assert [harness.backend.get(namespace, key) for key in keys] == [None, None]


def test_dropping_a_retry_gives_up_its_reservation() -> None:
    # Catches: a retry dropped (released) that leaves its reservation behind, pinning a
    # permit to nobody until the claim deadline (or that keeps only that one).
    harness, retrying, _, _ = retry_promised_the_free_slot()
    before = gate_view(harness).reservations
    assert [(r.tenant, r.entity) for r in before] == [("tenant-a", "Job/a")], before
    assert harness.release(retrying) is True
    assert all(r.entity != "Job/a" for r in gate_view(harness).reservations)


@pytest.mark.parametrize("holding", [0, 1])
def test_an_account_full_while_we_hold_nothing_starts_the_shared_backoff(holding: int) -> None:
    # Catches: "the account is full" answered while none of its sandboxes are ours (someone
    # else holds them all: only time frees one) that does not back off, or one answered
    # while we hold some (ours will free up) that does.
    harness = Harness(AdmissionConfig(create_slots=2, create_rate_per_s=1000.0))
    for i in range(holding):
        holder = Waiter("tenant-b", f"Job/h{i}")
        assert (
            harness.settle(holder, grant_of(harness.admit(holder)), Created("sbx", 600_000)) is None
        )
        harness.advance(10)
    waiter = Waiter("tenant-a", "Job/a")
    told = queued_of(harness.settle(waiter, grant_of(harness.admit(waiter)), CapacityExhausted()))
    # Told why: the shared backoff, or the (shrunk) capacity it now waits for.
    assert (told.reason, told.in_use, told.limit) == (
        ("backoff", 0, 2) if holding == 0 else ("capacity", 1, 1)
    )
    backoff = gate_view(harness).backoff
    assert (backoff.failures, backoff.until_ms > harness.clock.now_ms()) == (
        (1, True) if holding == 0 else (0, False)
    )


def test_a_late_answer_for_a_waiter_retrying_already_stops_counting_its_create() -> None:
    # Catches: an answer that arrives after the create's lease expired (the waiter was
    # made a retry meanwhile) whose settle is not saved: the unanswered create would go on
    # counting against capacity until the sandbox it might have made timed out.
    harness = Harness(AdmissionConfig(create_slots=1, create_rate_per_s=1000.0))
    waiter, other = Waiter("tenant-a", "Job/a"), Waiter("tenant-b", "Job/b")
    grant = grant_of(harness.admit(waiter))
    harness.advance(grant.expires_at_ms - harness.clock.now_ms() + 1)
    grant_of(harness.admit(other))  # the expired lease's slot is free again
    queued_of(harness.admit(waiter))  # its create lease expired: it is a retry now
    assert gate_view(harness).capacity.in_use == 2  # the unanswered create still counts
    queued_of(harness.settle(waiter, grant, RateLimited(retry_after_ms=1_000)))
    gates = gate_view(harness)
    assert gates.capacity.in_use == 1 and gates.capacity.unsettled == ()


def test_a_retry_whose_place_expired_during_the_create_keeps_the_time_it_had_queued() -> None:
    # Catches: a settle that finds the waiter's place gone (its create was answered after
    # the place's TTL) dating the retry from the wrong side of now: the wait it reports
    # (and the queue timeout it is held to) would be wrong.
    harness = Harness(AdmissionConfig(create_slots=1, create_rate_per_s=1000.0))
    holder, waiter = Waiter("holder", "Job/h"), Waiter("tenant-a", "Job/a")
    held = grant_of(harness.admit(holder))
    queued_of(harness.admit(waiter))
    harness.advance(5_000)
    assert harness.settle(holder, held, Created("sbx-h", 600_000)) is None
    grant = grant_of(harness.admit(waiter))
    assert grant.queued_ms == 5_000
    storage = ScopedStorage(harness.backend, tenant="anyone", account=ACCOUNT)
    harness.advance(harness.config.create_lease_ms + harness.config.waiter_ttl_ms + 1)
    assert storage.get(Scope.ACCOUNT, waiter_key(waiter.tenant, waiter.entity)) is None
    retry = queued_of(harness.settle(waiter, grant, RateLimited(retry_after_ms=1_000)))
    assert retry.waited_ms == 5_000


def test_retries_wait_in_the_order_they_failed() -> None:
    # Catches: a retry's place among the retries miscounted (the first that is not it, or
    # one too few), so the second of two retries is told it is first.
    harness = Harness(AdmissionConfig(create_slots=2, create_rate_per_s=1000.0))
    first, second = Waiter("tenant-a", "Job/a"), Waiter("tenant-b", "Job/b")
    first_grant = grant_of(harness.admit(first))
    harness.advance(5)
    second_grant = grant_of(harness.admit(second))
    told = [
        queued_of(harness.settle(first, first_grant, RateLimited(retry_after_ms=1_000))),
        queued_of(harness.settle(second, second_grant, RateLimited(retry_after_ms=1_000))),
        queued_of(harness.admit(second)),
        queued_of(harness.admit(first)),
    ]
    assert [t.position for t in told] == [1, 2, 2, 1]


def test_a_retry_is_not_held_back_by_the_sandbox_its_own_lost_answer_may_have_made() -> None:
    # Catches: a retry whose unanswered create still counts against a full capacity told
    # to wait for capacity (its own possible sandbox, which its retry adopts by key).
    harness = Harness(AdmissionConfig(create_slots=2, create_rate_per_s=1000.0, max_sandboxes=1))
    waiter = Waiter("tenant-a", "Job/a")
    grant = grant_of(harness.admit(waiter))
    harness.advance(2_000)  # the create's latency: what a wait for capacity would be
    told = queued_of(harness.settle(waiter, grant, Unavailable(status=503)))
    assert gate_view(harness).capacity.in_use == 1  # its possible sandbox
    assert told.reason == "backoff" and told.eta_ms == gate_view(harness).backoff.cooling_ms
    harness.advance(told.retry_after_ms)
    assert isinstance(harness.admit(waiter), Grant)


def behind_a_spent_burst() -> tuple[Harness, Waiter, Queued]:
    """Tenant-a spends the rate's burst of 2; tenant-b's two waiters queue behind it, the
    first ahead. Returns the harness, the second waiter and its answer."""
    harness = Harness(AdmissionConfig(create_slots=5, create_rate_per_s=1.0, create_burst=2))
    for entity in ("Job/a", "Job/b"):
        grant_of(harness.admit(Waiter("tenant-a", entity)))
    first, second = Waiter("tenant-b", "Job/c"), Waiter("tenant-b", "Job/d")
    queued_of(harness.admit(first))
    return harness, second, queued_of(harness.admit(second))


def test_a_waiter_held_by_the_rate_is_told_how_many_tokens_are_spent() -> None:
    # Catches: the rate gate's `in_use` counted as burst plus the tokens left instead of
    # burst minus them (a waiter behind a refilled token would see more than the burst).
    harness, second, told = behind_a_spent_burst()
    assert (told.reason, told.in_use, told.limit) == ("rate", 2, 2)
    harness.advance(1_000)  # one token back, promised to the first
    told = queued_of(harness.admit(second))
    assert (told.reason, told.position, told.in_use, told.limit) == ("rate", 2, 1, 2)


def test_a_release_that_frees_nothing_still_keeps_the_promise_it_made() -> None:
    # Catches: a release (of a waiter that held and waited for nothing) whose decision
    # promised the next rate token to a waiter but was not saved: the promise and its
    # wake-up would be lost.
    harness, _, _ = behind_a_spent_burst()
    harness.advance(1_000)  # the first's token is due; the next one is not promised yet
    controller = harness.controller("tenant-c")
    assert controller.release(Waiter("tenant-c", "Job/x")) is False
    [wake] = controller.wake_ups
    assert (wake.tenant, wake.entity, wake.at_ms) == (
        "tenant-b",
        "Job/d",
        harness.clock.now_ms() + 1_000,
    )
    promised = [(r.tenant, r.at_ms) for r in gate_view(harness).reservations]
    assert promised[-1] == ("tenant-b", wake.at_ms) and len(promised) == 2


def test_a_waiter_behind_a_promised_token_comes_back_when_its_own_token_is_due() -> None:
    # Catches: the rate's exact wait not used for a waiter whose token is not promised yet
    # (it would be told poll_min, throttling a fast rate to one grant per poll), or its
    # retry_at set before now.
    harness = Harness(AdmissionConfig(create_slots=5, create_rate_per_s=100.0, create_burst=1))
    grant_of(harness.admit(Waiter("tenant-a", "Job/a")))
    queued_of(harness.admit(Waiter("tenant-b", "Job/c")))  # promised the next token
    told = queued_of(harness.admit(Waiter("tenant-b", "Job/d")))
    now = harness.clock.now_ms()
    assert (told.reason, told.position, told.reservation) == ("rate", 2, "")
    assert (told.eta_ms, told.retry_after_ms, told.retry_at_ms) == (20, 20, now + 20)


def test_a_waiter_held_by_a_busy_slot_before_any_latency_is_known_comes_back_at_half_of_it() -> (
    None
):
    # Catches: the assumed create latency halved differently for the first poll, or the
    # time the waiter is expected back (`retry_at_ms`) set before now.
    config = AdmissionConfig(create_slots=1, create_rate_per_s=1000.0)
    harness = Harness(config)
    grant_of(harness.admit(Waiter("tenant-a", "Job/a")))
    told = queued_of(harness.admit(Waiter("tenant-b", "Job/b")))
    assert (told.reason, told.eta_ms) == ("create_slots", config.create_latency_ms)
    assert told.retry_after_ms == config.create_latency_ms // 2
    assert told.retry_at_ms == harness.clock.now_ms() + told.eta_ms


def test_a_waiter_asking_while_its_own_create_is_in_flight_comes_back_when_the_lease_ends() -> None:
    # Catches: the wait of a waiter whose create is in flight not taken from the time
    # left on its create lease (a second invocation would poll later than needed).
    harness = Harness(AdmissionConfig(create_slots=1, create_rate_per_s=1000.0))
    waiter = Waiter("tenant-a", "Job/a")
    started = harness.clock.now_ms()
    grant = grant_of(harness.admit(waiter))
    harness.advance(grant.expires_at_ms - harness.clock.now_ms() - 5_000)
    told = queued_of(harness.admit(waiter))
    assert (told.position, told.reason, told.retry_after_ms) == (0, "create_slots", 5_000)
    assert told.waited_ms == harness.clock.now_ms() - started


def test_a_waiter_whose_place_expired_during_a_lost_create_retries_as_its_second_attempt() -> None:
    # Catches: the attempt of a waiter that comes back with no place while its unanswered
    # create still counts (a retry that reclaims that possible sandbox) numbered wrongly:
    # `max_create_attempts` would be applied off by one.
    harness = Harness(AdmissionConfig(create_slots=1, create_rate_per_s=1000.0))
    waiter = Waiter("tenant-a", "Job/a")
    first = grant_of(harness.admit(waiter))
    assert first.attempt == 1
    harness.advance(harness.config.create_lease_ms + harness.config.waiter_ttl_ms + 1)
    storage = ScopedStorage(harness.backend, tenant="anyone", account=ACCOUNT)
    assert storage.get(Scope.ACCOUNT, waiter_key(waiter.tenant, waiter.entity)) is None
    assert gate_view(harness).capacity.unsettled != ()
    assert grant_of(harness.admit(waiter)).attempt == 2


def test_a_waiter_whose_creates_keep_dying_mid_call_gives_up_after_the_last_attempt() -> None:
    # Catches: the attempt limit for creates whose holder died mid-call applied one early,
    # or the refusal naming the wrong number of attempts.
    harness = Harness(
        AdmissionConfig(create_slots=1, create_rate_per_s=1000.0, max_create_attempts=2)
    )
    waiter = Waiter("tenant-a", "Job/a")
    for attempt in (1, 2):
        grant = grant_of(harness.admit(waiter))
        assert grant.attempt == attempt
        harness.advance(grant.expires_at_ms - harness.clock.now_ms() + 1)  # it never answers
    refused = harness.admit(waiter)
    assert isinstance(refused, Rejected), refused
    assert refused.failure.code == "retry_budget_exhausted"
    assert refused.failure.message.startswith("E2B refused 2 create attempts")


def test_a_queue_timeout_rejects_retryably_saying_how_long_and_forgets_the_ticket() -> None:
    # Catches: the queue-timeout refusal made final (Temper would end the session instead
    # of letting the next provision start afresh), its wait misreported, or the waiter's
    # ticket key left behind.
    config = AdmissionConfig(create_slots=1, create_rate_per_s=1000.0, queue_timeout_ms=5_000)
    harness = Harness(config)
    grant_of(harness.admit(Waiter("holder", "Job/h")))
    waiter = Waiter("tenant-a", "Job/a")
    queued_of(harness.admit(waiter))
    [shown] = gate_view(harness).waiters
    assert shown.ticket is not None
    key = ticket_key(waiter.tenant, shown.ticket)
    storage = ScopedStorage(harness.backend, tenant="anyone", account=ACCOUNT)
    harness.advance(3_000)
    queued_of(harness.admit(waiter))
    harness.advance(3_000)
    assert storage.get(Scope.ACCOUNT, key) is not None
    refused = harness.admit(waiter)
    assert isinstance(refused, Rejected), refused
    assert (refused.failure.code, refused.failure.retryable) == ("queue_timeout", True)
    assert refused.failure.message.startswith("waited 6000 ms for a sandbox")
    assert storage.get(Scope.ACCOUNT, key) is None


def test_the_first_of_many_retries_is_granted_when_the_slot_frees() -> None:
    # Catches: the number of passes a decision makes (dropping dead waiters ahead, then
    # granting) bounded so that with more retries than create slots it makes none, and no
    # waiter is ever granted again.
    harness = Harness(AdmissionConfig(create_slots=1, create_rate_per_s=1000.0))
    waiters = [Waiter("tenant-a", f"Job/{i}") for i in range(4)]
    for waiter in waiters:  # each create's holder dies mid-call: its lease expires
        grant = grant_of(harness.admit(waiter))
        harness.advance(grant.expires_at_ms - harness.clock.now_ms() + 1)
    again = grant_of(harness.admit(waiters[0]))
    for waiter in waiters[1:]:
        queued_of(harness.admit(waiter))
    assert [w.stage for w in gate_view(harness).waiters] == [Stage.RETRYING] * 3
    assert harness.settle(waiters[0], again, Created("sbx-0", 600_000)) is None
    harness.advance(10)  # past the rate gate's spacing
    assert isinstance(harness.admit(waiters[1]), Grant)


def test_a_waiter_polling_behind_a_promised_token_keeps_the_promise_made_to_it() -> None:
    # Catches: a queued answer whose decision only promised a permit (nothing else
    # changed) not saved: the waiter would be told a reservation the gate does not hold.
    harness, second, _ = behind_a_spent_burst()
    harness.advance(1_000)  # the first's token is due; the second's is next
    told = queued_of(harness.admit(second))
    assert told.reservation
    stored = [(r.tenant, r.at_ms) for r in gate_view(harness).reservations]
    assert ("tenant-b", told.retry_at_ms) in stored and len(stored) == 2


def test_a_status_that_cannot_read_the_gate_says_why() -> None:
    # Catches: the status view's storage failure answered without the storage error's text.
    from host.storage.memory import MemoryBackend

    harness = Harness(FAST)
    backend = FailingBackend(MemoryBackend(harness.clock.now_ms))
    harness.backend = backend
    backend.failing = True
    assert harness.status() == {"error": "storage", "message": "backend down"}


def test_the_granted_event_says_how_long_the_waiter_queued() -> None:
    # Catches: admission_granted telemetry without the time the waiter spent queued.
    harness = Harness(AdmissionConfig(create_slots=1, create_rate_per_s=1000))
    a, b = waiters(2)
    grant = grant_of(harness.admit(a))
    queued_of(harness.admit(b))
    harness.advance(700)
    harness.settle(a, grant, Created("sbx-a", 600_000))
    assert grant_of(harness.admit(b)).queued_ms == 700
    granted = [e for e in harness.telemetry.events if e["event"] == "admission_granted"]
    assert [(e["entity"], e["queued_ms"]) for e in granted] == [(a.entity, 0), (b.entity, 700)]


def test_a_first_attempt_earns_back_a_fraction_of_a_retry_token_that_is_kept() -> None:
    # Catches: a first attempt not earning `retry_ratio` back (or spending it), and the
    # earned fraction lost when the gate is stored (tokens rounded to whole ones).
    config = AdmissionConfig(
        create_rate_per_s=1000,
        create_burst=10,
        retry_budget=2,
        retry_ratio=0.25,
        retry_refill_per_s=0,
        backoff_base_ms=100,
        backoff_cap_ms=100,
    )
    harness = Harness(config)
    a, b = waiters(2)
    harness.settle(a, grant_of(harness.admit(a)), Unavailable(503))
    harness.advance(200)
    assert grant_of(harness.admit(a)).attempt == 2  # paid with one of the two tokens
    assert harness.status()["account"]["retry_budget"]["tokens"] == 1.0
    assert grant_of(harness.admit(b)).attempt == 1  # earns a quarter of a token back
    assert harness.status()["account"]["retry_budget"]["tokens"] == 1.25


def test_status_counts_the_tenants_own_queue_and_its_place_in_the_ring() -> None:
    # Catches: the status snapshot not finding the asking tenant's own queue.
    harness = Harness(AdmissionConfig(create_slots=1, create_rate_per_s=1000))
    (holder,) = waiters(1, "tenant-b")
    a1, a2 = waiters(2, "tenant-a")
    grant_of(harness.admit(holder))
    queued_of(harness.admit(a1))
    queued_of(harness.admit(a2))
    tenant = harness.status("tenant-a")["tenant"]
    assert (tenant["queued"], tenant["ring_place"]) == (2, 1)


def test_a_waiter_is_not_counted_behind_a_tenant_at_its_own_limit() -> None:
    # Catches: a tenant exactly at `max_sandboxes_per_tenant` (or the limit ignored)
    # counted ahead of other tenants' waiters in the position they are told.
    config = AdmissionConfig(max_sandboxes_per_tenant=1, create_rate_per_s=1.0)
    harness = Harness(config)
    a0, a1 = waiters(2, "tenant-a")
    (b1,) = waiters(1, "tenant-b")
    assert harness.settle(a0, grant_of(harness.admit(a0)), Created("sbx-a0", 600_000)) is None
    full = queued_of(harness.admit(a1))
    assert (full.reason, full.in_use, full.limit) == ("capacity", 1, 1)
    behind_rate = queued_of(harness.admit(b1))
    assert (behind_rate.reason, behind_rate.position) == ("rate", 1)


def test_a_waiter_that_timed_out_leaves_its_tenants_turn_in_the_ring() -> None:
    # Catches: a queue timeout treated as a grant, sending the tenant's next waiter to the
    # back of the ring behind every other tenant.
    harness = Harness(AdmissionConfig(create_slots=1, queue_timeout_ms=60_000))
    (holder,) = waiters(1, "tenant-c")
    a1, a2 = waiters(2, "tenant-a")
    (b1,) = waiters(1, "tenant-b")
    grant_of(harness.admit(holder))  # its create slot stays busy past the timeout
    queued_of(harness.admit(a1))
    harness.advance(10_000)
    queued_of(harness.admit(a2))
    queued_of(harness.admit(b1))
    harness.advance(50_000)
    timed_out = harness.admit(a1)
    assert isinstance(timed_out, Rejected) and timed_out.failure.code == "queue_timeout"
    assert queued_of(harness.admit(a2)).position == 1
    assert queued_of(harness.admit(b1)).position == 2


def test_a_waiter_behind_an_overdue_create_is_told_the_slot_not_the_capacity_that_fits() -> None:
    # Catches: a gate with exactly as many free permits as the waiter's position counted as
    # holding it back (capacity named instead of the busy create slot).
    config = AdmissionConfig(
        create_slots=1, max_sandboxes=2, create_rate_per_s=1000, create_latency_ms=100
    )
    harness = Harness(config)
    holder, waiter = waiters(2)
    grant_of(harness.admit(holder))
    harness.advance(200)  # the create should have answered by now; its lease still runs
    held = queued_of(harness.admit(waiter))
    assert (held.reason, held.in_use, held.limit) == ("create_slots", 1, 1)
    # The slot's wait is a guess (already overdue): expected back no sooner than poll_min.
    assert (held.eta_ms, held.retry_at_ms) == (0, harness.clock.now_ms() + config.poll_min_ms)


def test_a_retry_reclaiming_its_possible_sandbox_is_held_by_the_slot_not_the_capacity() -> None:
    # Catches: a retry whose create takes no new capacity (it reclaims the sandbox its lost
    # create may have made) told that the full capacity holds it back.
    config = AdmissionConfig(
        create_slots=1,
        max_sandboxes=2,
        create_rate_per_s=1000,
        create_latency_ms=100,
        create_lease_ms=1_000,
    )
    harness = Harness(config)
    lost, holder = waiters(2)
    grant_of(harness.admit(lost))  # ... and its invocation dies mid-create
    harness.advance(1_000)
    grant_of(harness.admit(holder))  # the slot, and the capacity left after lost's
    harness.advance(200)
    held = queued_of(harness.admit(lost))
    assert (held.reason, held.in_use, held.limit) == ("create_slots", 1, 1)
    assert harness.status()["account"]["capacity"] == {
        "in_use": 2,
        "limit": 2,
        "configured": 2,
        "running": 0,
        "unsettled": 1,
    }


def test_a_retry_with_exactly_one_token_left_is_told_the_gate_that_holds_it() -> None:
    # Catches: a retry that the budget can still pay for (exactly one token) told it waits
    # for the budget (a backoff) instead of for the capacity that holds it.
    config = AdmissionConfig(
        create_rate_per_s=1000,
        create_burst=10,
        max_sandboxes=5,
        retry_budget=1,
        retry_ratio=0,
        retry_refill_per_s=0,
    )
    harness = Harness(config)
    other, refused = waiters(2)
    grant_of(harness.admit(other))
    grant = grant_of(harness.admit(refused))
    # The account is full at two: the capacity shrinks to the one other create.
    queued_of(harness.settle(refused, grant, CapacityExhausted()))
    assert harness.status()["account"]["retry_budget"]["tokens"] == 1.0
    held = queued_of(harness.admit(refused))
    assert (held.reason, held.in_use, held.limit) == ("capacity", 1, 1)


def test_a_late_waiter_queued_again_while_nothing_else_changes_keeps_its_new_place() -> None:
    # Catches: the fresh ticket of a waiter whose old one was dropped as dead not stored
    # when its decision changes nothing else (it would be missing from the queue, and
    # every later waiter would overtake it).
    config = AdmissionConfig(
        create_slots=1, create_rate_per_s=1000, create_burst=10, waiter_ttl_ms=1_000
    )
    harness = Harness(config)
    holder, late, other, later = waiters(4)
    grant = grant_of(harness.admit(holder))
    queued_of(harness.admit(late))  # ... then it stops polling
    harness.advance(20_000)
    assert harness.settle(holder, grant, Created("sbx", 600_000)) is None
    grant_of(harness.admit(other))  # takes the slot, dropping the late waiter's dead ticket
    again = queued_of(harness.admit(late))
    assert (again.reason, again.position, again.waited_ms) == ("create_slots", 1, 20_000)
    assert queued_of(harness.admit(later)).position == 2
    assert queued_of(harness.admit(late)).position == 1


def test_a_retry_that_needs_new_capacity_waits_for_it() -> None:
    # Catches: a retry granted past a full capacity (treated as reclaiming a sandbox of its
    # own when its create was refused outright and made none).
    config = AdmissionConfig(create_rate_per_s=1000, create_burst=10, max_sandboxes=5)
    harness = Harness(config)
    other, refused = waiters(2)
    other_grant = grant_of(harness.admit(other))
    grant = grant_of(harness.admit(refused))
    # The account is full at two: the capacity shrinks to the one other create.
    queued_of(harness.settle(refused, grant, CapacityExhausted()))
    assert queued_of(harness.admit(refused)).reason == "capacity"
    assert harness.settle(other, other_grant, Created("sbx-other", 600_000)) is None
    assert queued_of(harness.admit(refused)).reason == "capacity"
    assert harness.release(other) is True
    assert grant_of(harness.admit(refused)).attempt == 2


def test_a_fresh_waiter_goes_beside_a_retry_reclaiming_its_possible_sandbox() -> None:
    # Catches: the schedule stopping at a retry that reclaims its own possible sandbox, so
    # the free slot beside it is promised to nobody and the waiter behind is held.
    config = AdmissionConfig(create_slots=2, create_rate_per_s=1000, create_burst=10)
    harness = Harness(config)
    lost, fresh = waiters(2)
    queued_of(harness.settle(lost, grant_of(harness.admit(lost)), Unavailable(503)))
    harness.advance(config.backoff_cap_ms)  # the cooldown is over; the retry has not asked
    assert grant_of(harness.admit(fresh)).attempt == 1
    assert grant_of(harness.admit(lost)).attempt == 2


def test_a_waiter_whose_rate_token_is_a_millisecond_away_comes_back_in_a_millisecond() -> None:
    # Catches: the exact wait of a turn the schedule reaches rounded up past its due time;
    # the token a millisecond away not promised (it is the next one pending), or the one
    # after it promised too (a token further off than the next is not promised yet).
    harness = Harness(AdmissionConfig(create_rate_per_s=2000.0))
    first, second, third = waiters(3)
    grant_of(harness.admit(first))
    # Tokens every half millisecond: the next two are each due within the millisecond.
    told = [queued_of(harness.admit(w)) for w in (second, third)]
    assert [(t.reason, t.eta_ms, t.retry_after_ms) for t in told] == [("rate", 1, 1)] * 2
    assert told[0].reservation and not told[1].reservation


def test_a_waiter_beyond_the_free_slots_held_by_the_rate_comes_back_when_it_is_due() -> None:
    # Catches: the rate's exact wait not used for a turn the schedule does not reach (every
    # slot busy, the one in front overdue): it would be told poll_min, not the due time.
    config = AdmissionConfig(create_slots=2, create_rate_per_s=1000.0, create_latency_ms=100)
    harness = Harness(config)
    overdue, recent, waiter = waiters(3)
    grant_of(harness.admit(overdue))
    harness.advance(200)
    grant_of(harness.admit(recent))  # takes the last slot and the rate's token
    told = queued_of(harness.admit(waiter))
    assert (told.reason, told.eta_ms, told.retry_after_ms) == ("rate", 1, 1)
    assert told.retry_at_ms == harness.clock.now_ms() + 1


def test_a_turn_out_of_order_past_the_bound_on_removals_waits_for_the_head() -> None:
    # Catches: a ticket granted out of order once the tenant's queue remembers as many
    # out-of-order removals as it may (the gate document would grow without bound).
    harness = Harness(AdmissionConfig(create_slots=2, create_rate_per_s=1000, create_burst=10))
    holders = waiters(2, "tenant-h")
    head, *middle, behind = waiters(MAX_REMOVED_OUT_OF_ORDER + 2)
    grants = [grant_of(harness.admit(w)) for w in holders]
    for waiter in (head, *middle, behind):
        queued_of(harness.admit(waiter))
    for waiter in middle:
        assert harness.release(waiter) is True
    for waiter, grant in zip(holders, grants, strict=True):
        assert harness.settle(waiter, grant, Created(waiter.entity, 600_000)) is None
    # Both free slots are promised: to the head, and to the waiter right behind it.
    assert queued_of(harness.admit(behind)).position == 2
    assert grant_of(harness.admit(head)).attempt == 1
    assert grant_of(harness.admit(behind)).attempt == 1


def test_a_waiter_holding_a_sandbox_whose_later_create_was_lost_counts_on_from_its_place() -> None:
    # Catches: the attempt of a waiter that comes back holding a sandbox while an unanswered
    # create of its own still counts numbered 2 whatever its place says (the attempts of a
    # cycle would restart, and `max_create_attempts` never be reached).
    config = AdmissionConfig(
        create_rate_per_s=1000.0,
        create_burst=10,
        create_lease_ms=1_000,
        backoff_base_ms=100,
        backoff_cap_ms=100,
    )
    harness = Harness(config)
    (waiter,) = waiters(1)
    queued_of(harness.settle(waiter, grant_of(harness.admit(waiter)), Unavailable(503)))
    harness.advance(200)
    second = grant_of(harness.admit(waiter))
    assert second.attempt == 2
    harness.advance(1_000)  # its holder is still waiting for E2B: the lease lapses
    assert grant_of(harness.admit(waiter)).attempt == 3  # ... and that create is lost too
    # The second create's answer comes after all: the waiter holds its sandbox.
    assert harness.settle(waiter, second, Created("sbx-2", 600_000)) is None
    harness.advance(1_000)
    assert harness.status()["account"]["capacity"]["unsettled"] == 1
    assert grant_of(harness.admit(waiter)).attempt == 3


def test_two_turns_of_a_tenant_with_room_for_one_never_both_get_a_grant() -> None:
    # Catches: `max_sandboxes_per_tenant` checked only against what the tenant held before
    # the decision (the grant checks nothing more): two of its waiters whose turns come
    # together would both be granted, past the limit.
    config = AdmissionConfig(
        create_slots=4, create_rate_per_s=1000, create_burst=10, max_sandboxes_per_tenant=1
    )
    harness = Harness(config)
    (other,) = waiters(1, "tenant-b")
    first, second = waiters(2)
    # The other tenant's create is refused with a cooldown: nothing starts meanwhile.
    queued_of(harness.settle(other, grant_of(harness.admit(other)), RateLimited(5_000)))
    queued_of(harness.admit(first))
    queued_of(harness.admit(second))
    harness.advance(5_000)
    grant_of(harness.admit(other))  # the retry goes first, promising the free slots on
    queued_of(harness.admit(second))  # asks first, but its tenant's room is the first's turn
    grant_of(harness.admit(first))
    held = queued_of(harness.admit(second))
    assert (held.reason, held.in_use, held.limit) == ("capacity", 1, 1)
    assert harness.status("tenant-a")["tenant"]["in_use"] == 1


def test_a_waiter_behind_one_that_left_out_of_order_moves_up_one_place() -> None:
    # Catches: the tickets that left out of order between the head and a waiter counted
    # against its position the wrong way (or twice).
    harness = Harness(AdmissionConfig(create_slots=1, create_rate_per_s=1000))
    (holder,) = waiters(1, "tenant-h")
    first, leaving, behind = waiters(3)
    grant_of(harness.admit(holder))
    assert [queued_of(harness.admit(w)).position for w in (first, leaving, behind)] == [1, 2, 3]
    assert harness.release(leaving) is True
    assert queued_of(harness.admit(behind)).position == 2


def test_positions_count_the_tenants_with_room_on_both_sides_of_the_waiters_own() -> None:
    # Catches: the count of the other tenants' waiters ahead stopping at a tenant without
    # room, or at the waiter's own tenant (those after it in the ring still had a turn in
    # each earlier round).
    config = AdmissionConfig(
        create_slots=1, create_rate_per_s=1000, create_burst=10, max_sandboxes_per_tenant=1
    )
    harness = Harness(config)
    full, waiting_full = waiters(2, "tenant-a")
    (holder,) = waiters(1, "tenant-h")
    b0, b1 = waiters(2, "tenant-b")
    (c0,) = waiters(1, "tenant-c")
    assert harness.settle(full, grant_of(harness.admit(full)), Created("sbx-a", 600_000)) is None
    grant_of(harness.admit(holder))  # the slot stays busy
    queued_of(harness.admit(waiting_full))  # tenant-a, at its limit, is first in the ring
    for waiter in (b0, b1, c0):
        queued_of(harness.admit(waiter))
    # The fair order among tenants with room: b0, c0, b1.
    assert [queued_of(harness.admit(w)).position for w in (b0, c0, b1)] == [1, 2, 3]


def test_a_waiter_asking_as_a_cooldown_ends_is_expected_back_when_it_was_told_to_come() -> None:
    # Catches: `retry_at_ms` during a cooldown (down to its last millisecond) set without
    # the jitter `retry_after_ms` carries, so a host that wakes the waiter then would bring
    # the herd back together.
    harness = Harness(AdmissionConfig(create_rate_per_s=1000, create_burst=10))
    refused, waiter = waiters(2)
    queued_of(harness.settle(refused, grant_of(harness.admit(refused)), RateLimited(5_000)))
    harness.advance(4_999)
    told = queued_of(harness.admit(waiter))
    assert (told.reason, told.eta_ms) == ("backoff", 1)
    assert told.retry_after_ms > harness.config.poll_min_ms  # one ms of cooldown, then jitter
    assert told.retry_at_ms == harness.clock.now_ms() + told.retry_after_ms


def test_a_tenant_queue_counts_tickets_removed_out_of_order() -> None:
    # Catches: a removal out of order counted the wrong way in the queue's length, the head
    # not moving past a ticket already removed (or moving by two), and the next ticket to
    # be issued taken for one in the queue.
    queue = TenantQueue("tenant-a", head=0, tail=4)
    queue.remove(2)
    assert (queue.length(), queue.holds(2), queue.index_of(3)) == (3, False, 2)
    assert not queue.holds(queue.tail)
    queue.remove(0)
    assert (queue.head, queue.length(), queue.removed) == (1, 2, [2])
    queue.remove(1)  # the head reaches 2, already gone: it moves on to 3
    assert (queue.head, queue.length(), queue.removed) == (3, 1, [])
    assert queue.holds(3) and queue.index_of(3) == 0


def test_a_retry_promised_the_slot_that_never_comes_back_loses_it_to_the_next_waiter() -> None:
    # Catches: a retry's turn kept when its promise is passed over (only the reservation
    # dropped), so the schedule promises it the slot again and the waiter behind it waits
    # for the retry's place to expire instead.
    harness = Harness(replace(FAST, create_slots=1))
    gone = Waiter("tenant-a", "CurationJob/gone")
    (behind,) = waiters(1, "tenant-b")
    grant = grant_of(harness.admit(gone))
    queued_of(harness.admit(behind))
    harness.advance(1_000)
    queued_of(harness.settle(gone, grant, Unavailable(503)))  # a retry, never seen again
    harness.advance(20_000)  # the cooldown is over; this poll promises the slot to the retry
    assert queued_of(harness.admit(behind)).position == 2
    harness.advance(FAST.reservation_claim_ms + 1_000)
    grant_of(harness.admit(behind))
    assert harness.status()["account"]["retrying"] == 0


def test_storage_keys_keep_the_encoding_earlier_versions_wrote() -> None:
    # Catches: a change to how tenant and entity names are written into storage keys; a
    # waiter's record or ticket written by the running version would no longer be found
    # after an upgrade.
    assert waiter_key("tenant-a", "CurationJob/a-1") == "adm/w/tenant-a/CurationJob%2Fa-1"
    assert waiter_key("tenant a", "Job/ü 1") == "adm/w/tenant%20a/Job%2F%C3%BC%201"
    assert ticket_key("tenant-a", 7) == "adm/t/tenant-a/7"
    longest_plain = "a" * 160
    assert waiter_key("t", longest_plain) == f"adm/w/t/{longest_plain}"
    too_long = "b" * 161
    digest = hashlib.sha256(too_long.encode()).hexdigest()
    assert waiter_key("t", too_long) == f"adm/w/t/~{digest}"


class ConflictsOnce(InterposedBackend):
    """Another invocation writes the gate first, once: this decision's first write loses."""

    def __init__(self, inner: StorageBackend) -> None:
        super().__init__(inner)
        self.armed = True

    def before(self, operation: str, key: str) -> None:
        if operation == "compare_and_swap" and key.endswith("adm/gate") and self.armed:
            self.armed = False
            raise StorageConflict("a rival wrote the gate first")


def test_a_decision_tries_as_often_as_cas_retries_says_and_names_the_last_conflict() -> None:
    # Catches: a decision that tries more often than `cas_retries` (here 1), and a
    # fail-closed warning that does not say how many tries failed or what the last was.
    from host.storage.memory import MemoryBackend

    harness = Harness(replace(FAST, cas_retries=1))
    harness.backend = ConflictsOnce(MemoryBackend(harness.clock.now_ms))
    (w,) = waiters(1)
    answer = queued_of(harness.admit(w))
    assert answer.reason == "storage"
    warnings = [message for level, message in harness.telemetry.logs if level is LogLevel.WARN]
    assert any(
        "still contended after 1 tries: a rival wrote the gate first" in m for m in warnings
    ), warnings
    grant_of(harness.admit(w))  # the rival is gone: the next try wins


def test_the_fair_order_serves_round_by_round_and_never_past_a_tenants_last_ticket() -> None:
    # Catches: a tenant with fewer waiters given a turn past its last ticket in a later
    # round (a ticket nobody holds), and rounds when there are no queues.
    state = GateState()
    assert list(fair_order(state, lambda tenant: True)) == []
    enqueue(state, "tenant-a")
    for _ in range(3):
        enqueue(state, "tenant-b")
    assert list(fair_order(state, lambda tenant: True)) == [
        ("tenant-a", 0),
        ("tenant-b", 1),
        ("tenant-b", 2),
        ("tenant-b", 3),
    ]


def test_a_turn_passed_over_for_not_claiming_its_promise_keeps_its_tenants_place() -> None:
    # Catches: a fresh ticket passed over at its claim deadline treated as granted, which
    # sends its tenant to the back of the ring behind tenants it was ahead of.
    harness = Harness(replace(FAST, create_slots=1))
    first, gone, next_a = waiters(3, "tenant-a")
    (other,) = waiters(1, "tenant-b")
    grant = grant_of(harness.admit(first))
    queued_of(harness.admit(gone))
    queued_of(harness.admit(other))
    queued_of(harness.admit(next_a))
    harness.advance(1_000)
    assert harness.settle(first, grant, Created("sbx-1", 3_600_000)) is None
    # The freed slot is promised to `gone`, tenant-a's turn, which never comes to claim it.
    harness.advance(FAST.reservation_claim_ms + 1_000)
    answer = queued_of(harness.admit(other))
    # `gone` is passed over; tenant-a keeps its place in the ring, so its next waiter is
    # served before tenant-b's.
    assert answer.position == 2, answer
    grant_of(harness.admit(next_a))
