"""Resource gates, one behaviour at a time: the debt bucket, per-tenant caps, the shared
backoff on a provider's 429/529 and its headers, session slots, bad config and params."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from host.services.namespaces import account_namespace
from provisioner.config import read_config
from provisioner.gates.blocking import LOOKAHEAD
from provisioner.gates.bucket import Bucket, Charge, note_change, settle_charge
from provisioner.gates.resource import pause_from_headers
from provisioner.model import ProvisionerError
from provisioner.ports import StorageUnavailable
from tests.doubles import InterposedBackend
from tests.guest.harness import ACCOUNT
from tests.guest.resource_harness import ResourceHarness

LLM = {"resource": "llm", "resource.llm.concurrency": "2", "resource.llm.itpm": "6000"}


def granted(outcome: object) -> str:
    assert getattr(outcome, "action", None) == "ResourceGranted", outcome
    lease: str = outcome.params["lease_id"]  # type: ignore[attr-defined]
    return lease


def queued(outcome: object, reason: str) -> dict[str, Any]:
    assert getattr(outcome, "action", None) == "ResourceQueued", outcome
    params: dict[str, Any] = outcome.params  # type: ignore[attr-defined]
    assert params["reason"] == reason, params
    return params


# -- the bucket


def test_an_underestimate_runs_the_bucket_into_debt_until_it_has_refilled() -> None:
    # Catches: a settle that ignores the actual cost (the provider would see the excess).
    gates = ResourceHarness(
        {**LLM, "resource.llm.concurrency": "5", "resource.llm.itpm_burst": "1000"}
    )
    granted(gates.acquire("acme", "a", estimated_input_tokens=500))
    gates.settle("acme", "a", input_tokens=1500)
    rate = gates.status("acme")["resources"]["llm"]["rates"]["input_tokens"]
    assert rate["debt"] == 500 and rate["available"] == 0
    # 6000/min is 0.1 token per ms: 500 of debt plus 100 wanted is 6 s of refill.
    wait = queued(gates.acquire("acme", "b", estimated_input_tokens=100), "input_tokens")
    assert wait["eta_ms"] == 6_000 and wait["retry_after_ms"] == 6_000
    gates.advance(5_999)
    queued(gates.acquire("acme", "b", estimated_input_tokens=100), "input_tokens")
    gates.advance(1)
    granted(gates.acquire("acme", "b", estimated_input_tokens=100))


def test_a_status_shows_tokens_to_three_decimals() -> None:
    # Catches: a status that shows the refill's last fractions of a token.
    gates = ResourceHarness({"resource": "llm", "resource.llm.itpm": "7"})  # 8571.4 ms each
    granted(gates.acquire("acme", "a", estimated_input_tokens=7))
    gates.advance(1)  # 0.000117 of a token back
    rate = gates.status("acme")["resources"]["llm"]["rates"]["input_tokens"]
    assert (rate["available"], rate["debt"]) == (0.0, 0.0)
    gates.settle("acme", "a", input_tokens=8)  # one token of debt, less the refill
    gates.advance(1)
    rate = gates.status("acme")["resources"]["llm"]["rates"]["input_tokens"]
    assert (rate["available"], rate["debt"]) == (0.0, 1.0)


def test_an_overestimate_comes_back_only_as_far_as_the_bucket_would_have_held_it() -> None:
    # Catches: a refund that gives back tokens the bucket would have lost to its burst cap
    # meanwhile (here 300 extra tokens would fit in no time, a burst above the provider's).
    bucket = Bucket.per_minute(6000, 2000)  # 10 ms per token
    now = 0
    tat = bucket.charge(0.0, now, 1000)  # A: estimated 1000, level 1000
    a = Charge("input", 1000, tat - now)
    now = 7_000  # 700 tokens refilled: level 1700
    note_change([a], "input", tat, now)
    tat = bucket.charge(tat, now, 1000)  # B: level 700
    tat = settle_charge(bucket, tat, now, a, 0)  # A used nothing
    # Charged 0 at its grant, the bucket would have been full (2000) when B came: B leaves
    # 1000, so only 300 of A's 1000 come back.
    assert bucket.level(tat, now) == pytest.approx(1000)


def test_a_refund_before_anything_else_changed_the_bucket_is_whole() -> None:
    bucket = Bucket.per_minute(6000, 2000)
    tat = bucket.charge(0.0, 0, 1000)
    charge = Charge("input", 1000, tat)
    tat = settle_charge(bucket, tat, 1_000, charge, 400)
    assert bucket.level(tat, 1_000) == pytest.approx(1000 + 100 + 600)


def test_the_declared_errors_of_calls_in_flight_are_reserved_but_one() -> None:
    # Catches: a gate that admits a second call while the first one's worst case is still
    # outstanding (two estimation errors could then reach the provider unaccounted).
    gates = ResourceHarness({**LLM, "resource.llm.itpm_burst": "2000"})
    demand = {"estimated_input_tokens": 900, "max_input_tokens": 1500}
    granted(gates.acquire("acme", "a", **demand))  # level 1100; its margin 600
    # b's estimate fits, but with a's margin (600) reserved beside b's own it does not:
    # 900 + 600 > 1100.
    wait = queued(gates.acquire("acme", "b", **demand), "input_tokens")
    assert wait["retry_after_ms"] >= 1
    gates.settle("acme", "a", input_tokens=1500)  # the worst case: 600 into the bucket
    # a settled: nothing outstanding but b's own margin, which is not reserved.
    rate = gates.status("acme")["resources"]["llm"]["rates"]["input_tokens"]
    assert rate["available"] == pytest.approx(500)
    gates.advance(4_000)  # 400 refilled: 900 for b's estimate
    granted(gates.acquire("acme", "b", **demand))


def test_calls_that_declare_no_error_share_the_bucket_to_the_full() -> None:
    # Catches: a reserve taken for calls whose estimate is their worst case (throughput).
    gates = ResourceHarness(
        {**LLM, "resource.llm.concurrency": "3", "resource.llm.itpm_burst": "2000"}
    )
    demand = {"estimated_input_tokens": 900, "max_input_tokens": 900}
    granted(gates.acquire("acme", "a", **demand))
    granted(gates.acquire("acme", "b", **demand))
    granted(gates.acquire("acme", "c", estimated_input_tokens=200))  # exactly what is left


@pytest.mark.parametrize("margin", [300, 1])
def test_a_call_that_expires_or_is_released_unsettled_is_charged_its_worst_case(
    margin: int,
) -> None:
    # Catches: dropping a lease's margin with the lease (its call may still cost it), also
    # a margin of a single token.
    config = {**LLM, "resource.llm.itpm_burst": "2000", "resource.llm.lease_s": "10"}
    for ends in ("expiry", "release"):
        gates = ResourceHarness(config)
        demand = {"estimated_input_tokens": 500, "max_input_tokens": 500 + margin}
        granted(gates.acquire("acme", "a", **demand))
        if ends == "release":
            gates.release("acme", "a")
        else:
            gates.advance(10_000)  # the lease expires; 1000 tokens refilled meanwhile
        rate = gates.status("acme")["resources"]["llm"]["rates"]["input_tokens"]
        # 2000 - 500 - the margin charged, plus the refill until the margin was charged.
        expected = 2000 - 500 - margin if ends == "release" else 2000 - margin
        assert rate["available"] == pytest.approx(expected), (ends, rate)


def test_a_worst_case_below_its_estimate_is_refused() -> None:
    gates = ResourceHarness(LLM)
    outcome = gates.acquire("acme", "a", estimated_input_tokens=500, max_input_tokens=400)
    assert outcome.error is not None and outcome.error.code == "invalid_invocation"
    assert outcome.error.message == (
        "max_input_tokens (400) is below its estimate (500): a worst case bounds it"
    )
    granted(gates.acquire("acme", "a", estimated_input_tokens=500))


def test_a_queue_that_moves_keeps_its_waiters_past_the_stall_timeout() -> None:
    # Catches: a stall timeout that counts the whole wait (a long queue that keeps moving
    # is not stuck), and one that never fires on a gate that grants no one.
    slots = {
        "resource": "sessions",
        "resource.sessions.concurrency": "1",
        "resource.sessions.stall_timeout_s": "60",
        "resource.sessions.queue_timeout_s": "600",
    }
    gates = ResourceHarness(slots)
    line = ["first", "second", "third", "last"]
    granted(gates.acquire("acme", "holder"))
    for waiter in line:
        queued(gates.acquire("acme", waiter), "concurrency")
    holder = "holder"
    for turn in range(3):  # a slot frees every 50 s: 150 s of waiting, never 60 stalled
        gates.advance(50_000)
        gates.release("acme", holder)
        holder = line[turn]
        granted(gates.acquire("acme", holder))
        for waiter in line[turn + 1 :]:
            queued(gates.acquire("acme", waiter), "concurrency")
    gates.advance(50_000)
    queued(gates.acquire("acme", "last"), "concurrency")
    gates.advance(9_999)
    queued(gates.acquire("acme", "last"), "concurrency")
    gates.advance(1)  # 60 s since the last grant: the gate is stuck
    outcome = gates.acquire("acme", "last")
    assert outcome.error is not None and outcome.error.code == "queue_timeout"
    assert "stall timeout" in outcome.error.message


def test_output_tokens_known_only_afterwards_are_charged_at_the_settle() -> None:
    gates = ResourceHarness({"resource": "llm", "resource.llm.otpm": "600"})
    granted(gates.acquire("acme", "a"))
    granted(gates.acquire("acme", "b"))  # nothing estimated: the bucket is not in debt
    gates.settle("acme", "a", output_tokens=700)
    queued(gates.acquire("acme", "c"), "output_tokens")  # 100 tokens of debt
    gates.advance(10_000)  # 10 tokens per second
    granted(gates.acquire("acme", "c"))


def test_an_estimate_above_the_burst_is_refused_as_never_grantable() -> None:
    gates = ResourceHarness(LLM)
    outcome = gates.acquire("acme", "a", estimated_input_tokens=6001)
    assert outcome.error is not None and outcome.error.code == "invalid_invocation"
    assert outcome.error.message == (
        "an estimated 6001 input exceeds the burst of resource.llm.itpm (6000): "
        "it could never be granted"
    )
    assert gates.status("acme")["resources"]["llm"]["queue_length"] == 0


def test_a_settle_after_the_lease_expired_charges_the_whole_cost() -> None:
    # What the grant charged expired with it: erring towards waiting, never a 429.
    gates = ResourceHarness({**LLM, "resource.llm.lease_s": "1"})
    lease = granted(gates.acquire("acme", "a", estimated_input_tokens=1000))
    gates.advance(1_000)
    settled = gates.settle("acme", "a", lease_id=lease, input_tokens=1000)
    assert settled.params["held"] is False and settled.params["charged"] == {"input": 1000.0}
    rate = gates.status("acme")["resources"]["llm"]["rates"]["input_tokens"]
    assert rate["available"] == pytest.approx(6000 - 1000 - 1000 + 100)


def test_a_settle_naming_an_old_lease_leaves_the_entitys_new_lease_held() -> None:
    # Catches: a settle that ignores the lease id it names and settles whatever lease the
    # entity holds now (a late settle of a call would end the next call's permit).
    gates = ResourceHarness({**LLM, "resource.llm.concurrency": "1"})
    old = granted(gates.acquire("acme", "a", estimated_input_tokens=100))
    gates.settle("acme", "a", lease_id=old, input_tokens=100)
    new = granted(gates.acquire("acme", "a", estimated_input_tokens=100))
    late = gates.settle("acme", "a", lease_id=old, input_tokens=100)
    assert late.params["held"] is False and late.params["lease_id"] == old
    queued(gates.acquire("acme", "b"), "concurrency")
    assert gates.settle("acme", "a", lease_id=new).params["held"] is True


def test_a_waiters_keys_are_under_its_gates_prefix_and_go_with_its_grant() -> None:
    # Catches: a waiter's place or ticket key written or deleted under the sandbox gate's
    # prefix (it would leak here, and move or kill a sandbox waiter there).
    gates = ResourceHarness({"resource": "llm", "resource.llm.concurrency": "1"})
    granted(gates.acquire("acme", "a"))
    queued(gates.acquire("acme", "b"), "concurrency")
    namespace = account_namespace(ACCOUNT)
    waiting = ["res/llm/gate", "res/llm/t/acme/1", "res/llm/w/acme/Agent%2Fb"]
    assert gates.backend.keys(namespace) == waiting
    gates.release("acme", "a")
    granted(gates.acquire("acme", "b"))
    assert gates.backend.keys(namespace) == ["res/llm/gate"]


# -- permits and per-tenant caps


def test_concurrency_queues_the_third_and_a_settle_frees_its_permit() -> None:
    gates = ResourceHarness(LLM)
    first = granted(gates.acquire("acme", "a"))
    granted(gates.acquire("acme", "b"))
    wait = queued(gates.acquire("acme", "c"), "concurrency")
    assert (wait["position"], wait["in_use"], wait["limit"]) == (1, 2, 2)
    gates.advance(1_000)
    again = gates.acquire("acme", "a")  # the holder asking again keeps its permit, renewed
    assert granted(again) == first and again.params["renewed"] is True
    lease_ms = read_config(LLM).resources["llm"].lease_ms
    assert again.params["expires_at_ms"] == gates.clock.now_ms() + lease_ms
    assert again.params["queued_ms"] == 0
    gates.settle("acme", "a", input_tokens=10, output_tokens=5)
    gates.advance(500)
    late = gates.acquire("acme", "c")
    granted(late)
    assert late.params["queued_ms"] == 1_500


def test_a_tenant_cap_lets_another_tenant_overtake() -> None:
    # Catches: a per-tenant cap that blocks the whole queue behind the capped tenant.
    gates = ResourceHarness(
        {"resource": "llm", "resource.llm.concurrency": "3", "resource.llm.tenant_concurrency": "1"}
    )
    granted(gates.acquire("acme", "a"))
    wait = queued(gates.acquire("acme", "b"), "tenant_concurrency")
    assert (wait["in_use"], wait["limit"]) == (1, 1)
    granted(gates.acquire("globex", "x"))
    gates.release("acme", "a")
    granted(gates.acquire("acme", "b"))


def test_a_tenant_token_cap_holds_only_that_tenant() -> None:
    gates = ResourceHarness(
        {
            "resource": "llm",
            "resource.llm.itpm": "6000",
            "resource.llm.tenant_itpm": "1200",
        }
    )
    granted(gates.acquire("acme", "a", estimated_input_tokens=1200))
    queued(gates.acquire("acme", "b", estimated_input_tokens=100), "tenant_input_tokens")
    granted(gates.acquire("globex", "x", estimated_input_tokens=1200))


def test_a_tenant_held_by_its_bucket_does_not_overtake_itself_in_a_walk() -> None:
    # Catches: a walk that, past a turn its tenant's bucket holds back, still hands a
    # permit to that tenant's later (cheaper) turn while another tenant asks.
    gates = ResourceHarness(
        {
            "resource": "llm",
            "resource.llm.concurrency": "2",
            "resource.llm.tenant_itpm": "6000",
            "resource.llm.tenant_itpm_burst": "1000",
        }
    )
    granted(gates.acquire("acme", "x", estimated_input_tokens=900))  # acme has 100 left
    granted(gates.acquire("initech", "y"))
    queued(gates.acquire("acme", "a1", estimated_input_tokens=500), "concurrency")
    queued(gates.acquire("acme", "a2", estimated_input_tokens=10), "concurrency")
    queued(gates.acquire("globex", "g1"), "concurrency")
    queued(gates.acquire("globex", "g2"), "concurrency")
    gates.release("acme", "x")
    gates.release("initech", "y")
    # In fair order a1 (held by acme's bucket), g1, a2, g2: a2 is passed over with a1.
    granted(gates.acquire("globex", "g2"))


def test_the_head_of_the_queue_is_not_overtaken_by_a_cheaper_request() -> None:
    # Catches: a token gate that lets small requests starve a large one at the head, or
    # that tells the small one it waits for something else than the head's tokens.
    gates = ResourceHarness(
        {"resource": "llm", "resource.llm.concurrency": "5", "resource.llm.itpm": "6000"}
    )
    granted(gates.acquire("acme", "a", estimated_input_tokens=5000))
    queued(gates.acquire("acme", "big", estimated_input_tokens=3000), "input_tokens")
    queued(gates.acquire("globex", "small", estimated_input_tokens=500), "input_tokens")
    gates.advance(20_000)  # 2000 back: enough for the small one, not yet for the head
    queued(gates.acquire("globex", "small", estimated_input_tokens=500), "input_tokens")
    gates.advance(1_000)
    granted(gates.acquire("acme", "big", estimated_input_tokens=3000))


@pytest.mark.parametrize("asked_between", [False, True])
def test_permits_freed_while_the_queue_slept_go_to_the_turns_ahead_first(
    asked_between: bool,
) -> None:
    # Catches: a walk that counts a turn ahead as taking more than its one permit; and
    # (c asking between the releases, so the first two permits are promised to a and b)
    # a walk that stops at the first promised turn met again in fair order.
    gates = ResourceHarness({"resource": "llm", "resource.llm.concurrency": "3"})
    holders = ["h1", "h2", "h3"]
    for holder in holders:
        granted(gates.acquire("acme", holder))
    for tenant, waiter in [("t1", "a"), ("t2", "b"), ("t3", "c")]:
        queued(gates.acquire(tenant, waiter), "concurrency")
    for holder in holders:
        if asked_between and holder == "h3":
            queued(gates.acquire("t3", "c"), "concurrency")
        gates.release("acme", holder)
    # a and b have not asked again, but the permits ahead of c are theirs: one each.
    granted(gates.acquire("t3", "c"))


@pytest.mark.parametrize(("cap", "third"), [(2, "ResourceQueued"), (3, "ResourceGranted")])
def test_a_tenant_cap_counts_each_of_its_turns_ahead_once(cap: int, third: str) -> None:
    # Catches: a walk that loses count of the permits its tenant's earlier turns take.
    gates = ResourceHarness(
        {
            "resource": "llm",
            "resource.llm.concurrency": "10",
            "resource.llm.tenant_concurrency": str(cap),
        }
    )
    holders = [f"h{i}" for i in range(cap)]
    for holder in holders:
        granted(gates.acquire("acme", holder))
    for waiter in ("a", "b", "c"):
        queued(gates.acquire("acme", waiter), "tenant_concurrency")
    for holder in holders:
        gates.release("acme", holder)
    # a and b go first: c fits only under a cap of three.
    answer = gates.acquire("acme", "c")
    assert answer.action == third
    if third == "ResourceQueued":
        # No limit holds c back but the permits a and b may still claim: no wait known.
        assert answer.params["eta_ms"] == 0


def test_the_margins_of_turns_ahead_are_reserved_for_the_turns_behind() -> None:
    # Catches: a walk that gives back, rather than reserves, the margin of a turn ahead.
    config = {**LLM, "resource.llm.itpm_burst": "2000"}
    gates = ResourceHarness(config)
    granted(gates.acquire("acme", "h1", estimated_input_tokens=1400))
    granted(gates.acquire("acme", "h2"))
    demand = {"estimated_input_tokens": 100, "max_input_tokens": 700}
    queued(gates.acquire("t1", "a", **demand), "concurrency")
    queued(gates.acquire("t2", "c", **demand), "concurrency")
    gates.release("acme", "h1")
    gates.release("acme", "h2")
    # 600 left: a's 100 fits; then c's 100 with a's margin of 600 reserved does not.
    queued(gates.acquire("t2", "c", **demand), "input_tokens")
    granted(gates.acquire("t1", "a", **demand))


def test_a_waiter_that_keeps_asking_keeps_its_place() -> None:
    gates = ResourceHarness({"resource": "llm", "resource.llm.concurrency": "1"})
    granted(gates.acquire("acme", "holder"))
    for entity in ("w1", "w2", "w3"):
        queued(gates.acquire("acme", entity), "concurrency")
    assert queued(gates.acquire("acme", "w2"), "concurrency")["position"] == 2
    assert queued(gates.acquire("acme", "w2"), "concurrency")["position"] == 2


@pytest.mark.parametrize("scope", ["", "tenant_"])
def test_a_lowered_limit_waits_for_every_lease_held_beyond_it(scope: str) -> None:
    # Catches: an ETA that ignores the leases held beyond a lowered limit (the waiter would
    # be told to come back when the first lease ends, while the gate is still over it).
    key = f"resource.llm.{scope}concurrency"
    limits = {"resource.llm.concurrency": "10", key: "3", "resource.llm.lease_s": "60"}
    gates = ResourceHarness({"resource": "llm", **limits})
    for entity in ("a", "b", "c"):
        granted(gates.acquire("acme", entity))
        gates.advance(10_000)
    gates.config[key] = "1"
    wait = queued(gates.acquire("acme", "w"), f"{scope}concurrency")
    # The leases end at 60, 70 and 80 s and it is 30 s: one of one is free after the third.
    assert (wait["in_use"], wait["limit"], wait["eta_ms"]) == (3, 1, 50_000)


def test_a_permit_promised_to_a_turn_stays_its_own_when_a_turn_before_it_can_go() -> None:
    # Catches: a walk that forgets the promises and hands the permit to whoever is first
    # in fair order now (here a turn its tenant's bucket held back when the permit freed).
    gates = ResourceHarness(
        {
            "resource": "llm",
            "resource.llm.concurrency": "1",
            "resource.llm.tenant_itpm": "6000",  # 0.1 token per ms
            "resource.llm.tenant_itpm_burst": "1000",
        }
    )
    granted(gates.acquire("acme", "x", estimated_input_tokens=1000))
    queued(gates.acquire("acme", "a", estimated_input_tokens=500), "concurrency")
    queued(gates.acquire("globex", "g"), "concurrency")
    queued(gates.acquire("initech", "w"), "concurrency")
    gates.release("acme", "x")
    # acme's bucket holds a back: the permit is promised to g, next in fair order.
    queued(gates.acquire("initech", "w"), "concurrency")
    gates.advance(5_000)  # a fits acme's bucket again, but the permit is g's
    queued(gates.acquire("acme", "a", estimated_input_tokens=500), "concurrency")
    granted(gates.acquire("globex", "g"))


def test_a_waiter_beyond_the_lookahead_waits_and_polls_no_sooner_than_poll_min() -> None:
    # Catches: a walk that looks further than LOOKAHEAD turns (each costs a read), and a
    # waiter whose exact wait is 0 told to come back in 1 ms (it would poll in a loop).
    gates = ResourceHarness({"resource": "llm", "resource.llm.itpm": "6000"})
    granted(gates.acquire("acme", "holder", estimated_input_tokens=6000))
    ahead = [f"w{i}" for i in range(LOOKAHEAD)]
    for waiter in [*ahead, "last"]:
        queued(gates.acquire("acme", waiter, estimated_input_tokens=1), "input_tokens")
    gates.advance(1_000)  # 100 tokens back: enough for every one of them
    wait = queued(gates.acquire("acme", "last", estimated_input_tokens=1), "input_tokens")
    assert (wait["position"], wait["eta_ms"], wait["retry_after_ms"]) == (LOOKAHEAD + 1, 0, 200)


# -- what a queued waiter is told


def held_ten_seconds(limit: str) -> ResourceHarness:
    """A gate of one permit (`limit`, 10-minute leases) whose one observed hold took 10 s."""
    lease = {"resource.llm.lease_s": "600"}
    gates = ResourceHarness({"resource": "llm", f"resource.llm.{limit}": "1", **lease})
    granted(gates.acquire("acme", "a"))
    gates.advance(10_000)
    gates.release("acme", "a")
    return gates


def test_a_permit_is_expected_back_after_the_observed_hold_then_every_hold() -> None:
    # Catches: concurrency waits that ignore the observed hold time (or use it for the
    # first wave only), or miscount the permits free.
    gates = held_ten_seconds("concurrency")
    granted(gates.acquire("acme", "b"))
    gates.advance(1_000)
    first = queued(gates.acquire("acme", "c"), "concurrency")
    second = queued(gates.acquire("acme", "d"), "concurrency")
    assert (first["eta_ms"], second["eta_ms"]) == (9_000, 19_000)


def test_a_tenant_permit_is_expected_back_when_its_own_lease_should_end() -> None:
    # Catches: a tenant's wait read from other tenants' leases, from their expiry rather
    # than the observed hold, or for the wrong one of its own permits.
    gates = held_ten_seconds("tenant_concurrency")
    granted(gates.acquire("globex", "x"))
    gates.advance(2_000)
    granted(gates.acquire("acme", "b"))
    gates.advance(1_000)
    wait = queued(gates.acquire("acme", "c"), "tenant_concurrency")
    assert (wait["eta_ms"], wait["in_use"], wait["limit"]) == (9_000, 1, 1)


@pytest.mark.parametrize(("scope", "ahead"), [("", "globex"), ("tenant_", "acme")])
def test_a_token_wait_counts_the_turns_ahead_that_go_first(scope: str, ahead: str) -> None:
    # Catches: a token wait that leaves out the cost of the turns ahead (of every tenant
    # for the account's bucket, of its own for a tenant's), misreads the tokens in use, or
    # counts the permits free as still to wait for.
    gates = ResourceHarness(
        {
            "resource": "llm",
            "resource.llm.concurrency": "2",
            f"resource.llm.{scope}itpm": "6000",  # 0.1 token per ms
            f"resource.llm.{scope}itpm_burst": "1000",
        }
    )
    granted(gates.acquire("acme", "h1"))
    granted(gates.acquire("acme", "h2"))
    queued(gates.acquire(ahead, "a", estimated_input_tokens=700), "concurrency")
    queued(gates.acquire("acme", "c", estimated_input_tokens=310), "concurrency")
    gates.advance(1_000)  # a hold of 1 s observed: a permit would take that long to free
    gates.release("acme", "h1")
    gates.release("acme", "h2")
    # Both permits are free and the bucket is full; a's 700 go first, and c's 310 are
    # 10 tokens short: 100 ms.
    wait = queued(gates.acquire("acme", "c", estimated_input_tokens=310), f"{scope}input_tokens")
    assert (wait["eta_ms"], wait["in_use"], wait["limit"]) == (100, 0, 1000)
    # The bucket's own refill is exact: no poll_min floor.
    assert wait["retry_after_ms"] == 100


def test_a_token_wait_adds_the_margins_in_flight_and_is_then_no_longer_exact() -> None:
    # Catches: a wait that takes the reserve off rather than adding it, and one told as
    # exact (polled to the millisecond) while the reserve only returns as calls settle.
    gates = ResourceHarness(
        {"resource": "llm", "resource.llm.itpm": "6000", "resource.llm.itpm_burst": "2000"}
    )
    granted(gates.acquire("acme", "h1", estimated_input_tokens=100, max_input_tokens=102))
    granted(gates.acquire("acme", "h2", estimated_input_tokens=100, max_input_tokens=101))
    # 1800 left; beside c's 1800, the margins in flight but the largest: 1 token, 10 ms.
    wait = queued(gates.acquire("acme", "c", estimated_input_tokens=1800), "input_tokens")
    assert (wait["eta_ms"], wait["retry_after_ms"]) == (10, 200)


# -- the provider's answers


def rfc3339(epoch_ms: int) -> str:
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)
    return moment.isoformat().replace("+00:00", "Z")


def test_a_429_with_retry_after_pauses_every_tenant_of_the_account() -> None:
    gates = ResourceHarness(LLM)
    granted(gates.acquire("acme", "a"))
    settled = gates.settle("acme", "a", status=429, headers={"Retry-After": "12"})
    assert settled.params["answer"] == "rate_limited" and settled.params["cooling_ms"] == 12_000
    wait = queued(gates.acquire("globex", "x"), "backoff")
    assert wait["retry_after_ms"] >= 12_000 and wait["eta_ms"] == 12_000
    gates.advance(11_999)
    queued(gates.acquire("globex", "x"), "backoff")  # its last millisecond still pauses
    gates.advance(1)
    granted(gates.acquire("globex", "x"))


def test_the_first_waiter_of_a_new_gate_keeps_ticket_0_through_a_cooldown() -> None:
    # Catches: a stored place that reads ticket 0 as no ticket: the first waiter of a gate
    # paused before its first grant would take a new ticket behind later waiters.
    gates = ResourceHarness({"resource": "llm", "resource.llm.concurrency": "1"})
    gates.settle("acme", "z", status=429, headers={"retry-after": "1"})  # no lease held
    queued(gates.acquire("acme", "a"), "backoff")  # ticket 0
    queued(gates.acquire("acme", "b"), "backoff")
    gates.advance(1_000)
    granted(gates.acquire("acme", "a"))


def test_a_429_without_retry_after_waits_for_the_exhausted_limits_reset() -> None:
    now = 1_700_000_000_000
    headers = {
        "anthropic-ratelimit-requests-remaining": "3",
        "anthropic-ratelimit-requests-reset": rfc3339(now + 2_000),
        "anthropic-ratelimit-output-tokens-remaining": "0",
        "anthropic-ratelimit-output-tokens-reset": rfc3339(now + 9_000),
    }
    assert pause_from_headers(429, headers, now) == 9_000
    # None exhausted: the earliest reset still ahead.
    headers["anthropic-ratelimit-output-tokens-remaining"] = "5"
    assert pause_from_headers(429, headers, now) == 2_000
    assert pause_from_headers(429, {"retry-after": "junk"}, now) is None
    assert pause_from_headers(529, {"retry-after": "3"}, now) == 3_000
    # A reset due now is not ahead: the exhausted limit no longer holds anyone back.
    headers["anthropic-ratelimit-requests-reset"] = rfc3339(now)
    headers["anthropic-ratelimit-requests-remaining"] = "0"
    assert pause_from_headers(429, headers, now) == 9_000
    # A reset without a time zone names no moment.
    naive = {"anthropic-ratelimit-tokens-reset": rfc3339(now + 4_000).removesuffix("Z")}
    assert (
        pause_from_headers(429, {**naive, "anthropic-ratelimit-tokens-remaining": "0"}, now) is None
    )


@pytest.mark.parametrize(
    ("retry_after", "pause_ms"),
    [
        ("0", 0),
        ("0.5", 500),
        ("-5", None),
        ("inf", None),
        ("nan", None),
        ("Tue, 14 Nov 2023 22:13:25 GMT", 5_000),  # an HTTP date, 5 s after now
        ("Tue, 14 Nov 2023 22:13:10 GMT", 0),  # a date gone by: no pause
        ("Tue, 14 Nov 2023 22:13:25 -0000", None),  # no time zone: no moment
        ("Sat, 01 Jan 2033 00:00:00 GMT", 24 * 3600 * 1000),  # years ahead: capped at a day
    ],
)
def test_retry_after_is_read_as_seconds_or_as_an_http_date(
    retry_after: str, pause_ms: int | None
) -> None:
    # Catches: a negative or infinite number of seconds taken as a pause, a zero or a
    # fraction of a second ignored, and an HTTP date not read (or read without its zone).
    now = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC
    assert pause_from_headers(503, {"retry-after": retry_after}, now) == pause_ms


def test_a_529_overloaded_backs_off_exponentially_when_it_says_nothing() -> None:
    gates = ResourceHarness({**LLM, "backoff_base_ms": "1000", "backoff_cap_ms": "1000"})
    granted(gates.acquire("acme", "a"))
    settled = gates.settle("acme", "a", status=529)
    assert settled.params["answer"] == "overloaded"
    cooling = settled.params["cooling_ms"]
    assert 0 <= cooling <= 1000
    status = gates.status("acme")["resources"]["llm"]["backoff"]
    assert status["failures"] == 1 and status["cooling_ms"] == cooling
    gates.settle("acme", "a", status=200)  # a success resets the failure count
    assert gates.status("acme")["resources"]["llm"]["backoff"]["failures"] == 0


def test_each_resource_answer_is_told_as_a_progress_event_naming_its_waiter() -> None:
    # Catches: an event that loses its name, tenant or entity, and a refusal told under
    # another name or without its code.
    config = {**LLM, "resource.llm.concurrency": "1", "resource.llm.queue_timeout_s": "10"}
    gates = ResourceHarness(config)
    granted(gates.acquire("acme", "a"))
    queued(gates.acquire("acme", "b"), "concurrency")
    gates.advance(10_000)
    refused = gates.acquire("acme", "b")
    assert refused.error is not None and refused.error.code == "queue_timeout"
    gates.release("acme", "a")
    told = [(e["event"], e["tenant"], e["entity"], e.get("code")) for e in gates.telemetry.events]
    assert told == [
        ("resource_granted", "acme", "Agent/a", None),
        ("resource_queued", "acme", "Agent/b", None),
        ("resource_rejected", "acme", "Agent/b", "queue_timeout"),
        ("resource_released", "acme", "Agent/a", None),
    ]
    assert all(event["resource"] == "llm" for event in gates.telemetry.events)


class GateUnreadable(InterposedBackend):
    """Storage where the llm gate's document cannot be read."""

    def before(self, operation: str, key: str) -> None:
        if key == "res/llm/gate":
            raise StorageUnavailable("the llm gate is unreadable")


