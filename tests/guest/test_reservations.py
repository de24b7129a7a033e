"""Reservations: a permit that exists for a waiter other than the caller is promised to the
waiter next in fair order, with a claim deadline, and passes on when unclaimed."""

from __future__ import annotations

import json

import pytest

from host.services.namespaces import account_namespace
from provisioner.config import AdmissionConfig
from provisioner.gates.document import GATE_KEY, GateState
from provisioner.gates.results import (
    CapacityExhausted,
    Created,
    CreateFailed,
    Grant,
    Queued,
    RateLimited,
    Rejected,
    Waiter,
)
from provisioner.model import Failure
from tests.guest.harness import ACCOUNT, Harness, grant_of, queued_of
from tests.guest.resource_harness import ResourceHarness

# One create per second, four slots: a waiter behind the first grant waits on the rate.
PACED = AdmissionConfig(create_slots=4, create_rate_per_s=1.0, reservation_claim_ms=3_000)


def waiters(count: int, tenant: str = "tenant-a") -> list[Waiter]:
    return [Waiter(tenant, f"TemperAgent/{tenant}-{i}") for i in range(count)]


def granted_then_two_queued(
    harness: Harness,
) -> tuple[tuple[Waiter, Waiter, Waiter], Grant, Queued, Queued]:
    """tenant-a's first waiter is granted and the next two queue behind it: the waiters, the
    grant and the two queued answers."""
    a, b, c = waiters(3)
    return (
        (a, b, c),
        grant_of(harness.admit(a)),
        queued_of(harness.admit(b)),
        queued_of(harness.admit(c)),
    )


# One create slot and no rate to wait for: a waiter behind the first grant waits for the slot.
ONE_SLOT = AdmissionConfig(create_slots=1, create_rate_per_s=1000, create_burst=100)


def gate(harness: Harness) -> GateState:
    entry = harness.backend.get(account_namespace(ACCOUNT), GATE_KEY)
    assert entry is not None
    return GateState.from_bytes(entry.value)


def test_the_next_rate_token_is_reserved_for_the_next_waiter_with_its_exact_time() -> None:
    # Catches: a queued answer without retry_at_ms, or a promise made to the wrong waiter.
    harness = Harness(PACED)
    a, b, c = waiters(3)
    start = harness.clock.now_ms()
    grant_of(harness.admit(a))
    second = queued_of(harness.admit(b))
    assert (second.reason, second.retry_at_ms) == ("rate", start + 1_000)
    assert second.reservation, "the next token's waiter holds a reservation"
    assert second.claim_by_ms == start + 1_000 + 3_000
    third = queued_of(harness.admit(c))
    # Its turn is estimated exactly, but the token after next is not promised yet.
    assert (third.retry_at_ms, third.reservation) == (start + 2_000, "")
    assert [r.rid for r in gate(harness).reservations] == [second.reservation]


def test_nobody_else_can_take_a_reserved_permit() -> None:
    # Catches: a reservation that the first caller after its time can take.
    harness = Harness(PACED)
    (_, b, c), _, held, _ = granted_then_two_queued(harness)
    harness.advance(1_000)
    assert isinstance(harness.admit(c), Queued), "c took b's reserved token"
    granted = grant_of(harness.admit(b))
    assert granted.attempt == 1
    assert all(r.rid != held.reservation for r in gate(harness).reservations)


def test_an_unclaimed_reservation_passes_to_the_next_waiter_and_is_not_lost() -> None:
    # Catches: a permit held forever for a waiter that went away.
    harness = Harness(PACED)
    start = harness.clock.now_ms()
    (_, b, c), _, held, _ = granted_then_two_queued(harness)
    harness.advance(held.claim_by_ms - start)
    assert isinstance(harness.admit(c), Queued), "passed on before its claim deadline"
    harness.advance(1)
    grant_of(harness.admit(c))
    # b comes back late: it queues again behind, keeping when it first asked.
    late = queued_of(harness.admit(b))
    assert late.waited_ms == harness.clock.now_ms() - start
    assert late.position == 1


def test_a_slot_freed_by_another_waiters_create_is_reserved_for_the_head() -> None:
    # Catches: a freed slot that the caller (not the head) takes, or nobody is promised.
    harness = Harness(ONE_SLOT)
    (a, b, c), grant_a, _, _ = granted_then_two_queued(harness)
    assert harness.settle(a, grant_a, Created("sbx-a", 600_000)) is None
    # c asks first after the slot frees: b is the head, so the slot is b's.
    after = queued_of(harness.admit(c))
    assert after.reservation == ""
    promised = gate(harness).reservations
    assert [(r.tenant, r.ticket) for r in promised] == [("tenant-a", 1)]
    assert isinstance(harness.admit(b), Grant)


