"""Figure 2: makespan against the ideal the limits allow, and who completes.

Each scenario runs three ways against fresh mocks with the same settings, one after the
other in the same run: `provisioner` (this component, admission control), `direct` (the
old provisioner: one POST, no retry) and `e2b_sdk` (the official SDK's create with its
default retries, no gates). Real time, through `harness.simulator.simulate.run_mode`:

- incident: `simulate`'s defaults: 10 jobs, E2B serving 4 creates at once (429 past it),
  5 creates/s with a burst of 10, 20 sandboxes, 2 s per create; 10 turns of 0.5 s.
- 100 jobs over 5 tenants on the same account, with 0.5 s creates (so it fits in seconds):
  here the 20-sandbox cap binds (ideal = ceil(100/20) x (create + session)).
- the same 100 jobs on an account with 100 sandboxes (only creates bind), provisioner
  only: it shows how much of the gap above comes from handing freed sandboxes on.

1,000 jobs run in virtual time (harness/simulator/detsim.py: the same admission logic,
natively, over an in-process fake E2B): 4 creates at once, 5 creates/s, 20 sandboxes, 2 s creates,
sandboxes held 5 s; makespan against the same ideal formula.

Run alone: .venv/bin/python -m benchmarks.makespan [--quick]
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from benchmarks.sdk_sessions import SDK_MODE, run_sdk_sessions
from benchmarks.support import run_alone
from benchmarks.table import Row, times
from harness.simulator import detsim
from harness.simulator.fake_e2b import SIMULATED_E2B
from harness.simulator.report import Limits, ideal_makespan_s
from harness.simulator.scenario import E2BLimits, Scenario
from harness.simulator.simulate import run_mode
from host.runtime.loader import LoadedComponent, load_component
from provisioner.config import AdmissionConfig

MAKESPAN_TARGET = 1.10
MODES = ("provisioner", "direct", SDK_MODE)

INCIDENT = Scenario()
HUNDRED = replace(INCIDENT, jobs=100, tenants=5, e2b=E2BLimits(create_latency_ms=500.0))
HUNDRED_UNCAPPED = replace(HUNDRED, e2b=E2BLimits(create_latency_ms=500.0, max_sandboxes=100))


@dataclass(frozen=True)
class ScenarioResult:
    name: str
    summaries: dict[str, dict[str, Any]]


def run_scenario(
    name: str, scenario: Scenario, loaded: LoadedComponent, modes: tuple[str, ...] = MODES
) -> ScenarioResult:
    summaries: dict[str, dict[str, Any]] = {}
    for mode in modes:
        if mode == SDK_MODE:
            _, report = run_sdk_sessions(scenario)
        else:
            report = run_mode(scenario, mode, loaded=loaded).report
        summaries[mode] = report["summary"]
    return ScenarioResult(name, summaries)


@dataclass(frozen=True)
class VirtualResult:
    jobs: int
    completed: int
    makespan_s: float
    ideal_s: float
    wall_s: float


def run_virtual(jobs: int) -> VirtualResult:
    """The example spec under Temper's rules in virtual time (detsim: the same executor as
    the real-time driver, the admission logic natively over a fake E2B)."""
    import time

    from harness.simulator.spec import packaged_spec

    latency_ms, hold_ms, slots, rate, cap = 2_000, 5_000, 4, 5.0, 20
    started = time.perf_counter()
    done = detsim.run_virtual(
        packaged_spec("temper_agent.ioa.toml"),
        detsim.VirtualScenario(
            jobs=jobs,
            turns=10,
            turn_s=hold_ms / 10_000,
            admission=AdmissionConfig(
                create_slots=slots, create_rate_per_s=rate, max_sandboxes=cap
            ),
            e2b=SIMULATED_E2B.replace(
                create_latency_ms=latency_ms, create_rate_per_s=rate, max_sandboxes=cap
            ),
        ),
    )
    wall = time.perf_counter() - started
    limits = Limits(
        create_slots=slots,
        create_rate_per_s=rate,
        create_burst=1,
        max_sandboxes=cap,
        create_latency_s=latency_ms / 1000,
    )
    ideal = ideal_makespan_s(jobs, limits, hold_ms / 1000)
    return VirtualResult(jobs, done.run.completed, done.run.makespan_s, ideal, wall)


def rows(results: list[ScenarioResult], virtual: list[VirtualResult]) -> list[Row]:
    out: list[Row] = []
    for result in results:
        prov = result.summaries["provisioner"]
        ratio = prov["makespan_ratio"]
        out.append(
            Row(
                "2",
                f"makespan, {result.name} (real time)",
                f"{prov['makespan_s']:.1f} s vs ideal {prov['ideal_makespan_s']:.1f} s",
                times(ratio),
                "ideal",
                f"<= {MAKESPAN_TARGET}x ideal",
                ratio <= MAKESPAN_TARGET,
            )
        )
        if len(result.summaries) == 1:
            continue
        completion = {mode: s["completed"] / s["jobs"] for mode, s in result.summaries.items()}
        others_fail = any(completion[mode] < 1 for mode in MODES if mode != "provisioner")
        out.append(
            Row(
                "2",
                f"completion, {result.name}",
                ", ".join(
                    f"{mode} {s['completed']}/{s['jobs']}" for mode, s in result.summaries.items()
                ),
                ", ".join(f"{mode} {completion[mode]:.0%}" for mode in MODES),
                "same mock settings",
                "100% where direct fails" if others_fail else "",
                (completion["provisioner"] == 1.0) if others_fail else None,
            )
        )
        out.append(
            Row(
                "2",
                f"E2B seen, {result.name}",
                "; ".join(
                    f"{mode}: {s['throttled']} 429s, "
                    f"{s['max_concurrent_creates_seen']} creates at once"
                    for mode, s in result.summaries.items()
                ),
            )
        )
    for v in virtual:
        ratio = v.makespan_s / v.ideal_s
        out.append(
            Row(
                "2",
                f"makespan, {v.jobs} jobs (detsim, virtual time)",
                f"{v.makespan_s:.1f} s vs ideal {v.ideal_s:.1f} s ({v.completed}/{v.jobs} done, "
                f"{v.wall_s:.1f} s wall)",
                times(ratio),
                "ideal",
            )
        )
    return out


def measure(loaded: LoadedComponent, quick: bool) -> list[Row]:
    results = [run_scenario("incident", INCIDENT, loaded)]
    if not quick:
        results.append(run_scenario("100 jobs, 20-sandbox cap", HUNDRED, loaded))
        results.append(
            run_scenario(
                "100 jobs, 100-sandbox cap", HUNDRED_UNCAPPED, loaded, modes=("provisioner",)
            )
        )
    virtual = [run_virtual(jobs) for jobs in ((10, 100) if quick else (10, 100, 1000))]
    return rows(results, virtual)


def main() -> None:
    run_alone(__doc__, lambda quick: measure(load_component(), quick))


if __name__ == "__main__":
    main()