def test_a_status_shows_why_a_gate_is_unreadable_and_still_shows_the_others() -> None:
    # Catches: an unreadable gate shown without the storage error, or hiding the gates
    # listed after it.
    gates = ResourceHarness(
        {"resource": "llm", "resource.llm.rpm": "60", "resource.sessions.concurrency": "2"}
    )
    gates.backend = GateUnreadable(gates.backend)
    resources = gates.status("acme")["resources"]
    assert list(resources) == ["llm", "sessions"]
    assert resources["llm"] == {"error": "storage", "message": "the llm gate is unreadable"}
    assert resources["sessions"]["concurrency"] == {"in_use": 0, "limit": 2}


# -- session slots


def test_a_burst_of_sessions_queues_at_the_tenant_slot_cap_and_drains_in_order() -> None:
    gates = ResourceHarness({"resource": "sessions", "resource.sessions.tenant_concurrency": "2"})
    sessions = [f"job-{i}" for i in range(6)]
    answers = [gates.acquire("acme", job) for job in sessions]
    assert [a.action for a in answers] == ["ResourceGranted"] * 2 + ["ResourceQueued"] * 4
    assert [a.params.get("position") for a in answers[2:]] == [1, 2, 3, 4]
    finished = []
    for _ in range(3):
        for job in sessions[:2]:
            gates.release("acme", job)
            finished.append(job)
        sessions = sessions[2:]
        started = [
            job for job in sessions if gates.acquire("acme", job).action == "ResourceGranted"
        ]
        assert started == sessions[:2]
    assert finished == [f"job-{i}" for i in range(6)] and sessions == []