def test_a_document_written_before_reservations_still_loads() -> None:
    # Catches: a stored gate from an older version that no longer reads.
    state = GateState()
    doc = json.loads(state.to_bytes())
    del doc["rv"]
    loaded = GateState.from_bytes(json.dumps(doc).encode())
    assert loaded.reservations == []


def test_a_retry_that_joins_ahead_does_not_take_a_promised_token() -> None:
    # Catches: reserved turns not scheduled first (a retry, which goes ahead of fresh
    # tickets, would take the token promised to the fresh ticket at the head).
    harness = Harness(AdmissionConfig(create_slots=2, create_rate_per_s=1.0, create_lease_ms=500))
    a, b = waiters(2)
    grant_of(harness.admit(a))
    promised = queued_of(harness.admit(b))
    assert promised.reservation
    # a's holder dies mid-create: its lease lapses and a comes back as a retry.
    harness.advance(600)
    retry = queued_of(harness.admit(a))
    assert retry.retry_at_ms > promised.retry_at_ms
    harness.advance(400)
    grant_of(harness.admit(b))


def test_a_waiter_promised_a_token_is_told_its_due_time_after_a_retry_joins_ahead() -> None:
    # Catches: a turn the schedule gives a permit answered from its place in the fair order
    # (the retry ahead and the capacity left would put it second, waiting for capacity)
    # instead of the promised token's exact due time; and the retry told the token that is
    # promised to the waiter.
    config = AdmissionConfig(
        create_slots=2, create_rate_per_s=1.0, create_lease_ms=500, max_sandboxes=2
    )
    harness = Harness(config)
    a, b = waiters(2)
    start = harness.clock.now_ms()
    grant_of(harness.admit(a))
    assert queued_of(harness.admit(b)).reservation
    # a's holder dies mid-create: its lease lapses and a comes back as a retry, which takes
    # no new capacity (it reclaims the sandbox its create may have made).
    harness.advance(600)
    retry = queued_of(harness.admit(a))
    assert (retry.reason, retry.eta_ms, retry.retry_after_ms) == ("rate", 1_400, 1_400)
    promised = queued_of(harness.admit(b))
    assert (promised.reason, promised.eta_ms, promised.retry_after_ms) == ("rate", 400, 400)
    assert promised.retry_at_ms == start + 1_000


def test_the_permits_freed_are_promised_to_no_more_of_a_tenants_turns_than_its_room() -> None:
    # Catches: the schedule's count of turns per tenant along its walk wrong (a tenant
    # promised more turns than `max_sandboxes_per_tenant` leaves it, or fewer), or the
    # walk stopping at a tenant with no room left instead of passing it by.
    config = AdmissionConfig(
        create_slots=6, create_rate_per_s=1000, create_burst=100, max_sandboxes_per_tenant=2
    )
    harness = Harness(config)
    (a0, a1, a2) = waiters(3, "tenant-a")
    (b1, b2) = waiters(2, "tenant-b")
    (c0,) = waiters(1, "tenant-c")
    assert harness.settle(a0, grant_of(harness.admit(a0)), Created("sbx-a0", 600_000)) is None
    # c0's create is refused with a cooldown: nothing starts, so everyone else queues.
    queued_of(harness.settle(c0, grant_of(harness.admit(c0)), RateLimited(5_000)))
    for waiter in (a1, b1, a2, b2):
        assert queued_of(harness.admit(waiter)).reason == "backoff"
    harness.advance(5_000)
    controller = harness.controller(c0.tenant)
    assert isinstance(controller.admit(c0), Grant)
    # Fair order a1, b1, a2, b2: tenant-a holds one sandbox, so it has room for one more.
    assert [w.entity for w in controller.wake_ups] == [a1.entity, b1.entity, b2.entity]
    assert isinstance(harness.admit(a2), Queued)
    for waiter in (a1, b1, b2):
        grant_of(harness.admit(waiter))


