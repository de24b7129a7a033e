"""Agent sessions that take LLM turns, in virtual time, with and without the resource gates.

The provider is the mock LLM API's own state (`harness/mocks/llm/state.py`: the tier's three
token buckets, its 429 `rate_limit_error` with `retry-after`, its counters) on the
simulation's clock, so "what the provider saw" is the mock's stats, and a run replays
exactly from its seed. Two ways to run the same jobs:

- **gated**: the example spec `llm_gated_agent.ioa.toml` under the session executor
  (Temper's rules, `executor.py`): Submit acquires a session slot, every turn acquires an
  `llm` permit, calls the provider and settles the permit with the tokens used and the
  provider's answer. Module `sandbox_provisioner` is the guest itself, run natively
  (`provisioner.app.run`) over in-memory storage on the virtual clock; module
  `llm_caller` is `VirtualLlmCaller`, which calls the provider.
- **ungated**: every session calls the provider at once, turn after turn, with the
  `anthropic` SDK's retry policy (2 retries, `retry-after` honoured up to 60 s, else
  0.5 s doubling to 8 s with jitter; anthropic-sdk-python `_base_client.py`
  `_calculate_retry_timeout`); a call still refused after its retries fails the session,
  as an agent whose LLM call raised does.

Throughput: the provider's admitted input tokens per minute over the window in which some
session waits at the LLM gate (gated) or for a retry (ungated), against the tier's input
token rate; the ideal makespan is the total input tokens over that rate.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.mocks.llm.config import TIERS, MockLLMConfig
from harness.mocks.llm.limits import TokenBucket
from harness.mocks.llm.state import MockLLMState
from harness.mocks.llm.stats import RequestRecord
from harness.mocks.llm.wire import MessagesRequest
from harness.simulator.contract import require_clean
from harness.simulator.detsim import ACCOUNT, VirtualLoop, _NoHttp
from harness.simulator.executor import Entity, Executor, Secrets
from harness.simulator.fake_e2b import START_MS
from harness.simulator.model import Job
from harness.simulator.runner import RunResult, RunSettings, SessionRunner, SessionScript
from harness.simulator.simulated_ports import EventLog, SeededRandom, VirtualClock
from harness.simulator.spec import Spec, Trigger, packaged_spec
from host.runtime.native import native_ports
from host.storage.memory import MemoryBackend
from provisioner.app import run as run_guest
from provisioner.model import Invocation, Outcome

API_KEY = "sk-ant-sim"
MODEL = "claude-sonnet-4-5"
GATED = "gated"
UNGATED = "ungated"
LLM_MODES = (UNGATED, GATED)
SPEC_NAME = "llm_gated_agent.ioa.toml"
# The gate's limits in the spec are tier 1's; a run on another tier sets them to its own.
_GATE_RATES = ("rpm", "itpm", "otpm")


@dataclass(frozen=True)
class LlmScenario:
    """A run in virtual seconds: `jobs` sessions of `turns` LLM calls each."""

    jobs: int = 10
    tenants: int = 1
    turns: int = 10
    tier: str = "tier1"
    # What each call sends (and estimates up front), and what the provider answers.
    input_tokens: int = 2000
    output_tokens: int = 500
    max_tokens: int = 1024
    latency_s: float = 2.0
    seed: int = 0
    sdk_max_retries: int = 2
    # The llm gate's calls in flight (resource.llm.concurrency); None: the spec's.
    llm_concurrency: int | None = None
    # The tier's rates times this (a time-scaled run); bursts stay one unscaled minute.
    rate_scale: float = 1.0
    # The gate's bursts this fraction below the provider's: headroom for calls that reach
    # the provider in another order or spacing than the gate granted them (real time).
    burst_headroom: float = 0.0

    def __post_init__(self) -> None:
        if self.tier not in TIERS:
            raise ValueError(f"unknown tier {self.tier!r}; expected one of {sorted(TIERS)}")
        if (
            min(
                self.jobs,
                self.tenants,
                self.turns,
                self.input_tokens,
                self.output_tokens,
                self.max_tokens,
            )
            < 1
        ):
            raise ValueError("jobs, tenants, turns and token counts must be >= 1")
        if not 0.0 <= self.burst_headroom < 1.0:
            raise ValueError("burst_headroom must be in [0, 1)")
        if self.latency_s < 0 or self.sdk_max_retries < 0:
            raise ValueError("latency_s and sdk_max_retries must be >= 0")

    @property
    def limits(self) -> dict[str, int]:
        """The rates per minute (scaled by `rate_scale`)."""
        return {k: round(v * self.rate_scale) for k, v in TIERS[self.tier].items()}

    @property
    def bursts(self) -> dict[str, int]:
        """What each bucket holds at most: one minute of the tier, unscaled."""
        return dict(TIERS[self.tier])

    def mock_config(self) -> MockLLMConfig:
        bursts = {f"{k}_burst": v for k, v in self.bursts.items()}
        return MockLLMConfig.for_tier(
            self.tier,
            api_keys=(API_KEY,),
            seed=self.seed,
            latency_ms=self.latency_s * 1000.0,
            output_tokens=self.output_tokens,
            **self.limits,
            **bursts,
        )

    def ideal_s(self) -> float:
        """Total input tokens over the tier's input token rate (the binding limit here;
        `binding_limit` says which one is)."""
        limit, per_call = self.binding_limit()
        return self.jobs * self.turns * per_call / (self.limits[limit] / 60.0)

    def ideal_after_burst_s(self) -> float:
        """The same, less what the provider's full bucket admits at once (its burst is the
        whole per-minute limit): the fastest any client can finish."""
        limit, per_call = self.binding_limit()
        rate = self.limits[limit]
        return max(0.0, self.jobs * self.turns * per_call - self.bursts[limit]) / (rate / 60.0)

    def binding_limit(self) -> tuple[str, int]:
        """The tier limit that allows the fewest calls a minute, and one call's cost in it."""
        costs = {
            "rpm": 1,
            "itpm": self.input_tokens,
            "otpm": min(self.output_tokens, self.max_tokens),
        }
        name = min(costs, key=lambda k: self.limits[k] / costs[k])
        return name, costs[name]