def test_release_without_a_resource_still_releases_the_sandbox() -> None:
    gates = ResourceHarness(LLM)
    granted(gates.acquire("acme", "a"))
    outcome = gates.call("release", "acme", "a", resource="")
    assert outcome.action == "SandboxReleased", outcome
    assert gates.status("acme")["resources"]["llm"]["concurrency"]["in_use"] == 1


# -- bad config and params


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"resource.llm.concurrency": "0"}, "resource.llm.concurrency"),
        ({"resource.llm.concurrency": "1.5"}, "integer"),
        ({"resource.llm.rpm": "nan"}, "resource.llm.rpm"),
        ({"resource.llm.itpm": "-1"}, "resource.llm.itpm"),
        ({"resource.llm.itpm": "1e12"}, "at most"),
        ({"resource.llm.itpm": "100", "resource.llm.itpm_burst": "0.5"}, "at least 1"),
        ({"resource.llm.rpmm": "5"}, "unknown limit"),
        ({"resource.LLM.rpm": "5"}, "resource.<name>.<limit>"),
        ({"resource.llm": "5"}, "resource.<name>.<limit>"),
        ({"resource.llm.otpm_burst": "5"}, "without resource.llm.otpm"),
        ({"resource.llm.lease_s": "10"}, "declares no limit"),
        (
            {"resource.llm.concurrency": "2", "resource.llm.tenant_concurrency": "3"},
            "must not exceed",
        ),
        ({"resource.llm.concurrency": "2", "resource.llm.lease_s": "0"}, "lease_s"),
    ],
)
def test_a_bad_resource_key_is_invalid_config(config: dict[str, str], fragment: str) -> None:
    with pytest.raises(ProvisionerError) as refused:
        read_config(config)
    assert refused.value.failure.code == "invalid_config"
    assert fragment in refused.value.failure.message


