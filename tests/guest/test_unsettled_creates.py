"""A create whose outcome is unknown keeps counting against capacity until it is resolved.

When a create's holder dies mid-call (kill -9 of its host), or the create times out, E2B
may have made the sandbox although nothing records it. Capacity must go on counting that
possible sandbox until the entity's next create adopts it by its idempotency key, its
release kills it, a late answer says the create made none, or E2B's own timeout would
have killed it. Each test keeps, by hand, the list of sandboxes E2B runs (what the mock's
records would show), on the harness's virtual clock.
"""

from __future__ import annotations

import json
from dataclasses import replace

from provisioner.config import AdmissionConfig
from provisioner.gates.document import DEFAULT_SANDBOX_TIMEOUT_MS, GateState
from provisioner.gates.results import (
    CapacityExhausted,
    Created,
    Grant,
    RateLimited,
    Unavailable,
    Waiter,
)
from tests.guest.harness import Harness, grant_of, queued_of

LEASE_MS = 10_000
SANDBOX_TIMEOUT_MS = 600_000
CAP = AdmissionConfig(
    create_slots=2,
    create_rate_per_s=1000.0,
    create_burst=10,
    max_sandboxes=2,
    create_lease_ms=LEASE_MS,
)


def in_use(harness: Harness) -> int:
    used: int = harness.status()["account"]["capacity"]["in_use"]
    return used


def _lease_runs_out(harness: Harness, waiter: Waiter) -> Grant:
    """`waiter` is granted a create whose answer never comes back before its lease expires:
    the sandbox E2B may have made for it still counts."""
    grant = grant_of(harness.admit(waiter))
    harness.advance(LEASE_MS)
    assert in_use(harness) == 1
    return grant


def _dead_holder_and_one_holder(harness: Harness) -> tuple[Waiter, Waiter, set[str]]:
    """`dead`'s create reached E2B, which made its sandbox, and its host died before the
    answer; another waiter holds a recorded sandbox; the create lease of `dead` has
    expired. Returns `dead`, a newcomer, and the sandboxes E2B runs."""
    dead, holder, newcomer = (Waiter("tenant-a", f"Job/{name}") for name in "abc")
    running: set[str] = set()
    grant_of(harness.admit(dead))
    running.add("sbx-dead")  # made at E2B; the answer never reached anyone
    grant = grant_of(harness.admit(holder))
    assert harness.settle(holder, grant, Created("sbx-holder", SANDBOX_TIMEOUT_MS)) is None
    running.add("sbx-holder")
    harness.advance(LEASE_MS)
    return dead, newcomer, running


def test_an_expired_create_lease_keeps_its_possible_sandbox_counted() -> None:
    # Catches the soak's cap overrun: the expired create lease of a killed host freed the
    # capacity of a sandbox that runs at E2B unrecorded, and a newcomer made one more.
    harness = Harness(CAP, sandbox_timeout_ms=SANDBOX_TIMEOUT_MS)
    _dead, newcomer, running = _dead_holder_and_one_holder(harness)
    decision = harness.admit(newcomer)
    if isinstance(decision, Grant):
        running.add("sbx-newcomer")
    assert len(running) <= CAP.max_sandboxes, f"E2B runs {sorted(running)} against a cap of 2"
    assert queued_of(decision).reason == "capacity"
    assert in_use(harness) == 2
    assert harness.status()["account"]["create_slots"]["in_use"] == 0, "the slot came back"


def test_the_re_driven_session_adopts_its_sandbox_through_its_own_capacity() -> None:
    # Catches: a full account blocking the retry that would adopt the possible sandbox
    # (it already counts), and the adoption counting the sandbox twice.
    harness = Harness(CAP, sandbox_timeout_ms=SANDBOX_TIMEOUT_MS)
    dead, newcomer, running = _dead_holder_and_one_holder(harness)
    queued_of(harness.admit(newcomer))
    retry = grant_of(harness.admit(dead))  # the survivor re-drives the dead host's session
    assert retry.attempt == 2
    assert in_use(harness) == 2, "the retry's create stands for the same possible sandbox"
    # Same idempotency key: E2B answers with the sandbox the first attempt made.
    assert harness.settle(dead, retry, Created("sbx-dead", SANDBOX_TIMEOUT_MS)) is None
    assert in_use(harness) == 2
    assert queued_of(harness.admit(newcomer)).reason == "capacity"
    assert harness.release(dead) is True
    running.discard("sbx-dead")
    grant_of(harness.admit(newcomer))
    running.add("sbx-newcomer")
    assert len(running) == in_use(harness) == 2
    running.add("sbx-newcomer")
    assert len(running) == in_use(harness) == 2