class VirtualProvider:
    """The mock LLM API's state on the loop's clock: admit, answer after the latency."""

    def __init__(self, loop: VirtualLoop, config: MockLLMConfig) -> None:
        self.loop = loop
        self.state = MockLLMState(config, clock=loop.now)

    def call(
        self,
        input_tokens: int,
        max_tokens: int,
        done: Callable[[int, dict[str, str], int, int], None],
    ) -> None:
        """`done(status, headers, input_tokens, output_tokens)`; tokens 0 when refused."""
        arrived = self.state.begin()
        admission = self.state.admit(
            API_KEY, MessagesRequest(MODEL, max_tokens, input_tokens), arrived
        )
        if admission.status != 200:
            self.state.end()
            headers = dict(admission.headers)
            self.loop.call_later(0.0, lambda: done(admission.status, headers, 0, 0))
            return

        def answered() -> None:
            headers = self.state.settle(API_KEY, admission, input_tokens, arrived)
            self.state.end()
            done(200, headers, input_tokens, admission.output_tokens)

        self.loop.call_later(admission.latency_s, answered)


@dataclass
class NativeGates:
    """Plays module `sandbox_provisioner`: the guest run natively on the virtual clock."""

    loop: VirtualLoop
    backend: MemoryBackend
    random: SeededRandom
    telemetry: EventLog = field(default_factory=EventLog)

    def start(self, invocation: Invocation, done: Callable[[Outcome], None]) -> None:
        ports = native_ports(
            self.backend,
            tenant=invocation.tenant,
            account=ACCOUNT,
            http=_NoHttp(),
            clock=self.loop.clock,
            random=self.random,
            telemetry=self.telemetry,
        )
        outcome = run_guest(invocation, ports)
        self.telemetry.events.clear()
        self.telemetry.logs.clear()
        self.loop.call_later(0.0, lambda: done(outcome))


@dataclass
class VirtualLlmCaller:
    """Plays module `llm_caller`: one call per invocation; answers LlmResponded (another
    turn follows, also after a 429 or 529: the turn is taken again) or LlmFinished."""

    provider: VirtualProvider
    scenario: LlmScenario
    turns_done: dict[str, int] = field(default_factory=dict)

    def start(self, invocation: Invocation, done: Callable[[Outcome], None]) -> None:
        entity = invocation.entity_id

        def answered(status: int, headers: dict[str, str], used_in: int, used_out: int) -> None:
            turns = self.turns_done.get(entity, 0) + (1 if status == 200 else 0)
            self.turns_done[entity] = turns
            params: dict[str, Any] = {
                "input_tokens": used_in,
                "output_tokens": used_out,
                "status": status,
                "headers": headers,
            }
            if turns >= self.scenario.turns:
                done(Outcome("LlmFinished", {**params, "result": f"{turns} turns"}))
                return
            params["estimated_input_tokens"] = str(self.scenario.input_tokens)
            done(Outcome("LlmResponded", params))

        self.provider.call(self.scenario.input_tokens, self.scenario.max_tokens, answered)