LONG_NAME = "a" * 50


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"resource.llm.rpm": "60"}, None),
        ({"resource.llm.rpm": "60", "resource": ""}, None),
        (
            {"resource.llm.rpm": "60", "resource.sessions.concurrency": "2", "resource": "nope"},
            "resource 'nope' is not declared by any resource.nope.<limit> key"
            " (declared: llm, sessions)",
        ),
        (
            {"resource.llm.rpm": "60", "resource": LONG_NAME},
            f"resource {LONG_NAME[:40]!r} is not declared by any resource.{LONG_NAME[:40]}"
            ".<limit> key (declared: llm)",
        ),
        (
            {"resource": "llm"},
            "resource 'llm' is not declared by any resource.llm.<limit> key (declared: none)",
        ),
    ],
)
def test_an_acquire_names_the_gate_it_lacks_and_the_gates_there_are(
    config: dict[str, str], message: str | None
) -> None:
    # Catches: a missing `resource` key read as a gate's name, and a refusal that does not
    # say which gate was asked for or which are declared.
    gates = ResourceHarness(config)
    outcome = gates.call("acquire", "acme", "a")
    assert outcome.error is not None and outcome.error.code == "invalid_config", outcome
    expected = message or "operation needs the config key resource (a gate name)"
    assert outcome.error.message == expected