def test_a_refused_retry_leaves_the_first_attempts_sandbox_counted() -> None:
    # Catches: the retry's 429 dropping the count of the sandbox its first attempt may
    # have made (E2B refused the retry, which says nothing about the first create).
    harness = Harness(CAP, sandbox_timeout_ms=SANDBOX_TIMEOUT_MS)
    dead, newcomer, running = _dead_holder_and_one_holder(harness)
    retry = grant_of(harness.admit(dead))
    queued_of(harness.settle(dead, retry, RateLimited(1)))
    harness.advance(1_000)
    assert in_use(harness) == len(running) == 2
    assert queued_of(harness.admit(newcomer)).reason == "capacity"


def test_a_timed_out_create_keeps_its_possible_sandbox_counted() -> None:
    # Catches: an Unavailable answer (a timeout: E2B may have made the sandbox) freeing
    # capacity while the waiter sits among the retries.
    harness = Harness(CAP, sandbox_timeout_ms=SANDBOX_TIMEOUT_MS)
    slow, holder, newcomer = (Waiter("tenant-a", f"Job/{name}") for name in "abc")
    grant = grant_of(harness.admit(slow))
    holding = grant_of(harness.admit(holder))
    harness.settle(holder, holding, Created("sbx-holder", SANDBOX_TIMEOUT_MS))
    queued_of(harness.settle(slow, grant, Unavailable(None)))  # made at E2B, answer lost
    harness.advance(2_000)
    assert in_use(harness) == 2
    assert queued_of(harness.admit(newcomer)).reason == "capacity"
    retry = grant_of(harness.admit(slow))
    assert harness.settle(slow, retry, Created("sbx-slow", SANDBOX_TIMEOUT_MS)) is None
    assert in_use(harness) == 2


def test_a_late_answer_of_the_dead_holders_create_settles_it() -> None:
    # Catches: a create answered after its lease expired leaving its possible sandbox
    # counted beside the sandbox it recorded, or the refusal it heard still counting.
    harness = Harness(CAP, sandbox_timeout_ms=SANDBOX_TIMEOUT_MS)
    late, other = Waiter("tenant-a", "Job/late"), Waiter("tenant-a", "Job/other")
    grant = _lease_runs_out(harness, late)
    harness.settle(late, grant, RateLimited(1))  # E2B refused it: it made no sandbox
    assert in_use(harness) == 0
    harness.advance(10)
    answered = grant_of(harness.admit(other))
    harness.advance(LEASE_MS)
    assert harness.settle(other, answered, Created("sbx-other", SANDBOX_TIMEOUT_MS)) is None
    assert in_use(harness) == 1, "recorded once, as the sandbox it is"


def test_a_session_that_never_returns_frees_the_capacity_when_e2b_would_kill_the_sandbox() -> None:
    # Catches: a possible sandbox counted forever (nobody comes back for it), and one
    # freed before E2B's own timeout could have killed it.
    harness = Harness(CAP, sandbox_timeout_ms=SANDBOX_TIMEOUT_MS)
    gone, newcomer = Waiter("tenant-a", "Job/gone"), Waiter("tenant-b", "Job/new")
    granted = _lease_runs_out(harness, gone)
    # The sandbox was made by the lease's expiry at the latest and lives its timeout.
    harness.clock.set(granted.expires_at_ms + SANDBOX_TIMEOUT_MS - 1)
    assert in_use(harness) == 1
    harness.advance(1)
    assert in_use(harness) == 0
    grant_of(harness.admit(newcomer))


def test_a_release_kills_the_possible_sandbox_and_frees_it() -> None:
    # Catches: a release (which kills what it finds by the idempotency key) leaving the
    # possible sandbox counted until its timeout.
    harness = Harness(CAP, sandbox_timeout_ms=SANDBOX_TIMEOUT_MS)
    dead, newcomer, running = _dead_holder_and_one_holder(harness)
    assert harness.release(dead) is True
    running.discard("sbx-dead")
    grant_of(harness.admit(newcomer))
    running.add("sbx-newcomer")
    assert len(running) == in_use(harness) == 2