def tier_gate_config(
    scenario: LlmScenario,
) -> Callable[[Trigger, dict[str, str]], dict[str, str]]:
    """Sets every trigger's `resource.llm.{rpm,itpm,otpm}` and their bursts to the
    scenario's tier (and `resource.llm.concurrency` when it sets one)."""
    limits = scenario.limits
    bursts = scenario.bursts
    concurrency = scenario.llm_concurrency

    def configure(trigger: Trigger, config: dict[str, str]) -> dict[str, str]:
        if config.get("resource") is None:
            return config
        for rate in _GATE_RATES:
            key = f"resource.llm.{rate}"
            if key in config:
                config[key] = str(limits[rate])
                config[f"{key}_burst"] = str(round(bursts[rate] * (1.0 - scenario.burst_headroom)))
        if concurrency is not None and "resource.llm.concurrency" in config:
            config["resource.llm.concurrency"] = str(concurrency)
        return config

    return configure


@dataclass
class LlmRun:
    mode: str
    scenario: LlmScenario
    completed: int
    failed: int
    unfinished: int
    end_s: float
    provider: MockLLMState
    # [start, end) virtual seconds during which at least one session waited.
    waiting: list[tuple[float, float]]
    run: RunResult | None = None

    @classmethod
    def gated(
        cls,
        scenario: LlmScenario,
        runner: SessionRunner,
        provider: MockLLMState,
        waiting: list[tuple[float, float]],
    ) -> LlmRun:
        """A gated run's figures, from its sessions' runner once the run is over."""
        result = RunResult(results=runner.results(), makespan_s=runner.last_finish)
        unfinished = len(result.results) - result.completed - result.failed
        return cls(
            GATED,
            scenario,
            result.completed,
            result.failed,
            unfinished,
            runner.last_finish,
            provider,
            waiting,
            result,
        )

    def throughput(self) -> dict[str, Any]:
        """What the provider admitted per minute of the binding limit (input tokens, output
        tokens or requests, `LlmScenario.binding_limit`), in steady state while some
        session waited, against the tier's rate for it.

        Steady state starts once the provider's bucket for that limit (replayed from its
        request log, `harness/mocks/llm/limits.py`) is down to a tenth of its burst: from then
        on admissions are paid by the refill, so a client that keeps the provider busy
        gets about 100% (the tenth left over the window, at most, above it). A gate keeps
        some slack below the provider's level (permits in flight reserve their estimated
        output, settled lower afterwards), hence not "empty"."""
        limit = self.scenario.binding_limit()[0]
        rate = self.scenario.limits[limit]
        capacity = getattr(self.provider.config, f"{limit}_burst")
        steady_level = (capacity or rate) / 10.0

        def at(record: RequestRecord) -> float:
            # Output tokens are charged when the answer is sent, the rest on arrival.
            return record.answered_at if limit == "otpm" else record.arrived_at

        def cost(record: RequestRecord) -> int:
            return {"rpm": 1, "itpm": record.input_tokens, "otpm": record.output_tokens}[limit]

        admitted = sorted((r for r in self.provider.requests() if r.status == 200), key=at)
        none = {"limit": limit, "window_s": 0.0, "per_min": None, "of_limit": None}
        span = _span(self.waiting)
        if not admitted or span is None:
            return none
        bucket = TokenBucket(rate, capacity, at(admitted[0]))
        steady_from: float | None = None
        for record in admitted:
            bucket.charge(cost(record), at(record))
            if bucket.level(at(record)) < steady_level:
                steady_from = at(record)
                break
        if steady_from is None:
            return none  # the burst covered every call: the run never met the limit
        start = max(steady_from, span[0])
        end = min(span[1], at(admitted[-1]))
        if end <= start:
            return none
        used = sum(cost(r) for r in admitted if start < at(r) <= end)
        per_min = used / ((end - start) / 60.0)
        return {
            "limit": limit,
            "window_s": round(end - start, 3),
            "per_min": round(per_min, 1),
            "of_limit": round(per_min / rate, 4),
        }

    def summary(self) -> dict[str, Any]:
        stats = self.provider.stats()
        ideal = self.scenario.ideal_s()
        return {
            "mode": self.mode,
            "jobs": self.scenario.jobs,
            "tenants": self.scenario.tenants,
            "completed": self.completed,
            "failed": self.failed,
            "unfinished": self.unfinished,
            "makespan_s": round(self.end_s, 3),
            "ideal_s": round(ideal, 3),
            "ideal_after_burst_s": round(self.scenario.ideal_after_burst_s(), 3),
            # The fastest possible makespan over this run's: 1.0 is the tier's limit.
            "of_ideal": round(self.scenario.ideal_after_burst_s() / self.end_s, 4)
            if self.end_s > 0 and self.completed == self.scenario.jobs
            else None,
            "provider_requests": stats.requests_total,
            "provider_ok": stats.messages_ok,
            "provider_429": stats.rate_limited,
            "provider_529": stats.overloaded,
            "provider_max_concurrency": stats.max_concurrency,
            "input_tokens": stats.input_tokens,
            "output_tokens": stats.output_tokens,
            "tier": self.scenario.tier,
            "tier_limits": dict(self.scenario.limits),
            "binding_limit": self.scenario.binding_limit()[0],
            "throughput_while_waiting": self.throughput(),
        }