@pytest.mark.parametrize("operation", ["acquire", "settle", "release", "status", "provision"])
def test_a_bad_resource_key_refuses_every_operation_and_stores_nothing(operation: str) -> None:
    gates = ResourceHarness({**LLM, "resource.llm.rpm": "zero"})
    outcome = gates.call(operation, "acme", "a")
    assert outcome.error is not None and outcome.error.code == "invalid_config", outcome
    fixed = gates.call("status", "acme", "a", None, **{"resource.llm.rpm": "60"}).params
    gate = fixed["resources"]["llm"]
    assert gate["grants"] == 0 and gate["queue_length"] == 0 and fixed["entity"] is None


@pytest.mark.parametrize(
    ("operation", "params", "config", "code", "start"),
    [
        ("acquire", {}, {"resource": "nope"}, "invalid_config", "resource 'nope' is not declared"),
        (
            "acquire",
            {},
            {"resource": ""},
            "invalid_config",
            "operation needs the config key resource",
        ),
        (
            "settle",
            {},
            {"resource": " "},
            "invalid_config",
            "operation needs the config key resource",
        ),
        (
            "acquire",
            {"estimated_input_tokens": -1},
            {},
            "invalid_invocation",
            "estimated_input_tokens must",
        ),
        (
            "acquire",
            {"estimated_input_tokens": True},
            {},
            "invalid_invocation",
            "estimated_input_tokens",
        ),
        (
            "acquire",
            {"estimated_output_tokens": "many"},
            {},
            "invalid_invocation",
            "estimated_output",
        ),
        (
            "settle",
            {"status": 42},
            {},
            "invalid_invocation",
            "trigger param status must be the provider's HTTP status (100-599)",
        ),
        ("settle", {"status": 99}, {}, "invalid_invocation", "trigger param status"),
        ("settle", {"status": 600}, {}, "invalid_invocation", "trigger param status"),
        (
            "settle",
            {"headers": ["retry-after", "1"]},
            {},
            "invalid_invocation",
            "trigger param headers must be an object",
        ),
        (
            "settle",
            {"lease_id": 7},
            {},
            "invalid_invocation",
            "trigger param lease_id must be the lease id ResourceGranted gave",
        ),
        ("settle", {"lease_id": "r" * 65}, {}, "invalid_invocation", "trigger param lease_id"),
        ("settle", {"input_tokens": 1.5}, {}, "invalid_invocation", "input_tokens must be"),
    ],
)
def test_bad_params_are_typed_failures(
    operation: str, params: dict[str, object], config: dict[str, str], code: str, start: str
) -> None:
    gates = ResourceHarness(LLM)
    outcome = gates.call(operation, "acme", "a", params, **config)
    # A guest failure is a Temper success whose action is SandboxFailed (result.rs keeps
    # its params only then); `error` carries the typed failure.
    assert outcome.action == "SandboxFailed" and outcome.error is not None, outcome
    assert outcome.error.code == code, outcome
    assert outcome.error.message.startswith(start), outcome
    assert gates.status("acme")["resources"]["llm"]["grants"] == 0