def test_a_retry_behind_its_own_promised_token_is_told_its_reservation_and_not_woken() -> None:
    # Catches: a retry promised the next rate token by its own decision not told its
    # reservation (a retry's is found by entity, it has no ticket), named in its own
    # decision's wake-ups, or woken again by the next decision that keeps the promise.
    harness = Harness(PACED)
    (a,) = waiters(1, "tenant-a")
    (b,) = waiters(1, "tenant-b")
    start = harness.clock.now_ms()
    grant = grant_of(harness.admit(a))
    queued_of(harness.settle(a, grant, RateLimited(200)))
    harness.advance(300)
    asking = harness.controller(a.tenant)
    retry = queued_of(asking.admit(a))
    assert (retry.reason, retry.retry_after_ms, retry.retry_at_ms) == ("rate", 700, start + 1_000)
    [held] = gate(harness).reservations
    assert (held.entity, held.at_ms) == (a.entity, start + 1_000)
    assert (retry.reservation, retry.claim_by_ms) == (held.rid, start + 1_000 + 3_000)
    assert asking.wake_ups == []
    other = harness.controller(b.tenant)
    assert queued_of(other.admit(b)).position == 2
    assert other.wake_ups == [], "the retry's promise was made already"
    assert gate(harness).reservations == [held], "and is kept, not made twice"
    harness.advance(700)
    assert grant_of(harness.admit(a)).attempt == 2


def test_two_retries_of_one_tenant_are_each_promised_a_slot_of_their_own() -> None:
    # Catches: a retry's reservation looked up by tenant alone (a retry has no ticket, its
    # entity names it), so the second retry of a tenant is taken for the first and is
    # neither promised its slot nor woken.
    harness = Harness(AdmissionConfig(create_slots=2, create_rate_per_s=1000, create_burst=10))
    first, second = waiters(2, "tenant-a")
    (fresh,) = waiters(1, "tenant-b")
    grants = [grant_of(harness.admit(w)) for w in (first, second)]
    for waiter, grant in zip((first, second), grants, strict=True):
        queued_of(harness.settle(waiter, grant, RateLimited(100)))
    harness.advance(100)
    controller = harness.controller(fresh.tenant)
    assert queued_of(controller.admit(fresh)).position == 3
    assert [w.entity for w in controller.wake_ups] == [first.entity, second.entity]
    assert [r.entity for r in gate(harness).reservations] == [first.entity, second.entity]
    # The first gives up its own promise (the freed slot goes to the fresh waiter), not the
    # other retry's.
    assert harness.release(first) is True
    promised = [(r.tenant, r.entity) for r in gate(harness).reservations]
    assert promised == [(second.tenant, second.entity), (fresh.tenant, None)]


def test_a_retry_holding_a_reservation_keeps_its_turn_ahead_of_a_later_promise() -> None:
    # Catches: a retry's reservation not kept first in the schedule (not matched to the
    # retry it belongs to), so a fresh ticket promised the token after it takes its turn.
    harness = Harness(AdmissionConfig(create_slots=4, create_rate_per_s=1.0))
    (a,) = waiters(1, "tenant-a")
    (b,) = waiters(1, "tenant-b")
    grant = grant_of(harness.admit(a))
    queued_of(harness.settle(a, grant, RateLimited(2_000)))
    harness.advance(2_000)
    # The cooldown is over: the retry's token is due now, b's a second later.
    controller = harness.controller(b.tenant)
    behind = queued_of(controller.admit(b))
    assert [w.entity for w in controller.wake_ups] == [a.entity]
    assert (behind.reason, behind.eta_ms) == ("rate", 1_000)
    assert [r.entity for r in gate(harness).reservations] == [a.entity, None]
    harness.advance(1_000)
    # The retry has not claimed its token yet, so b's is still a second away.
    still = queued_of(harness.admit(b))
    assert (still.reason, still.eta_ms) == ("rate", 1_000)
    assert grant_of(harness.admit(a)).attempt == 2


def test_a_decision_that_only_passes_over_an_unclaimed_reservation_stores_it() -> None:
    # Catches: a reservation passed over (its holder's turn out of the queue) only in the
    # memory of a decision that changes nothing else, so the stored gate keeps promising
    # the permit and every later decision passes it over again.
    config = AdmissionConfig(
        create_slots=1,
        create_rate_per_s=1000,
        create_burst=10,
        retry_budget=1,
        retry_ratio=0,
        retry_refill_per_s=0,
        backoff_base_ms=100,
        backoff_cap_ms=100,
        reservation_claim_ms=1_000,
    )
    harness = Harness(config)
    (retrying,) = waiters(1, "tenant-a")
    (absent,) = waiters(1, "tenant-b")
    first = grant_of(harness.admit(retrying))
    queued_of(harness.admit(absent))
    queued_of(harness.settle(retrying, first, RateLimited(100)))
    harness.advance(200)
    second = grant_of(harness.admit(retrying))  # spends the budget's only token
    queued_of(harness.settle(retrying, second, RateLimited(100)))
    harness.advance(200)
    # The retry cannot be paid for: the free slot is promised to the fresh waiter.
    assert queued_of(harness.admit(retrying)).reason == "backoff"
    [promised] = gate(harness).reservations
    assert promised.entity is None and promised.tenant == absent.tenant
    harness.advance(1_001)  # the fresh waiter never came to claim it
    assert queued_of(harness.admit(retrying)).reason == "backoff"
    stored = gate(harness)
    assert (stored.reservations, stored.queue_of(absent.tenant)) == ([], None)


