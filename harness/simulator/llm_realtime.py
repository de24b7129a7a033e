"""LLM-turn sessions in real time against the mock LLM API on loopback (`MockLLMServer`).

The same two modes as `llm_sessions.py` (which runs them in virtual time), over HTTP:

- **gated**: `llm_gated_agent.ioa.toml` under the executor on the wall clock
  (`driver.RealTimeLoop`); module `sandbox_provisioner` is the guest run natively
  (`provisioner.app.run`) over in-memory storage; module `llm_caller` POSTs
  `/v1/messages` to the mock and hands back the usage, status and rate-limit headers.
- **ungated**: every session calls the mock through the official `anthropic` SDK at once,
  with the SDK's own retries (2, honouring `retry-after`); a call that still fails ends
  the session.

Time is scaled by `scale` as `simulate` scales a session's time: the tier's per-minute
rates are multiplied by it, the buckets keep one (unscaled) minute's worth as their burst,
and the provider's latency and the spec's timers are divided by it, so the run has the
shape of a tier-1 run in 1/scale of the time. Headers stay in real seconds (`retry-after`
is whole seconds, so the mock advises at least 1 s). The figures depend on how fast the
machine serves the calls: the throughput ratio is a benchmark figure here; the virtual-time
run (`llm_sessions.py`) is the one tests assert it on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import httpx

from harness.mocks.llm.server import MockLLMServer
from harness.simulator.contract import require_clean
from harness.simulator.detsim import ACCOUNT, _NoHttp
from harness.simulator.driver import RealTimeLoop
from harness.simulator.executor import Executor, Secrets
from harness.simulator.llm_sessions import (
    API_KEY,
    MODEL,
    SPEC_NAME,
    UNGATED,
    LlmRun,
    LlmScenario,
    _jobs,
    _WaitTracker,
    run_in_mode,
    tier_gate_config,
)
from harness.simulator.model import Job
from harness.simulator.runner import RunSettings, SessionRunner, SessionScript
from harness.simulator.simulated_ports import EventLog, SeededRandom
from harness.simulator.spec import Spec, StateTimeout, Trigger, packaged_spec
from host.runtime.native import native_ports
from host.storage.memory import MemoryBackend
from provisioner.app import run as run_guest
from provisioner.model import Invocation, Outcome

_CHARS_PER_TOKEN = 4  # harness/mocks/llm/config.py CHARS_PER_TOKEN


@dataclass(frozen=True)
class RealTimeLlm:
    """`scenario` in real time, `scale` times faster: its rates times `scale`, its
    latency and the spec's timers (and poll advice) over `scale`."""

    scenario: LlmScenario
    scale: float = 20.0
    burst_headroom: float = 0.1

    @property
    def scaled(self) -> LlmScenario:
        return replace(
            self.scenario,
            rate_scale=self.scale,
            latency_s=self.scenario.latency_s / self.scale,
            burst_headroom=self.burst_headroom,
        )

    def configure(self) -> Callable[[Trigger, dict[str, str]], dict[str, str]]:
        gate = tier_gate_config(self.scaled)

        def hook(trigger: Trigger, config: dict[str, str]) -> dict[str, str]:
            config = gate(trigger, config)
            if config.get("resource") is not None and "poll_max_ms" in config:
                scaled = max(1, round(int(config["poll_max_ms"]) / self.scale))
                config["poll_max_ms"] = str(scaled)
                config["poll_min_ms"] = str(min(scaled, 200))
            return config

        return hook

    def timer_seconds(self, timeout: StateTimeout) -> float:
        return timeout.after_seconds / self.scale


class _WallClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class NativeGateInvoker:
    """Module `sandbox_provisioner` for the real-time loop: the guest, natively."""

    def __init__(self, seed: int) -> None:
        self.clock = _WallClock()
        self.backend = MemoryBackend(self.clock.now_ms)
        self.random = SeededRandom(seed)
        self._lock = threading.Lock()

    def invoke(self, invocation: Invocation) -> Outcome:
        telemetry = EventLog()
        ports = native_ports(
            self.backend,
            tenant=invocation.tenant,
            account=ACCOUNT,
            http=_NoHttp(),
            clock=self.clock,
            random=self.random,
            telemetry=telemetry,
        )
        return run_guest(invocation, ports)


def _body(scenario: LlmScenario) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": scenario.max_tokens,
        "messages": [{"role": "user", "content": "x" * (scenario.input_tokens * _CHARS_PER_TOKEN)}],
    }