@pytest.mark.parametrize(
    ("params", "status"),
    [({}, 200), ({"status": 100}, 100), ({"status": "599"}, 599), ({"lease_id": "r" * 64}, 200)],
)
def test_a_settle_takes_every_http_status_and_a_lease_id_of_up_to_64_characters(
    params: dict[str, object], status: int
) -> None:
    # Catches: the status range or the lease id's length bound off by one, and a settle
    # that says nothing reporting another status than 200.
    gates = ResourceHarness(LLM)
    granted(gates.acquire("acme", "a"))
    settled = gates.settle("acme", "a", **params)
    assert settled.action == "ResourceSettled", settled
    assert settled.params["status"] == status


def test_the_inspection_view_shows_leases_debt_cooldown_and_waiters() -> None:
    from provisioner.ports import Scope
    from tests.guest.resource_harness import inspect_resources

    config = {**LLM, "resource.llm.tenant_itpm": "6000", "resource.llm.concurrency": "1"}
    gates = ResourceHarness(config)
    lease = granted(gates.acquire("acme", "a", estimated_input_tokens=400))
    queued(gates.acquire("globex", "x", estimated_input_tokens=300), "concurrency")
    storage = gates.ports("acme").storage
    gate = inspect_resources(gates.ports("acme"), read_config(config).resources)["llm"]
    assert [(v.lease_id, v.entity) for v in gate.state.leases] == [(lease, "Agent/a")]
    assert {c.bucket: c.tokens for c in gate.state.leases[0].charges}["input"] == 400
    assert [(w.tenant, w.entity, w.costs) for w in gate.waiters] == [
        ("globex", "Agent/x", {"requests": 1.0, "input": 300.0, "output": 0.0})
    ]
    gates.settle("acme", "a", input_tokens=6500, status=429, headers={"retry-after": "2"})
    after = inspect_resources(gates.ports("acme"), read_config(config).resources)["llm"]
    account = after.bucket("input_tokens")
    own = after.bucket("tenant_input_tokens", "acme")
    assert account is not None and account.debt == pytest.approx(500)
    assert own is not None and own.debt == pytest.approx(500)
    assert (
        not after.state.leases and after.backoff.cooling_ms == 2_000 and after.backoff.failures == 1
    )
    assert after.version is not None and after.version != gate.version
    # Reading wrote nothing.
    assert storage.get(Scope.ACCOUNT, "res/llm/gate") is not None
    again = inspect_resources(gates.ports("acme"), read_config(config).resources)["llm"]
    assert again.version == after.version


