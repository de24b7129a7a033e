"""Hypothesis state machine over provision / release / poll / E2B answers / crashes / time.

A model tracks what is really in use (as E2B would see it) and checks the controller's
promises after every step: no limit exceeded, FIFO within a tenant (up to the permits
free at once), round-robin across tenants (the free permits go to the front places of
that order, no others), a waiter's place never worsens except by retries placed ahead of it,
nothing held once every lease has expired, and every waiter ends with a sandbox or a
typed failure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from host.services.namespaces import ScopedStorage, account_namespace
from provisioner.config import AdmissionConfig
from provisioner.gates.document import GATE_KEY, GateState
from provisioner.gates.place import Stage
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
from provisioner.gates.view import inspect_gates
from provisioner.model import Failure
from tests.guest.harness import ACCOUNT, Harness

# This machine's run length under the suite's profiles (tests/conftest.py registers them,
# with the deadline and health checks this machine inherits). Set on its TestCase, not by
# registering the profiles again: that replaced them for every test collected after this file.
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
LONG_RUN = PROFILE == "long"
MACHINE_SETTINGS = (
    settings()  # the mutation run's profile, as loaded
    if PROFILE == "mutation"
    else settings(
        max_examples=1_000 if LONG_RUN else 40, stateful_step_count=80 if LONG_RUN else 40
    )
)

TENANTS = ("tenant-a", "tenant-b", "tenant-c")
WAITERS = tuple(Waiter(t, f"Job/{t}-{i}") for t in TENANTS for i in range(4))
SANDBOX_TIMEOUT_MS = 50_000
TYPED_FAILURES = {"queue_timeout", "retry_budget_exhausted", "e2b_bad_request"}

CONFIGS = (
    AdmissionConfig(
        create_slots=2,
        create_rate_per_s=5.0,
        create_burst=2,
        max_sandboxes=3,
        create_lease_ms=4_000,
        waiter_ttl_ms=3_000,
        queue_timeout_ms=120_000,
        backoff_base_ms=100,
        backoff_cap_ms=2_000,
        retry_budget=1_000,
        max_create_attempts=4,
        capacity_grow_after=2,
        poll_max_ms=2_000,
    ),
    AdmissionConfig(
        create_slots=3,
        create_rate_per_s=2.0,
        create_burst=3,
        max_sandboxes=5,
        max_sandboxes_per_tenant=2,
        create_lease_ms=4_000,
        waiter_ttl_ms=3_000,
        queue_timeout_ms=120_000,
        backoff_base_ms=100,
        backoff_cap_ms=2_000,
        retry_budget=2,
        retry_refill_per_s=0.5,
        max_create_attempts=3,
        poll_max_ms=2_000,
    ),
)


@dataclass
class Seen:
    """The model's view of one waiter."""

    phase: str = "idle"  # idle | queued | creating | crashed | holding | done
    grant: Grant | None = None
    sandbox_expires_ms: int = 0
    # A create whose answer nobody heard (its holder crashed, or it timed out) may have
    # made a sandbox, unrecorded: E2B runs it until its timeout unless this cycle's next
    # create adopts it (same idempotency key) or the release kills it.
    possible_until_ms: int = 0
    failure: str | None = None
    # Fairness bookkeeping for the current wait. `order` is when it joined its tenant's
    # queue (the model's enqueue count) and `latest_order` the latest it may stand at: a
    # fresh waiter that lapsed may have been dropped as dead and queued anew, at the back of
    # its tenant's queue, at its next poll (or it resumed its ticket: the model cannot tell).
    order: int = 0
    latest_order: int = 0
    position: int | None = None
    retries_at_position: int = 0
    is_retry: bool = False
    # Until when its keys surely live; after that it may have been dropped as dead, and
    # its place (resumed or queued anew) is unknown to the model.
    alive_until_ms: int = 0
    order_known: bool = True