def test_a_holder_still_asking_keeps_its_place_when_its_promised_permit_goes_away() -> None:
    # Catches: a reservation whose permit a cap-429 took away (adaptive capacity) passed
    # over at its claim deadline as if its holder had gone, though the holder asked on
    # every poll: its ticket left the queue and it queued again behind later waiters (a
    # falsifying example of the state machine: "Job/tenant-c-3 moved back from 2 to 10").
    config = AdmissionConfig(
        create_slots=2,
        max_sandboxes=3,
        create_rate_per_s=1000,
        create_burst=10,
        reservation_claim_ms=3_000,
    )
    harness = Harness(config)
    first, capped = Waiter("tenant-a", "Job/a-0"), Waiter("tenant-b", "Job/b-0")
    holder, later = Waiter("tenant-c", "Job/c-0"), Waiter("tenant-a", "Job/a-1")
    first_grant, capped_grant = grant_of(harness.admit(first)), grant_of(harness.admit(capped))
    queued_of(harness.admit(holder))
    queued_of(harness.admit(later))
    assert harness.settle(first, first_grant, Created("sbx-a", 600_000)) is None
    [promised] = gate(harness).reservations
    assert (promised.tenant, promised.entity) == (holder.tenant, None), "the precondition"
    # E2B's cap: capacity falls to the one sandbox running, so the promise cannot be kept.
    queued_of(harness.settle(capped, capped_grant, CapacityExhausted(None)))
    assert harness.status()["account"]["capacity"]["limit"] == 1, "the precondition"
    places = []
    for _ in range(12):  # the holder asks every half second, well past the claim deadline
        places.append(queued_of(harness.admit(holder)).position)
        queued_of(harness.admit(later))
        harness.advance(500)
    assert harness.clock.now_ms() > promised.by_ms, "the precondition"
    assert places == [places[0]] * len(places), places
    assert places[0] < queued_of(harness.admit(later)).position


# -- the same reservations at a resource gate (one fair queue for every gate)

SLOTS = {
    "resource": "llm",
    "resource.llm.concurrency": "1",
    "resource.llm.lease_s": "600",
    "reservation_claim_ms": "3000",
}


def resource_params(outcome: object, action: str) -> dict[str, object]:
    assert getattr(outcome, "action", None) == action, outcome
    params: dict[str, object] = outcome.params  # type: ignore[attr-defined]
    return params


def promised_to_the_head_as_another_asks() -> tuple[ResourceHarness, dict[str, object]]:
    """One resource permit: a holds it, b and c queue, a releases it, and c asks first (the
    permit is promised to b, the head). Returns the gates and c's answer."""
    gates = ResourceHarness(SLOTS)
    resource_params(gates.acquire("acme", "a"), "ResourceGranted")
    resource_params(gates.acquire("acme", "b"), "ResourceQueued")
    resource_params(gates.acquire("acme", "c"), "ResourceQueued")
    gates.release("acme", "a")
    return gates, resource_params(gates.acquire("acme", "c"), "ResourceQueued")


@pytest.mark.parametrize("head_comes_back", [True, False])
def test_a_resource_permit_freed_by_a_release_is_promised_to_the_head_and_passes_on(
    head_comes_back: bool,
) -> None:
    # Catches: a resource gate whose freed permit the first caller takes (not the head),
    # or that waits forever for a head that went away; and a promise made by a decision
    # that changed nothing else (c only asks again) left unsaved.
    gates, behind = promised_to_the_head_as_another_asks()
    assert behind["reservation"] == ""
    assert int(str(behind["retry_at_ms"])) > gates.clock.now_ms()
    if not head_comes_back:
        gates.advance(3_001)  # b never claims it, though its ticket is still alive
        resource_params(gates.acquire("acme", "c"), "ResourceGranted")
        return
    head = resource_params(gates.acquire("acme", "b"), "ResourceGranted")
    gates.release("acme", "b")
    # Now c is the head; d behind it asks, and c never comes back.
    resource_params(gates.acquire("acme", "d"), "ResourceQueued")
    gates.advance(3_001)
    resource_params(gates.acquire("acme", "d"), "ResourceGranted")
    assert head["lease_id"]