def _span(intervals: list[tuple[float, float]]) -> tuple[float, float] | None:
    if not intervals:
        return None
    return min(a for a, _ in intervals), max(b for _, b in intervals)


def _jobs(scenario: LlmScenario) -> list[Job]:
    per = -(-scenario.jobs // scenario.tenants)
    return [Job(f"job-llm-{i + 1:04d}", f"tenant-{i // per + 1}") for i in range(scenario.jobs)]


def run_gated(
    scenario: LlmScenario,
    spec: Spec | None = None,
    *,
    provider: MockLLMConfig | None = None,
    check: bool = True,
    observe: Callable[[Executor], None] | None = None,
) -> LlmRun:
    """The jobs through the gated spec, in virtual time. `provider` replaces the mock's
    config (default `scenario.mock_config()`); `check=False` runs a spec the contract
    check refuses (a test's broken variant); `observe` sees the executor before the run."""
    spec = spec or packaged_spec(SPEC_NAME)
    if check:
        require_clean(spec)
    script = SessionScript.for_spec(spec)
    clock = VirtualClock(START_MS)
    loop = VirtualLoop(clock)
    llm = VirtualProvider(loop, provider or scenario.mock_config())
    gates = NativeGates(loop, MemoryBackend(clock.now_ms), SeededRandom(scenario.seed))
    loop.modules = {"sandbox_provisioner": gates, "llm_caller": VirtualLlmCaller(llm, scenario)}
    executor = Executor(
        spec, loop, run_id="llm", secrets=Secrets(), configure=tier_gate_config(scenario)
    )
    waits = _WaitTracker(loop, set(script.queued_states))
    executor.on_transition(waits.transition)
    if observe is not None:
        observe(executor)
    runner = SessionRunner(executor, script, RunSettings(turns=0), loop.call_later)
    runner.start(_jobs(scenario))
    loop.run(runner.done)
    return LlmRun.gated(scenario, runner, llm.state, waits.closed(loop.now()))


class _WaitTracker:
    """When each entity entered and left a waiting state."""

    def __init__(self, loop: VirtualLoop, states: set[str]) -> None:
        self.loop = loop
        self.states = states
        self.since: dict[str, float] = {}
        self.intervals: list[tuple[float, float]] = []

    def transition(self, entity: Entity, action: str, before: str, after: str) -> None:
        job = entity.job.id
        if after in self.states and job not in self.since:
            self.since[job] = self.loop.now()
        elif after not in self.states and job in self.since:
            start = self.since.pop(job)
            # Only a real wait counts (a grant on the first ask is not one).
            if self.loop.now() > start:
                self.intervals.append((start, self.loop.now()))

    def closed(self, now: float) -> list[tuple[float, float]]:
        return self.intervals + [(start, now) for start in self.since.values() if now > start]


def sdk_retry_s(
    retry_after: str | None, retries_left: int, max_retries: int, rng: random.Random
) -> float:
    """The `anthropic` SDK's wait before a retry (anthropic-sdk-python, `_base_client.py`,
    `_calculate_retry_timeout`): the server's `retry-after` when it is 0 < s <= 60, else
    0.5 s doubling per retry, at most 8 s, less up to 25% jitter."""
    if retry_after is not None:
        try:
            seconds = float(retry_after)
        except ValueError:
            seconds = -1.0
        if 0 < seconds <= 60:
            return seconds
    retries = min(max_retries - retries_left, 1000)
    delay = min(0.5 * 2.0**retries, 8.0)
    return delay * (1 - 0.25 * rng.random())


def run_ungated(scenario: LlmScenario) -> LlmRun:
    """Every session calls the provider directly, with the SDK's retries, in virtual time."""
    clock = VirtualClock(START_MS)
    loop = VirtualLoop(clock)
    provider = VirtualProvider(loop, scenario.mock_config())
    rng = random.Random(scenario.seed ^ 0x5DC)
    outcome: dict[str, str] = {}
    waiting: list[tuple[float, float]] = []
    last = [0.0]

    def session(job: Job) -> None:
        turns = [0]

        def call(retries_left: int) -> None:
            asked = loop.now()

            def answered(status: int, headers: dict[str, str], _in: int, _out: int) -> None:
                if status == 200:
                    turns[0] += 1
                    if turns[0] >= scenario.turns:
                        outcome[job.id] = "completed"
                        last[0] = max(last[0], loop.now())
                        return
                    call(scenario.sdk_max_retries)
                    return
                if retries_left <= 0:
                    outcome[job.id] = f"failed: {status} after {scenario.sdk_max_retries} retries"
                    last[0] = max(last[0], loop.now())
                    return
                wait = sdk_retry_s(
                    headers.get("retry-after"), retries_left, scenario.sdk_max_retries, rng
                )
                waiting.append((asked, loop.now() + wait))
                loop.call_later(wait, lambda: call(retries_left - 1))

            provider.call(scenario.input_tokens, scenario.max_tokens, answered)

        call(scenario.sdk_max_retries)

    jobs = _jobs(scenario)
    for job in jobs:
        session(job)
    loop.run(lambda: len(outcome) == len(jobs))
    completed = sum(1 for v in outcome.values() if v == "completed")
    failed = len(outcome) - completed
    return LlmRun(
        UNGATED,
        scenario,
        completed,
        failed,
        len(jobs) - len(outcome),
        last[0],
        provider.state,
        waiting,
    )


def run_in_mode(mode: str, gated: Callable[[], LlmRun], ungated: Callable[[], LlmRun]) -> LlmRun:
    """Runs the runner of `mode` (virtual or real time alike); ValueError for another."""
    runners = {GATED: gated, UNGATED: ungated}
    if mode not in runners:
        raise ValueError(f"unknown LLM mode {mode!r}; expected one of {LLM_MODES}")
    return runners[mode]()


def run_llm_mode(mode: str, scenario: LlmScenario, spec: Spec | None = None) -> LlmRun:
    return run_in_mode(mode, lambda: run_gated(scenario, spec), lambda: run_ungated(scenario))


def format_llm_table(summaries: list[dict[str, Any]]) -> str:
    """The modes side by side."""
    Cell = Callable[[dict[str, Any]], str]
    rows: list[tuple[str, Cell]] = [
        ("jobs completed", lambda s: f"{s['completed']}/{s['jobs']}"),
        ("jobs failed", lambda s: str(s["failed"])),
        ("provider requests", lambda s: str(s["provider_requests"])),
        ("provider 429s", lambda s: str(s["provider_429"])),
        ("provider 529s", lambda s: str(s["provider_529"])),
        ("input tokens", lambda s: str(s["input_tokens"])),
        ("makespan s (ideal)", lambda s: f"{s['makespan_s']:.1f} ({s['ideal_after_burst_s']:.1f})"),
        ("of ideal makespan", lambda s: "-" if s["of_ideal"] is None else f"{s['of_ideal']:.0%}"),
        ("binding limit", lambda s: str(s["binding_limit"])),
        ("per min, waiting", lambda s: _per_min(s["throughput_while_waiting"])),
        ("of the tier's limit", lambda s: _of_limit(s["throughput_while_waiting"])),
    ]
    names = [s["mode"] for s in summaries]
    width = max(20, *(len(label) for label, _ in rows))
    head = f"{'':<{width}}" + "".join(f"{name:>16}" for name in names)
    lines = [head]
    for label, cell in rows:
        lines.append(f"{label:<{width}}" + "".join(f"{cell(s):>16}" for s in summaries))
    return "\n".join(lines)


def _per_min(throughput: dict[str, Any]) -> str:
    value = throughput.get("per_min")
    return "-" if value is None else f"{value:.0f}"


def _of_limit(throughput: dict[str, Any]) -> str:
    value = throughput.get("of_limit")
    return "-" if value is None else f"{value:.0%}"