class AdmissionMachine(RuleBasedStateMachine):
    @initialize(which=st.sampled_from(range(len(CONFIGS))), seed=st.integers(0, 2**16))
    def start(self, which: int, seed: int) -> None:
        self.config = CONFIGS[which]
        self.harness = Harness(self.config, seed=seed, sandbox_timeout_ms=SANDBOX_TIMEOUT_MS)
        self.seen = {w: Seen() for w in WAITERS}
        self.enqueued = 0
        self.retries_made = 0

    # -- helpers

    def now(self) -> int:
        return self.harness.clock.now_ms()

    def live_creates(self, tenant: str | None = None) -> int:
        return sum(
            1
            for w, s in self.seen.items()
            if s.phase in ("creating", "crashed")
            and s.grant is not None
            and s.grant.expires_at_ms > self.now()
            and (tenant is None or w.tenant == tenant)
        )

    def crashed(self, seen: Seen) -> None:
        """Its invocation died with the create in flight: E2B may make the sandbox."""
        seen.phase = "crashed"
        if seen.grant is not None:
            seen.possible_until_ms = seen.grant.expires_at_ms + SANDBOX_TIMEOUT_MS

    def in_use_at_e2b(self, tenant: str | None = None) -> int:
        """Sandboxes E2B may be running or making for the waiters, one per cycle at most."""
        now = self.now()
        return sum(
            1
            for w, s in self.seen.items()
            if (tenant is None or w.tenant == tenant)
            and (
                (
                    s.phase in ("creating", "crashed")
                    and s.grant is not None
                    and s.grant.expires_at_ms > now
                )
                or (s.phase == "holding" and s.sandbox_expires_ms > now)
                or s.possible_until_ms > now
            )
        )

    def free_before(self) -> int:
        account = self.harness.status()["account"]
        if account["backoff"]["cooling_ms"] > 0:
            return 0
        free: int = min(
            account["create_slots"]["limit"] - account["create_slots"]["in_use"],
            account["capacity"]["limit"] - account["capacity"]["in_use"],
            account["rate"]["available"],
        )
        return free

    def place_in_fair_order(self, waiter: Waiter) -> int | None:
        """The waiter's place as inspect reports it (None: not queued as a fresh ticket)."""
        storage = ScopedStorage(self.harness.backend, tenant=waiter.tenant, account=ACCOUNT)
        view = inspect_gates(storage, self.now(), self.config).waiter(waiter.tenant, waiter.entity)
        return view.position if view is not None and view.stage is Stage.QUEUED else None

    def decided(self, waiter: Waiter, decision: Grant | Queued | Rejected | None) -> None:
        seen = self.seen[waiter]
        if isinstance(decision, Grant):
            seen.phase, seen.grant, seen.position = "creating", decision, None
            seen.is_retry = False
        elif isinstance(decision, Queued):
            assert decision.reason != "storage", "the memory backend does not fail"
            if seen.phase not in ("queued",):
                self.enqueued += 1
                seen.order = seen.latest_order = self.enqueued
                seen.position = None
                seen.order_known = True
            seen.phase = "queued"
            seen.alive_until_ms = self.now() + decision.retry_after_ms + self.config.waiter_ttl_ms
            # The fairness bound: a tenant's first waiter is held back by at most one
            # round (one place per other tenant that starts waiting), plus the retries
            # that go ahead of everyone. (Later waiters of a tenant queue behind other
            # tenants' waiters of the same round, so only the first is bounded.) It is
            # first only if no queued waiter of its tenant may stand ahead of it: none
            # that joined before the latest it may have joined.
            first = not seen.is_retry and not any(
                w != waiter
                and w.tenant == waiter.tenant
                and s.phase == "queued"
                and s.order < seen.latest_order
                for w, s in self.seen.items()
            )
            allowed = self.retries_made - seen.retries_at_position + len(TENANTS) - 1
            bounded = first and not self.config.max_sandboxes_per_tenant
            if seen.position is not None and bounded:
                assert decision.position <= seen.position + allowed, (
                    f"{waiter.entity} moved back from {seen.position} to {decision.position}"
                )
            seen.position = decision.position if bounded else None
            seen.retries_at_position = self.retries_made
        elif isinstance(decision, Rejected):
            assert decision.failure.code in TYPED_FAILURES, decision
            seen.phase, seen.failure, seen.grant = "done", decision.failure.code, None

    # -- rules

    @rule(waiter=st.sampled_from(WAITERS))
    def provision(self, waiter: Waiter) -> None:
        seen = self.seen[waiter]
        if seen.phase in ("holding", "done", "creating"):
            if seen.phase == "creating":
                again = self.harness.admit(waiter)
                assert isinstance(again, Queued) and again.position == 0, again
            return
        was = seen.phase
        free = self.free_before()
        earlier = [
            w
            for w, s in self.seen.items()
            if w.tenant == waiter.tenant
            and s.phase == "queued"
            and not s.is_retry
            and s.order_known
            and s.alive_until_ms > self.now()
            and s.order < seen.order
        ]
        mine_known = seen.order_known and seen.alive_until_ms > self.now()
        fresh = was in ("idle", "queued") and not seen.is_retry
        # Dead waiters ahead are dropped a bounded number per poll (`SandboxLedger.assess`),
        # so a waiter behind some may be told to come back though the permits would reach it.
        none_dead = all(
            s.alive_until_ms > self.now()
            for w, s in self.seen.items()
            if w != waiter and s.phase == "queued"
        )
        place_before = self.place_in_fair_order(waiter)
        decision = self.harness.admit(waiter)
        fresh_grant = isinstance(decision, Grant) and decision.attempt == 1
        if fresh_grant and was == "queued" and mine_known:
            assert len(earlier) < free, (
                f"{waiter.entity} overtook {len(earlier)} earlier waiters with {free} free"
            )
        if fresh and none_dead and not self.config.max_sandboxes_per_tenant:
            # The fair order itself: a waiter's place (what inspect and its own poll report)
            # is its place in the round-robin order, and the free permits go to the places
            # at the front. A waiter held back at a place they reach, or granted from a
            # place behind them, was served in some other order (plain FIFO across
            # tenants, say).
            if isinstance(decision, Queued):
                assert decision.position > free, (
                    f"{waiter.entity} held at place {decision.position} with {free} free"
                )
            elif fresh_grant and place_before is not None:
                assert place_before <= free, (
                    f"{waiter.entity} granted from place {place_before} with {free} free"
                )
        self.after_poll(waiter, was, decision)

    def after_poll(self, waiter: Waiter, was: str, decision: Grant | Queued | Rejected) -> None:
        seen = self.seen[waiter]
        if seen.phase == "queued" and self.now() >= seen.alive_until_ms:
            # It may have been dropped as dead: a fresh waiter comes back at the back of
            # its tenant's queue, a retry comes back ahead of every fresh waiter.
            seen.position = None
            seen.order_known = False
            if seen.is_retry:
                self.retries_made += 1
            else:
                self.enqueued += 1
                seen.latest_order = self.enqueued
        if was == "crashed":
            # The session invoked again: its dead create may come back as a retry,
            # which goes ahead of every fresh waiter.
            seen.phase = "idle"
            self.retries_made += 1
            if isinstance(decision, Queued) and decision.position == 0:
                seen.phase = "crashed"  # its create lease is still live
                return
        self.decided(waiter, decision)

    @rule(data=st.data())
    def the_queued_poll_in_some_order(self, data: st.DataObject) -> None:
        # Every queued waiter polls once, in a drawn order, before time moves: the waits
        # the fair order decides between (the other rules let most tickets go stale).
        queued = [w for w, s in self.seen.items() if s.phase == "queued"]
        for waiter in data.draw(st.permutations(queued)):
            if self.seen[waiter].phase == "queued":
                self.provision(waiter)

    @rule(
        waiter=st.sampled_from(WAITERS),
        answer=st.sampled_from(["created", "429", "429-retry-after", "503", "cap", "400"]),
    )
    def e2b_answers(self, waiter: Waiter, answer: str) -> None:
        seen = self.seen[waiter]
        if seen.phase != "creating" or seen.grant is None:
            return
        answers: dict[str, CreateResult] = {
            "created": Created(f"sbx-{waiter.entity}", SANDBOX_TIMEOUT_MS),
            "429": RateLimited(None),
            "429-retry-after": RateLimited(1_500),
            "503": Unavailable(503),
            "cap": CapacityExhausted(self.config.max_sandboxes),
            "400": CreateFailed(Failure("e2b_bad_request", "bad template", False)),
        }
        result = answers[answer]
        decision = self.harness.settle(waiter, seen.grant, result)
        if isinstance(result, Created):
            assert decision is None
            seen.phase, seen.grant = "holding", None
            seen.sandbox_expires_ms = self.now() + SANDBOX_TIMEOUT_MS
            seen.possible_until_ms = 0  # adopted: the one sandbox of this cycle
            return
        if isinstance(result, Unavailable):  # a timeout: E2B may have made it
            expires = seen.grant.expires_at_ms + SANDBOX_TIMEOUT_MS
            seen.possible_until_ms = max(seen.possible_until_ms, expires)
        seen.grant = None
        if isinstance(decision, Queued):
            self.retries_made += 1
            seen.phase, seen.is_retry = "queued", True
            seen.alive_until_ms = self.now() + decision.retry_after_ms + self.config.waiter_ttl_ms
            seen.position = decision.position
            seen.retries_at_position = self.retries_made
            assert decision.reason in ("backoff", "capacity", "create_slots", "rate")
        else:
            assert isinstance(decision, Rejected)
            self.decided(waiter, decision)

    @rule(waiter=st.sampled_from(WAITERS))
    def holder_crashes(self, waiter: Waiter) -> None:
        seen = self.seen[waiter]
        if seen.phase == "creating":
            self.crashed(seen)

    @rule(waiter=st.sampled_from(WAITERS))
    def release(self, waiter: Waiter) -> None:
        seen = self.seen[waiter]
        if seen.phase in ("creating",):
            return  # the lead's release of an in-flight create is covered elsewhere
        self.harness.release(waiter)
        self.seen[waiter] = Seen()

    @rule(ms=st.sampled_from([1, 50, 200, 1_000, 2_500, 10_000]))
    def time_passes(self, ms: int) -> None:
        # No invocation outlives its create lease: one that would have, died.
        for seen in self.seen.values():
            grant = seen.grant
            if seen.phase == "creating" and grant and grant.expires_at_ms <= self.now() + ms:
                self.crashed(seen)
        self.harness.advance(ms)

    @precondition(lambda self: hasattr(self, "harness"))
    @rule()
    def every_lease_expires(self) -> None:
        for seen in self.seen.values():
            if seen.phase == "creating":
                self.crashed(seen)
        self.harness.advance(SANDBOX_TIMEOUT_MS + self.config.create_lease_ms)
        account = self.harness.status()["account"]
        assert account["create_slots"]["in_use"] == 0
        assert account["capacity"]["in_use"] == 0
        for seen in self.seen.values():
            seen.position = None

    # -- invariants

    @invariant()
    def no_limit_is_exceeded(self) -> None:
        if not hasattr(self, "harness"):
            return
        config = self.config
        assert self.live_creates() <= config.create_slots
        assert self.in_use_at_e2b() <= config.max_sandboxes
        if config.max_sandboxes_per_tenant is not None:
            for tenant in TENANTS:
                assert self.in_use_at_e2b(tenant) <= config.max_sandboxes_per_tenant
        account = self.harness.status()["account"]
        assert account["create_slots"]["in_use"] <= config.create_slots
        assert account["capacity"]["in_use"] <= config.max_sandboxes

    @invariant()
    def every_reservation_belongs_to_a_waiting_turn(self) -> None:
        if not hasattr(self, "harness"):
            return
        entry = self.harness.backend.get(account_namespace(ACCOUNT), GATE_KEY)
        if entry is None:
            return
        state = GateState.from_bytes(entry.value)
        retrying = {(e.tenant, e.entity) for e in state.retries}
        turns = [(r.tenant, r.ticket, r.entity) for r in state.reservations]
        assert len(turns) == len(set(turns)), "a turn holds two reservations"
        for reservation in state.reservations:
            if reservation.ticket is None:
                assert (reservation.tenant, reservation.entity) in retrying, reservation
            else:
                queue = state.queue_of(reservation.tenant)
                assert queue is not None and queue.holds(reservation.ticket), reservation

    def teardown(self) -> None:
        if not hasattr(self, "harness"):
            return
        # Everyone still wanting a sandbox keeps asking; E2B now always succeeds.
        for _ in range(2_000):
            pending = [w for w, s in self.seen.items() if s.phase in ("idle", "queued", "crashed")]
            creating = [w for w, s in self.seen.items() if s.phase == "creating"]
            if not pending and not creating:
                break
            for waiter in creating:
                self.e2b_answers(waiter, "created")
            for waiter in pending:
                was = self.seen[waiter].phase
                self.after_poll(waiter, was, self.harness.admit(waiter))
            self.harness.advance(500)
            for waiter, seen in self.seen.items():
                if seen.phase == "holding" and seen.sandbox_expires_ms <= self.now() + 5_000:
                    self.harness.release(waiter)
                    seen.phase = "done"
        for waiter, seen in self.seen.items():
            assert seen.phase in ("holding", "done"), (waiter, seen.phase)
            if seen.phase == "done" and seen.failure is not None:
                assert seen.failure in TYPED_FAILURES