class HttpLlmCaller:
    """Module `llm_caller`: one POST /v1/messages per invocation, no retry of its own (the
    gate's settle and the next acquire are the retry)."""

    def __init__(self, scenario: LlmScenario) -> None:
        self.scenario = scenario
        self._client: httpx.Client | None = None
        self._turns: dict[str, int] = {}
        self._lock = threading.Lock()

    def connect(self, url: str) -> None:
        self._client = httpx.Client(
            base_url=url,
            timeout=60.0,
            headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"},
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def invoke(self, invocation: Invocation) -> Outcome:
        if self._client is None:
            raise RuntimeError("the LLM caller is not connected")
        response = self._client.post("/v1/messages", json=_body(self.scenario))
        usage = response.json().get("usage", {}) if response.status_code == 200 else {}
        status = response.status_code
        with self._lock:
            turns = self._turns.get(invocation.entity_id, 0) + (1 if status == 200 else 0)
            self._turns[invocation.entity_id] = turns
        headers = {
            k: v
            for k, v in response.headers.items()
            if k.startswith("anthropic-ratelimit-") or k == "retry-after"
        }
        params: dict[str, Any] = {
            "input_tokens": int(usage.get("input_tokens", 0)),
            "output_tokens": int(usage.get("output_tokens", 0)),
            "status": status,
            "headers": headers,
        }
        if turns >= self.scenario.turns:
            return Outcome("LlmFinished", {**params, "result": f"{turns} turns"})
        params["estimated_input_tokens"] = str(self.scenario.input_tokens)
        return Outcome("LlmResponded", params)


def run_gated_realtime(config: RealTimeLlm, spec: Spec | None = None) -> LlmRun:
    spec = spec or packaged_spec(SPEC_NAME)
    require_clean(spec)
    script = SessionScript.for_spec(spec)
    scenario = config.scaled
    caller = HttpLlmCaller(scenario)
    loop = RealTimeLoop(
        {"sandbox_provisioner": NativeGateInvoker(scenario.seed), "llm_caller": caller}, workers=32
    )
    # The mock's clock is the loop's, so its request log and the waits share one origin.
    with MockLLMServer(scenario.mock_config(), clock=loop.now) as server:
        caller.connect(server.url)
        try:
            executor = Executor(
                spec,
                loop,
                run_id="llm-rt",
                secrets=Secrets(),
                configure=config.configure(),
                timer_seconds=config.timer_seconds,
            )
            waits = _WaitTracker(loop, set(script.queued_states))  # type: ignore[arg-type]
            executor.on_transition(waits.transition)
            runner = SessionRunner(executor, script, RunSettings(turns=0), loop.call_later)
            runner.start(_jobs(scenario))
            loop.run(runner.done)
        finally:
            loop.close(wait=True)
            caller.close()
        state = server._state  # the stats and request log, read after the run
    return LlmRun.gated(scenario, runner, state, waits.closed(loop.now()))


def run_ungated_realtime(config: RealTimeLlm) -> LlmRun:
    try:  # the SDK is what ungated sessions are: an optional extra of the package
        import anthropic
    except ImportError as error:
        raise RuntimeError(
            "the real-time ungated mode runs the official anthropic SDK: "
            "pip install 'temper-sandbox-provisioner[llm]'"
        ) from error
    scenario = config.scaled
    jobs = _jobs(scenario)
    waiting: list[tuple[float, float]] = []
    lock = threading.Lock()
    started = time.monotonic()
    with MockLLMServer(scenario.mock_config(), clock=lambda: time.monotonic() - started) as server:
        # Closed on every way out: a client left to the garbage collector at interpreter
        # exit (Ctrl-C) printed an AttributeError traceback from its __del__.
        with anthropic.Anthropic(
            api_key=API_KEY, base_url=server.url, max_retries=scenario.sdk_max_retries
        ) as client:
            body = _body(scenario)

            def session(job: Job) -> tuple[bool, float]:
                for _turn in range(scenario.turns):
                    asked = time.monotonic() - started
                    try:
                        client.messages.create(
                            model=body["model"],
                            max_tokens=body["max_tokens"],
                            messages=body["messages"],
                        )
                    except anthropic.APIStatusError:
                        return False, time.monotonic() - started
                    took = time.monotonic() - started - asked
                    if took > 2 * scenario.latency_s + 0.5:  # it waited for an SDK retry
                        with lock:
                            waiting.append((asked, asked + took))
                return True, time.monotonic() - started

            with ThreadPoolExecutor(max(1, len(jobs))) as pool:
                ends = list(pool.map(session, jobs))
        state = server._state
    completed = sum(1 for ok, _ in ends if ok)
    return LlmRun(
        UNGATED,
        scenario,
        completed,
        len(jobs) - completed,
        0,
        max(end for _, end in ends),
        state,
        waiting,
    )


def run_realtime_mode(mode: str, config: RealTimeLlm, spec: Spec | None = None) -> LlmRun:
    return run_in_mode(
        mode, lambda: run_gated_realtime(config, spec), lambda: run_ungated_realtime(config)
    )
