"""Figure 7: serve's pacing (held answers, push wake-ups) against the poll alone, in virtual
time.

The pace contract's scenario (issue 24), through `harness/simulator/detsim.py` with `serve`
modelled in `harness/simulator/virtual_serve.py` (the rule of `host/serve/pace.py`): the example
spec under Temper's rules, the admission logic natively over an in-process E2B that serves
4 creates at once (429 past it), 5 creates/s with no burst, 20 sandboxes, 2 s per create;
sessions hold their sandbox 5 s; 5 tenants. 10, 100 and 1,000 jobs, side by side in one
run: the spec's 2 s poll alone (the baseline), 2 s with held answers (1.5 s window), 30 s
with push wake-ups (and held answers), and 30 s alone. Each row: makespan against the
ideal the limits allow (`harness.simulator.report.ideal_makespan_s`), Temper invocations per
completed job (how many of them the queued state's timer started, which serve cannot
prevent: Temper re-arms it at each entry; and provisioner calls, a held request's re-asks
included), E2B's 429s and
creates at once, and the wall time of the run.

Then requests held at once against waiters: N jobs queued at once with held answers and
no cap on holding (max_held above N); the contract expects at most rate x window +
create slots.

Run alone: .venv/bin/python -m benchmarks.pace [--quick]
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from benchmarks.machine import load_average
from benchmarks.support import run_alone
from benchmarks.table import Row, times
from harness.simulator import detsim
from harness.simulator.fake_e2b import SIMULATED_E2B
from harness.simulator.spec import packaged_spec
from host.serve.pace import PaceSettings
from provisioner.config import AdmissionConfig

SLOTS, RATE, CAP, CREATE_MS, SESSION_S, TENANTS, TURNS = 4, 5.0, 20, 2_000, 5.0, 5, 10
HOLD_MS = 1_500
MAKESPAN_TARGET = 1.05
PUSH_INVOCATIONS_TARGET = 4.0
WALL_TARGET_S = 60.0


@dataclass(frozen=True)
class Way:
    name: str
    poll_s: int
    pace: PaceSettings
    # Targets the contract sets for this way (makespan ratio, invocations per job).
    makespan_target: float | None = None
    invocations_target: float | None = None


WAYS = (
    Way("poll 2 s (baseline)", 2, PaceSettings(hold_ms=0)),
    Way("poll 2 s + held answers", 2, PaceSettings(hold_ms=HOLD_MS), MAKESPAN_TARGET),
    Way(
        "poll 30 s + push",
        30,
        PaceSettings(hold_ms=HOLD_MS, push=True),
        MAKESPAN_TARGET,
        PUSH_INVOCATIONS_TARGET,
    ),
    Way("poll 30 s alone", 30, PaceSettings(hold_ms=0)),
)


def scenario(jobs: int, poll_s: int, pace: PaceSettings) -> detsim.VirtualScenario:
    return detsim.VirtualScenario(
        jobs=jobs,
        tenants=TENANTS,
        turns=TURNS,
        turn_s=SESSION_S / (TURNS + 1),
        poll_s=poll_s,
        admission=AdmissionConfig(create_slots=SLOTS, create_rate_per_s=RATE, max_sandboxes=CAP),
        e2b=SIMULATED_E2B.replace(
            create_latency_ms=CREATE_MS,
            create_rate_per_s=RATE,
            max_sandboxes=CAP,
            max_concurrent_creates=SLOTS,
        ),
        pace=pace,
    )


def run(jobs: int, poll_s: int, pace: PaceSettings) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    done = detsim.run_virtual(packaged_spec("temper_agent.ioa.toml"), scenario(jobs, poll_s, pace))
    return done.summary(), time.perf_counter() - started


def way_row(jobs: int, way: Way, summary: dict[str, Any], wall_s: float) -> Row:
    ratio = summary["makespan_ratio"]
    per_job = summary["invocations_per_completed"]
    met: bool | None = None
    targets = []
    clean = (
        summary["completed"] == jobs
        and summary["throttled"] == 0
        and summary["max_concurrent_creates_seen"] <= SLOTS
        and summary["orphaned_sandboxes"] == 0
        and summary["duplicate_sandboxes"] == 0
    )
    if way.makespan_target is not None:
        targets.append(f"<= {way.makespan_target}x ideal, all done, no 429")
        met = clean and ratio is not None and ratio <= way.makespan_target
    if way.invocations_target is not None:
        targets.append(f"<= {way.invocations_target:g} invocations/job")
        met = bool(met) and per_job is not None and per_job <= way.invocations_target
    if jobs >= 1000 and way.makespan_target is not None:
        targets.append(f"< {WALL_TARGET_S:g} s wall")
        met = bool(met) and wall_s < WALL_TARGET_S
    return Row(
        "7",
        f"{jobs} jobs, {way.name}",
        f"{summary['makespan_s']:.1f} s vs ideal {summary['ideal_makespan_s']:.1f} s; "
        f"{summary['completed']}/{jobs} done; {per_job} invocations/job "
        f"({summary['timer_invocations_per_completed']} started by the poll timer; "
        f"{summary['component_calls_per_completed']} component calls); "
        f"{summary['throttled']} 429s; {summary['max_concurrent_creates_seen']} creates at "
        f"once; held at once {summary['max_held_at_once']}; wake-ups "
        f"{summary['wake_ups'] or '-'}; {wall_s:.1f} s wall",
        times(ratio) if ratio is not None else "",
        "ideal",
        "; ".join(targets),
        met,
    )


def held_row(waiters: int) -> Row:
    summary, wall_s = run(waiters, 2, PaceSettings(hold_ms=HOLD_MS, max_held=waiters + 1))
    bound = RATE * HOLD_MS / 1000 + SLOTS
    held = summary["max_held_at_once"]
    return Row(
        "7",
        f"requests held at once, {waiters} waiters",
        f"{held} held at once ({summary['completed']}/{waiters} done, {wall_s:.1f} s wall)",
        f"{held / bound:.1f}x the bound",
        f"rate x window + slots = {bound:g}",
        f"<= {bound:g}",
        held <= bound,
    )


def measure(quick: bool) -> list[Row]:
    sizes = (10, 100) if quick else (10, 100, 1000)
    rows = [Row("7", "load average at start", load_average())]
    for jobs in sizes:
        for way in WAYS:
            summary, wall_s = run(jobs, way.poll_s, way.pace)
            rows.append(way_row(jobs, way, summary, wall_s))
    for waiters in (100,) if quick else (100, 1000):
        rows.append(held_row(waiters))
    rows.append(Row("7", "load average at end", load_average()))
    return rows


def main() -> None:
    run_alone(__doc__, measure)


if __name__ == "__main__":
    main()