TestAdmissionMachine = AdmissionMachine.TestCase
TestAdmissionMachine.settings = MACHINE_SETTINGS


def test_a_lapsed_waiter_rejoins_behind_its_tenant_and_the_model_knows() -> None:
    # Catches: the model treating a waiter that stopped polling (and was dropped as dead,
    # then queued anew at the back of its tenant's queue) as still its tenant's first
    # waiter, so its rightly worse place read as a fairness violation (a falsifying
    # example hypothesis found only sometimes: "Job/tenant-a-2 moved back from 4 to 8").
    a0, a2 = Waiter("tenant-a", "Job/tenant-a-0"), Waiter("tenant-a", "Job/tenant-a-2")
    b2, b3 = Waiter("tenant-b", "Job/tenant-b-2"), Waiter("tenant-b", "Job/tenant-b-3")
    c1, b1 = Waiter("tenant-c", "Job/tenant-c-1"), Waiter("tenant-b", "Job/tenant-b-1")
    machine = AdmissionMachine()
    machine.start(which=0, seed=0)
    for waiter in [a0] * 5 + [b2] + [a0] * 4 + [a2]:
        machine.provision(waiter)
        machine.no_limit_is_exceeded()
    assert machine.seen[a2].phase == "queued"
    machine.time_passes(10_000)  # a2 stops polling far past its TTL
    for waiter in (b3, c1, b1):
        machine.provision(waiter)
        machine.no_limit_is_exceeded()
    # Polls a0, a1, then a2: it rejoins third of its tenant. (Since an unanswered create
    # keeps counting as capacity, this replay moves a2 back by 3, within even the old
    # bound; the product-side half below pins the rejoin at the back.)
    machine.teardown()

    # The product's side, on its own: a2's dead ticket was skipped (c1 went ahead of it),
    # and a2 now queues behind a0 and a1 in round three of the fair order.
    # The sandboxes a0's and b2's unanswered creates could have made are past their E2B
    # timeout (lease 4 s + 5 s) after the 10 s pause: they no longer count as capacity.
    harness = Harness(CONFIGS[0], seed=0, sandbox_timeout_ms=5_000)
    for waiter in (a0, b2):
        assert isinstance(harness.admit(waiter), Grant)
    assert isinstance(harness.admit(a2), Queued)
    harness.advance(10_000)
    assert isinstance(harness.admit(b3), Grant)
    assert isinstance(harness.admit(c1), Grant), "a2's dead ticket is skipped"
    a1 = Waiter("tenant-a", "Job/tenant-a-1")
    b0, c0 = Waiter("tenant-b", "Job/tenant-b-0"), Waiter("tenant-c", "Job/tenant-c-0")
    c2 = Waiter("tenant-c", "Job/tenant-c-2")
    for waiter in (b1, a0, a1):
        assert isinstance(harness.admit(waiter), Queued)
    rejoined = harness.admit(a2)
    assert isinstance(rejoined, Queued)
    assert rejoined.position == 4, rejoined  # b1, a0, a1 ahead: the back of the queue
    for waiter in (b0, b2, c0, c2):
        assert isinstance(harness.admit(waiter), Queued)
    later = harness.admit(a2)
    assert isinstance(later, Queued)
    # Ring b, a, c; a2 is a's third: round one b1 a0 c0, round two b0 a1 c2, then b2 a2.
    assert later.position == 8, later


