"""provisioner.gates.view: the public read-only view of an account's gates and
waiters, built from storage alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from host.services.namespaces import ScopedStorage, account_namespace
from provisioner.config import AdmissionConfig
from provisioner.gates.document import ticket_key, waiter_key
from provisioner.gates.place import Place, Stage
from provisioner.gates.results import CapacityExhausted, Created, Grant, RateLimited, Waiter
from provisioner.gates.view import GateView, inspect_gates, plain
from provisioner.ports import Entry, Scope
from tests.guest.harness import (
    ACCOUNT,
    FAST,
    Harness,
    grant_of,
    hold_release_and_hold_again,
    queued_of,
    retry_promised_the_free_slot,
)


def view(harness: Harness, *, prune: bool = True) -> GateView:
    storage = ScopedStorage(harness.backend, tenant="anyone", account=ACCOUNT)
    return inspect_gates(storage, harness.clock.now_ms(), harness.config, prune=prune)


def stored(harness: Harness) -> dict[str, Any]:
    namespace = account_namespace(ACCOUNT)
    found = {}
    for key in harness.backend.keys(namespace):
        entry = harness.backend.get(namespace, key)
        found[key] = None if entry is None else (entry.value, entry.version)
    return found


def test_an_untouched_account_shows_its_limits_and_nothing_in_use() -> None:
    harness = Harness(AdmissionConfig(create_slots=3, max_sandboxes=7, retry_budget=5.0))
    gates = view(harness)
    assert gates.version is None
    assert (gates.create_slots.in_use, gates.create_slots.limit) == (0, 3)
    assert (gates.capacity.in_use, gates.capacity.limit, gates.capacity.effective_limit) == (
        0,
        7,
        7,
    )
    assert gates.backoff.until_ms == 0 and gates.backoff.cooling_ms == 0
    assert gates.retry_budget.tokens == 5.0 and gates.retry_budget.limit == 5.0
    assert gates.waiters == () and gates.waiting_tenants == ()
    assert gates.rate.available == 1 and gates.rate.next_in_ms == 0


def test_lease_holders_and_expiries_are_shown_for_creates_and_sandboxes() -> None:
    # Catches: a view that counts leases without saying who holds them until when.
    harness = Harness(FAST)
    first, second = Waiter("tenant-a", "Job/1"), Waiter("tenant-b", "Job/2")
    creating = grant_of(harness.admit(first))
    holding = grant_of(harness.admit(second))
    harness.advance(500)
    assert harness.settle(second, holding, Created("sbx-2", 600_000)) is None
    gates = view(harness)
    assert gates.create_slots.in_use == 1
    (lease,) = gates.create_slots.leases
    assert (lease.lease_id, lease.tenant, lease.entity) == (creating.lease_id, "tenant-a", "Job/1")
    assert lease.expires_ms == creating.expires_at_ms
    (sandbox,) = gates.capacity.leases
    assert (sandbox.tenant, sandbox.entity, sandbox.sandbox_id) == ("tenant-b", "Job/2", "sbx-2")
    assert sandbox.expires_ms == harness.clock.now_ms() + 600_000
    assert gates.capacity.in_use == 2 and gates.capacity.running == 1
    assert gates.permits_held == 2
    assert gates.create_latency_ms == 500
    assert gates.grants == 2


def test_every_waiter_is_listed_in_fair_order_with_what_its_own_poll_is_told() -> None:
    # Catches: positions, reasons or ETAs that disagree with the answers admit gives.
    harness = Harness(AdmissionConfig(create_slots=1, create_rate_per_s=1000.0))
    grant_of(harness.admit(Waiter("holder", "Job/h")))
    a = [Waiter("tenant-a", f"Job/a{i}") for i in range(3)]
    b = [Waiter("tenant-b", f"Job/b{i}") for i in range(2)]
    for waiter in a + b:
        queued_of(harness.admit(waiter))
    harness.advance(40)
    gates = view(harness)
    order = [(w.tenant, w.entity) for w in gates.waiters]
    expected = [a[0], b[0], a[1], b[1], a[2]]
    assert order == [(w.tenant, w.entity) for w in expected]
    assert [w.position for w in gates.waiters] == [1, 2, 3, 4, 5]
    assert gates.waiting_tenants == ("tenant-a", "tenant-b")
    for shown in gates.waiters:
        assert shown.stage is Stage.QUEUED and shown.alive and shown.attempt == 1
        assert shown.waited_ms == 40
    for waiter in expected:
        before = view(harness).waiter(waiter.tenant, waiter.entity)
        told = queued_of(harness.admit(waiter))
        assert before is not None
        assert (before.position, before.reason, before.eta_ms) == (
            told.position,
            told.reason,
            told.eta_ms,
        )


def test_a_retrying_waiter_is_listed_first_with_its_attempt_and_the_backoff() -> None:
    # Catches: retries missing from the view, or the shared cooldown not shown.
    harness = Harness(AdmissionConfig(create_slots=2, create_rate_per_s=1000.0))
    first, second = Waiter("tenant-a", "Job/1"), Waiter("tenant-b", "Job/2")
    grant = grant_of(harness.admit(first))
    queued_of(harness.settle(first, grant, RateLimited(retry_after_ms=10_000)))
    queued_of(harness.admit(second))
    gates = view(harness)
    assert [(w.entity, w.stage) for w in gates.waiters] == [
        ("Job/1", Stage.RETRYING),
        ("Job/2", Stage.QUEUED),
    ]
    retry = gates.waiters[0]
    assert retry.attempt == 2 and retry.reason == "backoff" and retry.position == 1
    assert gates.backoff.until_ms == harness.clock.now_ms() + 10_000
    assert gates.backoff.cooling_ms == 10_000 and gates.backoff.failures == 1
    assert gates.retry_budget.tokens < gates.retry_budget.limit + 1e-9


def test_the_effective_capacity_shows_a_shrink_after_e2b_said_the_account_is_full() -> None:
    harness = Harness(AdmissionConfig(create_rate_per_s=1000.0, create_burst=10, max_sandboxes=10))
    holders = [Waiter("tenant-a", f"Job/{i}") for i in range(3)]
    for waiter in holders[:2]:
        grant = grant_of(harness.admit(waiter))
        assert harness.settle(waiter, grant, Created(f"sbx-{waiter.entity}", 600_000)) is None
    grant = grant_of(harness.admit(holders[2]))
    queued_of(harness.settle(holders[2], grant, CapacityExhausted()))
    gates = view(harness)
    assert gates.capacity.limit == 10
    assert gates.capacity.effective_limit == 2
    assert gates.capacity.in_use == 2


def test_a_waiter_that_stopped_polling_shows_as_gone() -> None:
    # Catches: a dead waiter shown as alive (an operator would wait for it).
    config = AdmissionConfig(create_slots=1, create_rate_per_s=1000.0, waiter_ttl_ms=1_000)
    harness = Harness(config)
    grant_of(harness.admit(Waiter("holder", "Job/h")))
    quiet, polling = Waiter("tenant-a", "Job/quiet"), Waiter("tenant-b", "Job/polling")
    queued_of(harness.admit(quiet))
    harness.advance(100_000)
    queued_of(harness.admit(polling))
    gates = view(harness)
    dead = gates.dead_tickets
    assert len(dead) == 1 and dead[0].tenant == "tenant-a"
    assert dead[0].entity is None and dead[0].waited_ms is None
    live = gates.waiter("tenant-b", "Job/polling")
    assert live is not None and live.alive


def test_a_ticket_whose_entity_has_no_record_of_it_is_not_expected_back() -> None:
    # Catches: a ticket left by a caller killed between queueing and recording its place
    # (its liveness key written, its record not) counted as a waiter still to come: after
    # every job ended, a multihost run with a kill reported one waiter left.
    config = AdmissionConfig(create_slots=1, create_rate_per_s=1000.0)
    harness = Harness(config)
    grant_of(harness.admit(Waiter("holder", "Job/h")))
    killed, polling = Waiter("tenant-a", "Job/killed"), Waiter("tenant-b", "Job/polling")
    queued_of(harness.admit(killed))
    queued_of(harness.admit(polling))
    namespace = account_namespace(ACCOUNT)
    assert harness.backend.delete(namespace, waiter_key(killed.tenant, killed.entity), None)
    gates = view(harness)
    [leftover] = [w for w in gates.waiters if w.tenant == "tenant-a"]
    assert leftover.entity == "Job/killed" and leftover.ticket is not None  # key still there
    assert not leftover.alive and leftover.attempt is None
    assert [(w.tenant, w.entity) for w in gates.live_waiters] == [("tenant-b", "Job/polling")]
    assert [(w.tenant, w.entity) for w in gates.dead_tickets] == [("tenant-a", "Job/killed")]


def test_expired_leases_are_hidden_unless_asked_for_as_stored() -> None:
    harness = Harness(AdmissionConfig(create_lease_ms=5_000))
    grant = grant_of(harness.admit(Waiter("tenant-a", "Job/1")))
    harness.advance(6_000)
    assert view(harness).create_slots.leases == ()
    storage = ScopedStorage(harness.backend, tenant="anyone", account=ACCOUNT)
    by_default = inspect_gates(storage, harness.clock.now_ms(), harness.config)
    assert by_default.create_slots.leases == ()  # what the next decision will see
    (lease,) = view(harness, prune=False).create_slots.leases
    assert lease.lease_id == grant.lease_id


def test_inspection_writes_nothing() -> None:
    # Catches: a view that prunes or refills in storage (it would race the decisions).
    harness = Harness(AdmissionConfig(create_slots=1, create_lease_ms=5_000))
    grant_of(harness.admit(Waiter("tenant-a", "Job/1")))
    queued_of(harness.admit(Waiter("tenant-b", "Job/2")))
    harness.advance(6_000)
    before = stored(harness)
    gates = view(harness)
    assert gates.version is not None
    assert stored(harness) == before


def test_every_lease_and_unsettled_create_is_shown_in_full() -> None:
    # Catches: a view field dropped or filled from the wrong place (who holds a permit,
    # since and until when), the rate's settings, the time of the view, the measured hold.
    config = AdmissionConfig(
        create_rate_per_s=50.0, create_burst=10, create_lease_ms=5_000, max_sandboxes=10
    )
    harness = Harness(config, sandbox_timeout_ms=60_000)
    dead, holder, creating = (Waiter(t, f"Job/{t}") for t in ("tenant-c", "tenant-b", "tenant-a"))
    lost = grant_of(harness.admit(dead))  # its invocation dies: never settled
    started = harness.clock.now_ms()
    harness.advance(6_000)
    hold_release_and_hold_again(harness, holder)
    in_flight = grant_of(harness.admit(creating))
    now = harness.clock.now_ms()
    gates = inspect_gates(
        ScopedStorage(harness.backend, tenant="anyone", account=ACCOUNT), now, config
    )
    assert gates.now_ms == now
    lease = {"lease_id": in_flight.lease_id, "tenant": "tenant-a", "entity": "Job/tenant-a"}
    assert plain(gates.create_slots.leases) == [
        {**lease, "started_ms": now, "expires_ms": now + 5_000}
    ]
    [sandbox] = gates.capacity.leases
    assert plain(sandbox) == {
        "lease_id": sandbox.lease_id,
        "tenant": "tenant-b",
        "entity": "Job/tenant-b",
        "sandbox_id": "sbx-b2",
        "started_ms": now,
        "expires_ms": now + 600_000,
    }
    assert sandbox.lease_id
    lease = {"lease_id": lost.lease_id, "tenant": "tenant-c", "entity": "Job/tenant-c"}
    assert plain(gates.capacity.unsettled) == [
        {**lease, "started_ms": started, "until_ms": started + 65_000}
    ]
    assert (gates.rate.per_s, gates.rate.burst) == (50.0, 10)
    assert gates.hold_ms == 1_000


def test_a_retry_whose_record_is_gone_is_not_expected_back() -> None:
    # Catches: a retry entry whose waiter's record expired (it stopped polling) shown as a
    # live waiter with its old attempt.
    harness = Harness(AdmissionConfig(create_rate_per_s=1000.0))
    waiter = Waiter("tenant-a", "Job/1")
    queued_of(harness.settle(waiter, grant_of(harness.admit(waiter)), RateLimited(1_000)))
    harness.advance(40)
    [retry] = view(harness).waiters
    assert (retry.tenant, retry.entity) == ("tenant-a", "Job/1")
    assert (retry.stage, retry.alive, retry.attempt, retry.waited_ms) == (
        Stage.RETRYING,
        True,
        2,
        40,
    )
    namespace = account_namespace(ACCOUNT)
    assert harness.backend.delete(namespace, waiter_key(waiter.tenant, waiter.entity), None)
    [gone] = view(harness).waiters
    assert (gone.stage, gone.alive, gone.attempt, gone.waited_ms) == (
        Stage.RETRYING,
        False,
        None,
        None,
    )


def test_a_waiter_behind_one_that_left_out_of_order_is_still_listed() -> None:
    # Catches: the listing of a tenant's tickets stopping at the first one that left out
    # of order (released before its turn), hiding everyone behind it.
    harness = Harness(AdmissionConfig(create_slots=1, create_rate_per_s=1000.0))
    grant_of(harness.admit(Waiter("holder", "Job/h")))
    a = [Waiter("tenant-a", f"Job/a{i}") for i in range(3)]
    for waiter in a:
        queued_of(harness.admit(waiter))
    harness.release(a[1])
    assert [w.entity for w in view(harness).waiters] == ["Job/a0", "Job/a2"]


def test_a_waiter_whose_turn_came_since_its_answer_shows_as_due_with_its_reservation() -> None:
    # Catches: a waiter a freed slot was promised to shown as still held by the gate it
    # waited for (with that gate's ETA), and the promise itself missing from the view.
    harness = Harness(AdmissionConfig(create_slots=1, create_rate_per_s=1000.0))
    holder, waiter = Waiter("holder", "Job/h"), Waiter("tenant-a", "Job/a")
    grant = grant_of(harness.admit(holder))
    told = queued_of(harness.admit(waiter))
    before = view(harness)
    assert before.waiter(waiter.tenant, waiter.entity) is not None
    assert (before.waiters[0].reason, before.waiters[0].eta_ms) == (told.reason, told.eta_ms)
    assert told.reason == "create_slots" and told.eta_ms > 0
    assert before.reservations == ()

    harness.advance(40)
    assert harness.settle(holder, grant, Created("sbx-h", 600_000)) is None
    gates = view(harness)
    due = gates.waiter(waiter.tenant, waiter.entity)
    assert due is not None
    assert (due.reason, due.eta_ms, due.position) == ("due", 0, 1)
    now = harness.clock.now_ms()
    claim_ms = harness.config.reservation_claim_ms
    assert plain(gates.reservations) == [
        {"tenant": "tenant-a", "ticket": due.ticket, "entity": None, "at_ms": now}
        | {"by_ms": now + claim_ms}
    ]


def test_a_retry_counts_as_gone_from_the_millisecond_its_liveness_ends() -> None:
    # Catches: a waiter still counted alive at its `alive_until_ms` (the place says when it
    # stops being expected back; from that instant it is gone).
    harness = Harness(AdmissionConfig(create_slots=2, create_rate_per_s=1000.0))
    retrying = Waiter("tenant-a", "Job/1")
    grant = grant_of(harness.admit(retrying))
    queued_of(harness.settle(retrying, grant, RateLimited(retry_after_ms=10_000)))
    storage = ScopedStorage(harness.backend, tenant="anyone", account=ACCOUNT)
    entry = storage.get(Scope.ACCOUNT, waiter_key(retrying.tenant, retrying.entity))
    assert entry is not None
    until = Place.from_bytes(entry.value).alive_until_ms
    harness.advance(until - 1 - harness.clock.now_ms())
    assert [w.alive for w in view(harness, prune=False).waiters] == [True]
    harness.advance(1)
    assert [w.alive for w in view(harness, prune=False).waiters] == [False]


def test_a_retry_whose_cooldown_ended_is_shown_holding_the_reservation_by_entity() -> None:
    # Catches: a retry's reservation shown without the entity that holds it (a retry has
    # no ticket: the entity is all that names its holder).
    harness, _, _, answer = retry_promised_the_free_slot()
    assert answer.position == 2  # the retry goes first
    now = harness.clock.now_ms()
    by = now + harness.config.reservation_claim_ms
    assert plain(view(harness).reservations) == [
        {"tenant": "tenant-a", "ticket": None, "entity": "Job/a", "at_ms": now, "by_ms": by}
    ]


def test_the_hold_time_is_the_first_hold_then_a_quarter_weighted_running_mean() -> None:
    # Catches: the measured hold time (what capacity ETAs rest on) smoothed with other
    # weights, not smoothed at all, or a hold released in the millisecond it began
    # counted as lasting one.
    harness = Harness(AdmissionConfig(create_slots=3, create_rate_per_s=1000.0))
    holds = {"Job/1": 0, "Job/2": 8_000, "Job/3": 4_000}
    measured = []
    for entity, hold_ms in holds.items():
        waiter = Waiter("tenant-a", entity)
        grant = grant_of(harness.admit(waiter))
        assert harness.settle(waiter, grant, Created(f"sbx-{entity}", 600_000)) is None
        harness.advance(hold_ms)
        assert harness.release(waiter) is True
        measured.append(view(harness).hold_ms)
        harness.advance(10)  # past the rate gate's spacing
    assert measured == [0, (0 * 3 + 8_000) // 4, (2_000 * 3 + 4_000) // 4]


def test_releasing_a_retry_that_holds_nothing_says_it_was_waiting_and_drops_it() -> None:
    # Catches: a release of a waiter that only waited (a retry in backoff: no ticket, no
    # lease) answered as if it had not been there (`held_permit` false).
    harness = Harness(AdmissionConfig(create_slots=2, create_rate_per_s=1000.0))
    retrying = Waiter("tenant-a", "Job/1")
    grant = grant_of(harness.admit(retrying))
    queued_of(harness.settle(retrying, grant, RateLimited(retry_after_ms=10_000)))
    assert [w.entity for w in view(harness).waiters] == ["Job/1"]
    assert harness.release(retrying) is True
    assert view(harness).waiters == ()
    assert harness.release(retrying) is False


def test_the_create_latency_is_the_first_then_a_quarter_weighted_running_mean() -> None:
    # Catches: the measured create latency (what slot ETAs rest on) smoothed with other
    # weights, not smoothed at all, or a create answered in the millisecond it was sent
    # counted as taking one.
    harness = Harness(AdmissionConfig(create_slots=3, create_rate_per_s=1000.0))
    measured = []
    for i, latency_ms in enumerate((0, 8_000, 4_000)):
        waiter = Waiter("tenant-a", f"Job/{i}")
        grant = grant_of(harness.admit(waiter))
        harness.advance(latency_ms)
        assert harness.settle(waiter, grant, Created(f"sbx-{i}", 600_000)) is None
        measured.append(view(harness).create_latency_ms)
        harness.advance(10)  # past the rate gate's spacing
    assert measured == [0, (0 * 3 + 8_000) // 4, (2_000 * 3 + 4_000) // 4]


def only_ticket_key(harness: Harness) -> str:
    """The liveness key of the one ticket waiting."""
    [shown] = view(harness).waiters
    assert shown.ticket is not None
    return ticket_key(shown.tenant, shown.ticket)


def account_entry(harness: Harness, key: str) -> Entry | None:
    storage = ScopedStorage(harness.backend, tenant="anyone", account=ACCOUNT)
    return storage.get(Scope.ACCOUNT, key)


HOLDER = Waiter("holder", "Job/h")


def leaves_by_release(harness: Harness, holder: Grant, waiter: Waiter) -> None:
    # Catches: a release of a queued waiter that keeps its ticket's liveness key, so the
    # ticket would count as alive until the key expired.
    assert harness.release(waiter) is True


def leaves_by_grant(harness: Harness, holder: Grant, waiter: Waiter) -> None:
    # Catches: a grant that keeps the granted ticket's liveness key until its TTL (stale
    # keys pile up in the account's storage, one per waiter that queued).
    assert harness.settle(HOLDER, holder, Created("sbx-h", 600_000)) is None
    grant_of(harness.admit(waiter))


@pytest.mark.parametrize("leave", [leaves_by_release, leaves_by_grant], ids=["release", "grant"])
def test_a_waiter_that_leaves_the_queue_leaves_no_ticket_key_behind(
    leave: Callable[[Harness, Grant, Waiter], None],
) -> None:
    harness = Harness(AdmissionConfig(create_slots=1, create_rate_per_s=1000.0, create_burst=2))
    holder = grant_of(harness.admit(HOLDER))
    waiter = Waiter("tenant-a", "Job/a")
    queued_of(harness.admit(waiter))
    key = only_ticket_key(harness)
    assert account_entry(harness, key) is not None
    leave(harness, holder, waiter)
    assert account_entry(harness, key) is None


def test_a_ticket_left_behind_by_a_waiter_that_queued_again_is_not_expected_back() -> None:
    # Catches: a leftover ticket whose entity queued again with a newer ticket (its caller
    # died between queueing and recording its place) shown alive with the newer one's
    # record, so an operator would wait for a waiter that never comes for it.
    harness = Harness(AdmissionConfig(create_slots=1, create_rate_per_s=1000.0))
    grant_of(harness.admit(Waiter("holder", "Job/h")))
    waiter = Waiter("tenant-a", "Job/again")
    queued_of(harness.admit(waiter))
    namespace = account_namespace(ACCOUNT)
    assert harness.backend.delete(namespace, waiter_key(waiter.tenant, waiter.entity), None)
    harness.advance(40)
    queued_of(harness.admit(waiter))  # no record of its place: a fresh ticket
    leftover, current = view(harness).waiters
    assert (leftover.entity, current.entity) == (waiter.entity, waiter.entity)
    assert leftover.ticket is not None and current.ticket == leftover.ticket + 1
    assert (leftover.alive, leftover.attempt, leftover.waited_ms) == (False, None, None)
    assert (current.alive, current.attempt, current.waited_ms) == (True, 1, 0)


def test_a_retry_asking_again_leaves_no_ticket_key_behind() -> None:
    # Catches: the place of a waiter without a ticket (a retry) read back with the stored
    # "no ticket" marker as a ticket number, so its polls write a stray ticket key.
    harness = Harness(AdmissionConfig(create_rate_per_s=1000.0))
    retrying = Waiter("tenant-a", "Job/1")
    queued_of(harness.settle(retrying, grant_of(harness.admit(retrying)), RateLimited(1_000)))
    assert queued_of(harness.admit(retrying)).reason == "backoff"
    assert [key for key in stored(harness) if key.startswith("adm/t/")] == []


def test_a_promise_passed_on_from_a_holder_that_never_came_is_claimable_at_once() -> None:
    # Catches: a held reservation whose token came due sooner (the one ahead of it passed
    # over) still shown claimable only from its old time.
    config = AdmissionConfig(create_rate_per_s=1.0, reservation_claim_ms=300)
    harness = Harness(config)
    start = harness.clock.now_ms()
    absent, promised, later = (Waiter("tenant-a", f"Job/{n}") for n in ("a", "b", "c"))
    grant_of(harness.admit(Waiter("holder", "Job/h")))
    harness.advance(1)
    assert queued_of(harness.admit(absent)).reservation  # the next token, at start + 1 s
    harness.advance(999)
    told = queued_of(harness.admit(promised))  # the token after it: start + 2 s
    assert (told.retry_at_ms, told.reservation != "") == (start + 2_000, True)
    harness.advance(301)  # the first holder never claimed its token
    queued_of(harness.admit(later))
    now = harness.clock.now_ms()
    shown, _ = view(harness).reservations  # the promised waiter's, then the later one's
    assert (shown.at_ms, shown.by_ms) == (now, start + 2_000 + 300)
    grant_of(harness.admit(promised))
