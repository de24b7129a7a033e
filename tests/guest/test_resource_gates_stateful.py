"""Hypothesis state machine over acquire / settle / release of a resource gate from many
entities of several tenants, with the provider's answers (success, 429 with its headers,
529), holders that vanish (their leases expire on the virtual clock) and time passing.

A model records every grant with its estimated and (once settled) actual cost, and checks
the gate's promises after every step:
- permits: the live leases (granted, neither settled nor released, not expired) never
  exceed `concurrency`, nor `tenant_concurrency` for any tenant;
- tokens: for every bucket, over every window [a, b] between two grants, the actual costs
  of the requests granted in it stay within `rate * (b - a) + burst` plus ONE request's
  estimation error (actual above estimate): the largest among the requests still
  unsettled right after the window's last grant (`gates.blocking` states the rule
  that makes it so, and why). Requests declare a worst case (`max_input_tokens`,
  `max_output_tokens`) above their estimate or none, and their actuals stay within it,
  anywhere from nothing to the worst case;
- and at the end every entity that keeps asking is granted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tests.guest.resource_harness import ResourceHarness

TENANTS = ("tenant-a", "tenant-b", "tenant-c")
ENTITIES = tuple((t, f"{t}-{i}") for t in TENANTS for i in range(2))
KINDS = ("requests", "input", "output")
# Where a call's actual lies: a fraction of its estimate (0 to 1), or between the estimate
# and its declared worst case (1 to 2).
USED = (0.0, 0.5, 1.0, 1.5, 2.0)

CONFIGS: tuple[dict[str, str], ...] = (
    {
        "resource": "llm",
        "resource.llm.concurrency": "3",
        "resource.llm.rpm": "30",
        "resource.llm.rpm_burst": "3",
        "resource.llm.itpm": "6000",
        "resource.llm.itpm_burst": "2000",
        "resource.llm.otpm": "1200",
        "resource.llm.otpm_burst": "600",
        "resource.llm.lease_s": "30",
    },
    {
        "resource": "llm",
        "resource.llm.concurrency": "4",
        "resource.llm.tenant_concurrency": "2",
        "resource.llm.itpm": "3000",
        "resource.llm.itpm_burst": "1500",
        "resource.llm.tenant_itpm": "2000",
        "resource.llm.tenant_itpm_burst": "1000",
        "resource.llm.otpm": "600",
        "resource.llm.lease_s": "5",
    },
)
SHARED = {
    "waiter_ttl_s": "3",
    "queue_timeout_s": "600",
    "backoff_base_ms": "100",
    "backoff_cap_ms": "2000",
    "poll_max_ms": "2000",
}


@dataclass
class Call:
    """One grant as the model sees it."""

    seq: int
    granted_ms: int
    tenant: str
    lease_id: str
    expires_ms: int
    estimate: dict[str, float]
    worst: dict[str, float]
    actual: dict[str, float] = field(default_factory=dict)
    settled_seq: int | None = None
    done: bool = False

    def cost(self, kind: str) -> float:
        return self.actual.get(kind, self.estimate[kind])

    def error(self, kind: str) -> float:
        return max(0.0, self.cost(kind) - self.estimate[kind])

    def used(self, kind: str, at: float) -> int:
        """What the call used: `at` of its estimate up to 1, then above it up to its
        worst case (2: the worst case)."""
        estimate, worst = self.estimate[kind], self.worst[kind]
        if at <= 1:
            return int(estimate * at)
        return int(estimate + (worst - estimate) * (at - 1))


def rfc3339(epoch_ms: int) -> str:
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def rate_of(config: dict[str, str], key: str) -> tuple[float, float] | None:
    """(tokens per ms, burst) of `resource.llm.<key>`, or None when not set."""
    raw = config.get(f"resource.llm.{key}")
    if raw is None:
        return None
    per_minute = float(raw)
    return per_minute / 60_000.0, float(config.get(f"resource.llm.{key}_burst", raw))


class ResourceGateMachine(RuleBasedStateMachine):
    @initialize(which=st.sampled_from(range(len(CONFIGS))), seed=st.integers(0, 2**16))
    def start(self, which: int, seed: int) -> None:
        self.config = {**CONFIGS[which], **SHARED}
        self.harness = ResourceHarness(self.config, seed=seed)
        self.calls: list[Call] = []
        self.current: dict[tuple[str, str], Call] = {}
        self.wanting: set[tuple[str, str]] = set()
        self.seq = 0

    def now(self) -> int:
        return self.harness.clock.now_ms()

    def tick(self) -> int:
        self.seq += 1
        return self.seq

    def live(self, tenant: str | None = None) -> list[Call]:
        return [
            c
            for c in self.current.values()
            if not c.done and c.expires_ms > self.now() and tenant in (None, c.tenant)
        ]

    # -- rules

    @rule(
        who=st.sampled_from(ENTITIES),
        estimated_input=st.sampled_from([0, 100, 400, 900, 1000]),
        estimated_output=st.sampled_from([0, 50, 300]),
        input_margin=st.sampled_from([None, 0, 150, 500, 1200]),
        output_margin=st.sampled_from([None, 0, 250, 700]),
    )
    def acquire(
        self,
        who: tuple[str, str],
        estimated_input: int,
        estimated_output: int,
        input_margin: int | None = None,
        output_margin: int | None = None,
    ) -> None:
        tenant, entity = who
        asked: dict[str, int] = {
            "estimated_input_tokens": estimated_input,
            "estimated_output_tokens": estimated_output,
        }
        if input_margin is not None:
            asked["max_input_tokens"] = estimated_input + input_margin
        if output_margin is not None:
            asked["max_output_tokens"] = estimated_output + output_margin
        outcome = self.harness.acquire(tenant, entity, **asked)
        held = self.current.get(who)
        holding = held is not None and not held.done and held.expires_ms > self.now()
        if outcome.action == "ResourceGranted":
            params = outcome.params
            if holding:
                assert held is not None
                assert params["renewed"] and params["lease_id"] == held.lease_id, outcome
                held.expires_ms = params["expires_at_ms"]
                return
            assert not params["renewed"], outcome
            call = Call(
                seq=self.tick(),
                granted_ms=self.now(),
                tenant=tenant,
                lease_id=params["lease_id"],
                expires_ms=params["expires_at_ms"],
                estimate={
                    "requests": 1.0,
                    "input": float(estimated_input),
                    "output": float(estimated_output),
                },
                worst={
                    "requests": 1.0,
                    "input": float(asked.get("max_input_tokens", estimated_input)),
                    "output": float(asked.get("max_output_tokens", estimated_output)),
                },
            )
            self.calls.append(call)
            self.current[who] = call
            self.wanting.discard(who)
            return
        assert not holding, f"{entity} holds a live lease yet was answered {outcome}"
        if outcome.action == "ResourceQueued":
            assert outcome.success and outcome.params["resource"] == "llm"
            assert outcome.params["reason"] != "storage", "the memory backend does not fail"
            assert outcome.params["position"] >= 1
            assert outcome.params["retry_after_ms"] >= 1
            self.wanting.add(who)
            return
        assert outcome.error is not None and outcome.error.code == "queue_timeout", outcome
        self.wanting.discard(who)

    @rule(
        estimated_input=st.sampled_from([100, 400, 900]),
        input_margin=st.sampled_from([None, 500, 1200]),
        output_margin=st.sampled_from([None, 250, 700]),
    )
    def herd(
        self, estimated_input: int, input_margin: int | None, output_margin: int | None
    ) -> None:
        """Every entity asks at the same instant with the same demand (many invocations)."""
        for who in ENTITIES:
            self.acquire(who, estimated_input, 50, input_margin, output_margin)

    @rule(
        pick=st.integers(0, len(ENTITIES) - 1),
        input_at=st.sampled_from(USED),
        output_at=st.sampled_from(USED),
        answer=st.sampled_from(["200", "200", "429", "429-reset", "529", "no-counts"]),
    )
    def call_returns(self, pick: int, input_at: float, output_at: float, answer: str) -> None:
        """One of the entities with a call out (live lease or not) settles it."""
        out = sorted(who for who, call in self.current.items() if not call.done)
        if out:
            self.settle(out[pick % len(out)], input_at, output_at, answer)

    def settle(self, who: tuple[str, str], input_at: float, output_at: float, answer: str) -> None:
        call = self.current.get(who)
        if call is None or call.done:
            return
        tenant, entity = who
        params: dict[str, object] = {"lease_id": call.lease_id}
        if answer != "no-counts":
            params["input_tokens"] = call.used("input", input_at)
            params["output_tokens"] = call.used("output", output_at)
        if answer == "429":
            params.update(status=429, headers={"retry-after": "1"})
        elif answer == "429-reset":
            params.update(
                status=429,
                headers={
                    "anthropic-ratelimit-input-tokens-remaining": "0",
                    "anthropic-ratelimit-input-tokens-reset": rfc3339(self.now() + 1_500),
                },
            )
        elif answer == "529":
            params.update(status=529)
        outcome = self.harness.settle(tenant, entity, **params)
        assert outcome.action == "ResourceSettled", outcome
        expired = call.expires_ms <= self.now()
        assert outcome.params["held"] is (not expired), (outcome, call)
        if answer != "no-counts":
            call.actual = {
                "requests": 1.0,
                "input": float(params["input_tokens"]),  # type: ignore[arg-type]
                "output": float(params["output_tokens"]),  # type: ignore[arg-type]
            }
        if answer.startswith("429"):
            # Both say how long: retry-after 1 s, or the input tokens' reset 1.5 s ahead.
            assert outcome.params["cooling_ms"] >= 1_000, outcome
        call.settled_seq = self.tick()
        call.done = True

    @rule(who=st.sampled_from(ENTITIES))
    def release(self, who: tuple[str, str]) -> None:
        tenant, entity = who
        outcome = self.harness.release(tenant, entity)
        assert outcome.action == "ResourceReleased", outcome
        call = self.current.get(who)
        live = call is not None and not call.done and call.expires_ms > self.now()
        assert outcome.params["released"] is live, (outcome, call)
        if call is not None and not call.done:
            call.done = True  # released unsettled: its estimate stays charged
        self.wanting.discard(who)

    @rule(ms=st.sampled_from([1, 50, 300, 1_000, 2_500, 6_000, 20_000]))
    def time_passes(self, ms: int) -> None:
        self.harness.advance(ms)

    # -- invariants

    @invariant()
    def permits_never_exceed_a_gate(self) -> None:
        if not hasattr(self, "harness"):
            return
        limit = int(self.config["resource.llm.concurrency"])
        assert len(self.live()) <= limit
        tenant_limit = self.config.get("resource.llm.tenant_concurrency")
        for tenant in TENANTS:
            if tenant_limit is not None:
                assert len(self.live(tenant)) <= int(tenant_limit)
            gate = self.harness.status(tenant)["resources"]["llm"]
            assert gate["concurrency"]["in_use"] == len(self.live()) <= limit

    @invariant()
    def settled_cost_stays_within_rate_and_burst(self) -> None:
        if not hasattr(self, "harness"):
            return
        for kind, key in (("requests", "rpm"), ("input", "itpm"), ("output", "otpm")):
            account = rate_of(self.config, key)
            if account is not None:
                self.check_windows(kind, self.calls, *account)
            per_tenant = rate_of(self.config, f"tenant_{key}")
            if per_tenant is not None:
                for tenant in TENANTS:
                    own = [c for c in self.calls if c.tenant == tenant]
                    self.check_windows(kind, own, *per_tenant)

    def check_windows(self, kind: str, calls: list[Call], rate: float, burst: float) -> None:
        mine = {id(c) for c in calls}
        # ONE request's estimation error: the largest among the calls checked that are
        # still unsettled right after each grant.
        one_error = [
            max(
                (
                    c.error(kind)
                    for c in self.calls
                    if id(c) in mine
                    and c.seq <= last.seq
                    and (c.settled_seq is None or c.settled_seq > last.seq)
                ),
                default=0.0,
            )
            for last in calls
        ]
        for first in range(len(calls)):
            total = 0.0
            for last in range(first, len(calls)):
                total += calls[last].cost(kind)
                if last + 1 < len(calls) and calls[last + 1].granted_ms == calls[last].granted_ms:
                    continue  # the window closes after every grant of its last instant
                span = calls[last].granted_ms - calls[first].granted_ms
                bound = rate * span + burst + one_error[last]
                assert total <= bound + 1e-6, (
                    f"{kind}: {total} granted in {span} ms, bound {bound} (rate "
                    f"{rate * 60_000}/min, burst {burst}, one request's error "
                    f"{one_error[last]})"
                )

    def teardown(self) -> None:
        if not hasattr(self, "harness"):
            return
        # Everyone still wanting a permit keeps asking; holders settle as estimated.
        for _ in range(400):
            if not self.wanting:
                break
            for who, call in list(self.current.items()):
                if not call.done:
                    self.settle(who, 1.0, 1.0, "200")
            for who in sorted(self.wanting):
                self.acquire(who, 100, 50)
            self.harness.advance(500)
        assert not self.wanting, f"never granted: {sorted(self.wanting)}"


TestResourceGateMachine = ResourceGateMachine.TestCase