def test_per_tenant_room_counts_the_possible_sandbox_and_lets_its_own_retry_go() -> None:
    # Catches: the tenant limit ignoring a possible sandbox, or blocking the retry that
    # adopts it because the tenant is full of its own possible sandbox.
    config = AdmissionConfig(
        create_slots=2,
        create_rate_per_s=1000.0,
        create_burst=10,
        max_sandboxes=4,
        max_sandboxes_per_tenant=1,
        create_lease_ms=LEASE_MS,
    )
    harness = Harness(config, sandbox_timeout_ms=SANDBOX_TIMEOUT_MS)
    dead, sibling = Waiter("tenant-a", "Job/dead"), Waiter("tenant-a", "Job/sibling")
    grant_of(harness.admit(dead))
    harness.advance(LEASE_MS)
    assert queued_of(harness.admit(sibling)).reason == "capacity"
    retry = grant_of(harness.admit(dead))
    assert harness.settle(dead, retry, Created("sbx-dead", SANDBOX_TIMEOUT_MS)) is None
    assert harness.status()["tenant"]["in_use"] == 1


def test_a_gate_document_from_before_the_bound_reads_with_the_default_sandbox_timeout() -> None:
    # Catches: a stored gate of the previous version failing to load (every decision of
    # the account would fail closed), or its creates read without a bound or with their
    # fields shifted.
    older = {"c": [["c1", "tenant-a", "Job/a", 1_000, 500]], "s": [], "r": 0, "cd": 0}
    older |= {"bf": 0, "cap": None, "ok": 0, "rb": None, "rbt": 0, "q": [], "rq": []}
    older |= {"ep": 0, "lat": None, "hold": None, "n": 0}
    state = GateState.from_bytes(json.dumps(older).encode())
    (lease,) = state.create_leases
    assert (lease.lease_id, lease.tenant, lease.entity) == ("c1", "tenant-a", "Job/a")
    assert (lease.expires_ms, lease.started_ms) == (1_000, 500)
    assert lease.sandbox_until_ms == 1_000 + DEFAULT_SANDBOX_TIMEOUT_MS
    assert state.unsettled == []
    assert GateState.from_bytes(state.to_bytes()) == state


def test_a_retry_the_full_account_holds_back_lets_a_reclaiming_retry_behind_it_go() -> None:
    # Catches: a retry held back by capacity stopping the walk, so the retry behind it
    # that reclaims its own possible sandbox (it needs no new capacity) waits too.
    config = AdmissionConfig(
        create_slots=3, create_rate_per_s=1000.0, create_burst=10, max_sandboxes=3
    )
    harness = Harness(config, sandbox_timeout_ms=SANDBOX_TIMEOUT_MS)
    holder, refused, lost = (Waiter("tenant-a", f"Job/{name}") for name in "abc")
    holding = grant_of(harness.admit(holder))
    assert harness.settle(holder, holding, Created("sbx-holder", SANDBOX_TIMEOUT_MS)) is None
    first, second = grant_of(harness.admit(refused)), grant_of(harness.admit(lost))
    # E2B says the account is full: the capacity shrinks to the holder and `lost`'s create.
    queued_of(harness.settle(refused, first, CapacityExhausted()))
    queued_of(harness.settle(lost, second, Unavailable(None)))  # may have made its sandbox
    assert in_use(harness) == harness.status()["account"]["capacity"]["limit"] == 2
    harness.advance(harness.status()["account"]["backoff"]["cooling_ms"] + 1)
    assert queued_of(harness.admit(refused)).reason == "capacity"
    assert grant_of(harness.admit(lost)).attempt == 2


def test_a_promised_fresh_turn_the_full_account_holds_back_is_not_overtaken() -> None:
    # Catches: a fresh turn held back by capacity that passes over only itself, as a retry
    # does: the retry behind it that reclaims its possible sandbox would take the slot
    # promised to it (for a fresh turn, capacity is a limit nothing behind may overtake).
    config = replace(CAP, create_slots=1, max_sandboxes=3)
    harness = Harness(config, sandbox_timeout_ms=SANDBOX_TIMEOUT_MS)
    holder, dead, promised, newcomer = (Waiter("tenant-a", f"Job/{name}") for name in "hdpn")
    holding = grant_of(harness.admit(holder))
    assert harness.settle(holder, holding, Created("sbx-holder", SANDBOX_TIMEOUT_MS)) is None
    grant_of(harness.admit(dead))  # its answer never comes back
    queued_of(harness.admit(promised))
    harness.advance(LEASE_MS)  # the slot is free; the dead create's possible sandbox counts
    queued_of(harness.admit(newcomer))  # the slot is promised to `promised`
    # The integration lowers max_sandboxes to the two sandboxes counted: no room is left.
    lowered = replace(config, max_sandboxes=2)
    retry = harness.controller(dead.tenant, lowered).admit(dead, SANDBOX_TIMEOUT_MS)
    queued_of(retry)
