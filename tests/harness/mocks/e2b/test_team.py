"""The one model of an E2B team that the mock server and the simulator's fake share, on
a clock the test moves."""

from __future__ import annotations

from harness.mocks.e2b.config import MockE2BConfig, Storm
from harness.mocks.e2b.team import Admitted, E2BTeam, MustWait, Refused, SandboxSpec
from harness.simulator.fake_e2b import START_MS, FakeE2B
from provisioner.gates.results import CapacityExhausted, Created, RateLimited

T0 = 5_000.0


def admitted(team: E2BTeam, now_ms: float) -> Admitted:
    verdict = team.admit_create(now_ms)
    assert isinstance(verdict, Admitted), verdict
    return verdict


def test_checks_run_in_e2b_order_storm_then_rate_then_slots_then_cap() -> None:
    # Catches a reordering: a storm must refuse before the limiter spends a token, and a
    # create refused for a slot has already spent one (the limiter is the route's).
    config = MockE2BConfig(
        create_rate_per_s=1.0,
        create_burst=2,
        max_concurrent_creates=1,
        storms=(Storm(start_ms=0, end_ms=1_000),),
    )
    team = E2BTeam(config, T0)
    storm = team.admit_create(T0 + 400)
    assert storm == Refused("storm", 600)
    admitted(team, T0 + 1_000)
    busy = team.admit_create(T0 + 1_000)
    assert isinstance(busy, Refused) and busy.kind == "concurrency"
    assert busy.retry_after_ms == 1_000
    rate = team.admit_create(T0 + 1_000)
    assert isinstance(rate, Refused) and rate.kind == "rate", "the refused create spent a token"
    assert rate.retry_after_ms == 1_000
    counters = team.counters
    assert (counters.rate_limited, counters.concurrency_limited) == (2, 1)


def test_only_admitted_creates_hold_slots_and_refusals_hold_nothing() -> None:
    # Catches refused creates counted against the create slots or the cap.
    team = E2BTeam(MockE2BConfig(max_concurrent_creates=2, max_sandboxes=3), T0)
    first, second = admitted(team, T0), admitted(team, T0)
    for _ in range(3):
        assert isinstance(team.admit_create(T0), Refused)
    team.commit(T0 + 10, first.sandbox_id, SandboxSpec())
    third = admitted(team, T0 + 10)
    team.commit(T0 + 20, second.sandbox_id, SandboxSpec())
    team.abandon()  # the third create ends without a sandbox
    admitted(team, T0 + 20)
    assert team.stats(T0 + 20).capacity_in_use == 3
    assert third.sandbox_id != first.sandbox_id != second.sandbox_id


def test_foreign_sandboxes_and_lingering_kills_fill_the_cap() -> None:
    # Catches a cap that ignores other users of the account or the kill's lag.
    config = MockE2BConfig(max_sandboxes=3, foreign_sandboxes=2, kill_capacity_lag_ms=500)
    team = E2BTeam(config, T0)
    made = team.commit(T0, admitted(team, T0).sandbox_id, SandboxSpec())
    refused = team.admit_create(T0)
    assert refused == Refused("capacity", None, None, 3)
    assert team.kill(made.sandbox_id, T0 + 100)
    assert isinstance(team.admit_create(T0 + 599), Refused), "the killed slot still lingers"
    admitted(team, T0 + 600)


def test_sandboxes_expire_at_their_timeout() -> None:
    # Catches a model whose sandboxes live for ever.
    team = E2BTeam(MockE2BConfig(default_timeout_s=15), T0)
    sandbox = team.commit(T0, admitted(team, T0).sandbox_id, SandboxSpec())
    assert team.get(sandbox.sandbox_id, T0 + 14_999) is not None
    assert team.get(sandbox.sandbox_id, T0 + 15_000) is None
    assert team.counters.sandboxes_expired == 1


def test_slow_overload_mode_asks_the_caller_to_wait() -> None:
    # Catches a "slow" mock that answers 429 instead of waiting for a slot.
    team = E2BTeam(MockE2BConfig(max_concurrent_creates=1, create_overload_mode="slow"), T0)
    first = admitted(team, T0)
    assert team.admit_create(T0) == MustWait(None)
    assert not team.has_create_slot()
    team.commit(T0 + 1, first.sandbox_id, SandboxSpec())
    assert isinstance(team.admit_create(T0 + 1, after_wait=True), Admitted)


def test_the_fake_answers_from_the_team_model_on_its_virtual_clock() -> None:
    # Catches a fake that decides apart from the model: its storm, cap and timeout are the
    # model's, and its sandbox exists only once the answer has arrived.
    now = [START_MS]
    config = MockE2BConfig(
        seed=1,
        create_latency_ms=1_000,
        max_sandboxes=2,
        foreign_sandboxes=1,
        storms=(Storm(start_ms=5_000, end_ms=6_000),),
        default_timeout_s=60,
    )
    fake = FakeE2B(config, lambda: now[0])
    answer, latency = fake.begin_create(now[0], SandboxSpec(metadata=(("job", "a"),)))
    assert isinstance(answer, Created) and latency == 1_000
    assert fake.sandboxes == set()
    refused, _ = fake.begin_create(now[0])
    assert refused == CapacityExhausted(2), "the create in flight holds the last slot"
    fake.end_create(refused)
    now[0] += latency
    fake.end_create(answer)
    assert fake.sandboxes == {answer.sandbox_id}
    assert fake.listed({"job": "a"}) == [answer.sandbox_id] and fake.listed({"job": "b"}) == []
    now[0] = START_MS + 5_500
    storm, _ = fake.begin_create(now[0])
    assert storm == RateLimited(500)
    fake.end_create(storm)
    now[0] = START_MS + 61_000
    assert fake.sandboxes == set(), "the sandbox outlived its timeout"
    assert fake.answers == {"201": 1, "429_cap": 1, "429_storm": 1}