@pytest.mark.parametrize(
    ("after_window_ms", "third"), [(0, "ResourceQueued"), (1, "ResourceGranted")]
)
def test_a_promise_is_kept_for_a_claim_window_after_a_cooldown_ends(
    after_window_ms: int, third: str
) -> None:
    # Catches: a claim window after a cooldown that ends a millisecond early, or that is
    # measured back from the cooldown's end (no holder can claim a permit during a
    # cooldown, so its promise must outlast the cooldown by the claim window).
    gates, _ = promised_to_the_head_as_another_asks()
    # A 429 elsewhere pauses the account for a second.
    gates.settle("acme", "z", status=429, headers={"retry-after": "1"})
    gates.advance(1_000 + 3_000 + after_window_ms)  # the cooldown, then the claim window
    resource_params(gates.acquire("acme", "c"), third)


def test_a_settled_create_promises_its_slot_to_the_head_and_names_it_for_a_wake_up() -> None:
    # Catches: a freed slot nobody is told about (the head sleeps until its own timer).
    harness = Harness(ONE_SLOT)
    (a, b, _), grant_a, _, _ = granted_then_two_queued(harness)
    controller = harness.controller(a.tenant)
    assert controller.settle(a, grant_a, Created("sbx-a", 600_000)) is None
    [wake] = controller.wake_ups
    assert (wake.tenant, wake.entity, wake.at_ms) == (b.tenant, b.entity, harness.clock.now_ms())
    assert wake.reservation == gate(harness).reservations[0].rid
    # b, woken, claims it; the caller is never told to wake itself.
    asking = harness.controller(b.tenant)
    assert isinstance(asking.admit(b), Grant)
    assert all(w.entity != b.entity for w in asking.wake_ups)


def test_a_create_e2b_refuses_promises_its_slot_to_the_head() -> None:
    # Catches: a slot freed by a refused create (a 400) that nobody is told about, so the
    # head waits for its own timer while the slot stands idle.
    harness = Harness(AdmissionConfig(create_slots=1, create_rate_per_s=1000, create_burst=100))
    a, b = waiters(2)
    grant_a = grant_of(harness.admit(a))
    queued_of(harness.admit(b))
    controller = harness.controller(a.tenant)
    refused = controller.settle(
        a, grant_a, CreateFailed(Failure("e2b_bad_request", "E2B answered 400", False))
    )
    assert isinstance(refused, Rejected) and refused.failure.code == "e2b_bad_request"
    [wake] = controller.wake_ups
    assert (wake.tenant, wake.entity) == (b.tenant, b.entity)
    assert wake.reservation == gate(harness).reservations[0].rid
    assert isinstance(harness.controller(b.tenant).admit(b), Grant)


def test_a_release_promises_the_capacity_it_frees() -> None:
    # Catches: a release that frees capacity without promising it to the next waiter.
    harness = Harness(AdmissionConfig(max_sandboxes=1, create_rate_per_s=1000, create_burst=100))
    a, b = waiters(2)
    grant_a = grant_of(harness.admit(a))
    assert harness.settle(a, grant_a, Created("sbx-a", 600_000)) is None
    assert queued_of(harness.admit(b)).reason == "capacity"
    controller = harness.controller(a.tenant)
    assert controller.release(a)
    assert [w.entity for w in controller.wake_ups] == [b.entity]


def test_a_waiter_told_to_come_back_past_poll_max_stays_alive_until_then() -> None:
    # Catches: a liveness key sized from retry_after_ms (clamped to poll_max), so a waiter
    # a host wakes at its retry_at_ms is dropped as dead before it comes back.
    harness = Harness(
        AdmissionConfig(
            create_slots=4, create_rate_per_s=0.1, poll_max_ms=1_000, waiter_ttl_ms=1_000
        )
    )
    a, b, c, d = waiters(4)
    start = harness.clock.now_ms()
    grant_of(harness.admit(a))
    queued_of(harness.admit(b))
    told = queued_of(harness.admit(c))
    assert told.retry_after_ms == 1_000 and told.retry_at_ms == start + 20_000
    queued_of(harness.admit(d))
    harness.advance(10_000)
    grant_of(harness.admit(b))
    harness.advance(10_000)
    assert isinstance(harness.admit(d), Queued), "c was dropped as dead before its time"
    grant_of(harness.admit(c))