def test_the_machine_sees_a_later_tenant_served_before_an_earlier_tenants_second() -> None:
    # Catches: plain FIFO across tenants in place of round-robin (the machine's fair-order
    # check, replayed on a fixed path): tenant-a queues two waiters, then tenant-b one;
    # with two permits free, round-robin serves tenant-b's first waiter before
    # tenant-a's second.
    a0, a1, a2, a3 = (Waiter("tenant-a", f"Job/tenant-a-{i}") for i in range(4))
    b0 = Waiter("tenant-b", "Job/tenant-b-0")
    machine = AdmissionMachine()
    machine.start(which=0, seed=0)
    for waiter in (a0, a1, a2, a3, b0):
        machine.provision(waiter)
    assert [machine.seen[w].phase for w in (a0, a1, a2, a3, b0)] == ["creating"] * 2 + [
        "queued"
    ] * 3
    machine.e2b_answers(a0, "created")
    machine.e2b_answers(a1, "400")
    machine.time_passes(1_000)
    assert machine.free_before() == 2
    machine.provision(b0)
    assert machine.seen[b0].phase == "creating"
    machine.no_limit_is_exceeded()


def test_the_machine_sees_a_tenants_second_waiter_granted_ahead_of_a_later_tenant() -> None:
    # Catches: plain FIFO across tenants (the grant side of the machine's fair-order check):
    # once tenant-a's first waiter is served, tenant-a goes to the back of the ring, so with
    # one permit free tenant-b's waiter goes before tenant-a's second.
    c0, c1 = (Waiter("tenant-c", f"Job/tenant-c-{i}") for i in range(2))
    a0, a1 = (Waiter("tenant-a", f"Job/tenant-a-{i}") for i in range(2))
    b0 = Waiter("tenant-b", "Job/tenant-b-0")
    machine = AdmissionMachine()
    machine.start(which=0, seed=0)
    for waiter in (c0, c1, a0, a1, b0):
        machine.provision(waiter)
    machine.e2b_answers(c0, "created")
    machine.e2b_answers(c1, "created")
    machine.time_passes(1_000)
    machine.provision(a0)
    machine.e2b_answers(a0, "created")
    machine.release(c0)
    machine.time_passes(1_000)
    assert machine.free_before() == 1
    machine.provision(a1)
    machine.provision(b0)
    assert [machine.seen[w].phase for w in (a0, a1, b0)] == ["holding", "queued", "creating"]