def test_a_spec_can_rename_the_answers_and_keep_the_estimate_in_its_state() -> None:
    import json

    from provisioner.app import run
    from provisioner.model import Invocation, Outcome

    gates = ResourceHarness(
        {"resource": "llm", "resource.llm.itpm": "600", "resource.llm.concurrency": "1"}
    )
    config = {**gates.config, "operation": "acquire"}
    config.update(granted_action="LlmPermitGranted", queued_action="LlmPermitQueued")

    def acquire(entity: str, state: dict[str, object]) -> Outcome:
        invocation = Invocation(
            "acme", "Agent", entity, "T", "{}", json.dumps(state), tuple(config.items()), None, "t"
        )
        return run(invocation, gates.ports("acme"))

    first = acquire("a", {"estimated_input_tokens": "500"})
    assert first.action == "LlmPermitGranted", first
    second = acquire("b", {"estimated_input_tokens": 200})
    assert second.action == "LlmPermitQueued", second
    gates.settle("acme", "a")  # no counts: the estimate of 500 stands
    # 100 left of 600: the estimate read from the state is what is waited for.
    assert acquire("b", {"estimated_input_tokens": 200}).params["reason"] == "input_tokens"
    config["granted_action"] = "not an action " * 4  # told as its first 40 characters
    refused = acquire("c", {})
    assert refused.error is not None and refused.error.code == "invalid_config"
    rule = "an action name (a capital letter, then up to 63 letters, digits or _)"
    told = repr(("not an action " * 4)[:40])
    assert refused.error.message == f"granted_action must be {rule}, got {told}"
