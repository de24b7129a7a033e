"""`sandbox-provisioner simulate`: the incident, replayed against a mock E2B, then fixed.

Modes: `direct` (the old provisioner: every session POSTs at once, no retries), `batches`
(the manual workaround: four jobs at a time), `provisioner` (this component, with
admission control) and `compare` (all three, one after the other, on the same limits).
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from host.mock_e2b import MockE2BServer
from host.runtime.assembly import open_runtime
from host.runtime.loader import LoadedComponent, load_component
from host.services.telemetry import InvocationTag
from host.sessions.driver import DriverSettings, EventSink, Invoker, RunResult, SessionDriver
from host.sessions.invokers import ComponentInvoker, DirectInvoker
from host.sessions.live import LiveLog
from host.sessions.model import Job
from host.sessions.report import (
    E2BFigures,
    build_report,
    comparison_line,
    format_table,
    ideal_makespan_s,
)
from host.sessions.scenario import MODES, E2BLimits, Scenario
from host.sessions.timescale import TimeScale
from provisioner.ports import LogLevel

SIM_API_KEY = "e2b_simulated_key"
EXIT_OK = 0
EXIT_PROVISIONER_FAILED = 1


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _limit(text: str) -> int | None:
    """A cap, or `none` for no cap."""
    if text.lower() in ("none", "off", "unlimited"):
        return None
    return _positive_int(text)


def _rate(text: str) -> float | None:
    if text.lower() in ("none", "off", "unlimited"):
        return None
    return _positive_float(text)


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Scenario()
    e2b = defaults.e2b
    parser.add_argument("--mode", choices=(*MODES, "compare"), default="compare",
                        help="direct: the old provisioner; batches: 4 jobs at a time by hand; "
                        "provisioner: this component; compare: all three (default)")
    parser.add_argument("--jobs", type=_positive_int, default=defaults.jobs,
                        help=f"CurationJobs submitted at once (default {defaults.jobs})")
    parser.add_argument("--tenants", type=_positive_int, default=defaults.tenants,
                        help="tenants sharing the E2B account; each submits its jobs together "
                        f"(default {defaults.tenants})")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed for the mock E2B (latency spread, ids)")
    parser.add_argument("--storage", default="memory://", metavar="URL",
                        help="the component's storage: memory:// (default), sqlite:///path.db, "
                        "redis://host:port/db; each run uses a fresh account namespace")
    parser.add_argument("--component", type=Path, default=None,
                        help="the component (default dist/sandbox_provisioner.wasm)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON report on stdout (live lines go to stderr)")
    parser.add_argument("--quiet", action="store_true", help="no live lines")
    group = parser.add_argument_group("the mock E2B account (real time)")
    group.add_argument("--e2b-max-concurrent-creates", type=_limit,
                       default=e2b.max_concurrent_creates, metavar="N",
                       help="create requests E2B serves at once; past it, --e2b-overload "
                       f"(default {e2b.max_concurrent_creates})")
    group.add_argument("--e2b-create-rate", type=_rate, default=e2b.create_rate_per_s,
                       metavar="PER_S", help="E2B's create rate limit, per second (default "
                       f"{e2b.create_rate_per_s:g}; Hobby plan 1, Pro 5)")
    group.add_argument("--e2b-create-burst", type=_positive_int, default=e2b.create_burst,
                       metavar="N", help=f"the rate limiter's burst (default {e2b.create_burst})")
    group.add_argument("--e2b-max-sandboxes", type=_limit, default=e2b.max_sandboxes,
                       metavar="N", help=f"concurrent sandboxes (default {e2b.max_sandboxes})")
    group.add_argument("--e2b-create-latency-ms", type=float, default=e2b.create_latency_ms,
                       metavar="MS", help=f"create latency (default {e2b.create_latency_ms:g}); "
                       "keep it under the real liveness timeout: a create in flight shows "
                       "no sign of life until it returns")
    group.add_argument("--e2b-overload", choices=("reject", "slow"), default=e2b.overload,
                       help="past the concurrent-create cap: 429 at once (default) or wait")
    timing = parser.add_argument_group("sessions (simulated time, scaled)")
    timing.add_argument("--time-scale", type=_positive_float, default=defaults.scale.sim_per_real,
                        metavar="X", help="simulated seconds per real second "
                        f"(default {defaults.scale.sim_per_real:g})")
    timing.add_argument("--turns", type=int, default=defaults.turns,
                        help=f"turns per session (default {defaults.turns})")
    timing.add_argument("--turn-ms", type=_positive_float, default=defaults.turn_sim_s * 1000,
                        metavar="MS", help="simulated time per turn (default "
                        f"{defaults.turn_sim_s * 1000:g}, {defaults.turn_sim_s / 60:g} min)")
    timing.add_argument("--liveness-s", type=_positive_float, default=defaults.liveness_sim_s,
                        metavar="S", help="simulated liveness timeout, reset by RecordProgress "
                        f"and SandboxQueued (default {defaults.liveness_sim_s:g})")


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    return Scenario(
        jobs=args.jobs,
        tenants=min(args.tenants, args.jobs),
        seed=args.seed,
        e2b=E2BLimits(
            max_concurrent_creates=args.e2b_max_concurrent_creates,
            create_rate_per_s=args.e2b_create_rate,
            create_burst=args.e2b_create_burst,
            max_sandboxes=args.e2b_max_sandboxes,
            create_latency_ms=max(0.0, args.e2b_create_latency_ms),
            overload=args.e2b_overload,
        ),
        scale=TimeScale(args.time_scale),
        turns=max(0, args.turns),
        turn_sim_s=args.turn_ms / 1000,
        liveness_sim_s=args.liveness_s,
    )


class _SessionTelemetry:
    """Hands the guest's progress events to the driver as signs of life (the way a runtime
    should count them against liveness timeouts); prints the guest's first few warnings
    and counts the rest."""

    MAX_PRINTED = 5

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()
        self.warnings = 0
        self.driver: SessionDriver | None = None

    def log(self, tag: InvocationTag, level: LogLevel, message: str) -> None:
        if level not in (LogLevel.WARN, LogLevel.ERROR):
            return
        with self._lock:
            self.warnings += 1
            count = self.warnings
        if count <= self.MAX_PRINTED:
            print(f"guest {level.value} [{tag.tenant} {tag.entity_id}] {message[:300]}",
                  file=self._out, flush=True)
        elif count == self.MAX_PRINTED + 1:
            print("guest warnings: further ones are counted, not shown", file=self._out,
                  flush=True)

    def progress(self, tag: InvocationTag, event: dict[str, Any]) -> None:
        driver = self.driver
        if driver is not None:
            driver.sign_of_life(tag.entity_id)


@dataclass
class ModeRun:
    mode: str
    run: RunResult
    report: dict[str, Any]


def run_mode(
    scenario: Scenario,
    mode: str,
    *,
    storage_url: str = "memory://",
    loaded: LoadedComponent | None = None,
    live: LiveLog | None = None,
    announce: Callable[[str], None] | None = None,
) -> ModeRun:
    """Starts a mock E2B, runs the scenario's jobs in `mode`, stops everything it started."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    run_id = secrets.token_hex(3)
    jobs = scenario.job_list(run_id)
    mock = MockE2BServer(scenario.mock_config(SIM_API_KEY)).start()
    try:
        if announce is not None:
            announce(f"mock E2B at {mock.url}")
        config = scenario.integration_config(mock.url)
        settings = scenario.driver_settings(mode, config, run_id)
        on_event = live.event if live is not None else None
        telemetry = None
        if mode == "provisioner":
            telemetry = _SessionTelemetry(sys.stderr)
            with open_runtime(
                e2b_url=mock.url,
                api_key=SIM_API_KEY,
                storage_url=storage_url,
                account=f"simulate-{run_id}",
                loaded=loaded or load_component(),
                telemetry=telemetry,
                allow_private_network=True,
            ) as runtime:
                run = _drive(ComponentInvoker(runtime), settings, jobs, on_event, mock, telemetry)
        else:
            direct = DirectInvoker(mock.url, SIM_API_KEY)
            try:
                run = _drive(direct, settings, jobs, on_event, mock)
            finally:
                direct.close()
        figures = _e2b_figures(mock, run)
    finally:
        mock.stop()
    ideal = ideal_makespan_s(len(jobs), scenario.e2b.limits(), scenario.session_s)
    report = build_report(run, mode=mode, e2b=figures, ideal_s=ideal)
    report["summary"]["guest_warnings"] = telemetry.warnings if telemetry is not None else 0
    return ModeRun(mode, run, report)


def _drive(
    invoker: Invoker,
    settings: DriverSettings,
    jobs: list[Job],
    on_event: EventSink | None,
    mock: MockE2BServer,
    telemetry: _SessionTelemetry | None = None,
) -> RunResult:
    driver = SessionDriver(invoker, settings, on_event=on_event)
    if telemetry is not None:
        telemetry.driver = driver
    try:
        return driver.run(jobs)
    except BaseException:
        mock.stop()  # ends requests still hanging on E2B, so the workers can be joined
        raise
    finally:
        driver.close()


def _e2b_figures(mock: MockE2BServer, run: RunResult) -> E2BFigures:
    stats = mock.stats()
    # Every session has ended and released: whatever still runs belongs to nobody.
    orphans = mock.orphans(set())
    held = [r.sandbox_id for r in run.results if r.sandbox_id]
    shared = len(held) - len(set(held))
    return E2BFigures(
        max_concurrent_creates=stats.max_concurrent_creates,
        max_running_sandboxes=stats.max_running_sandboxes,
        throttled=stats.throttled,
        orphaned_sandboxes=len(orphans),
        duplicate_sandboxes=stats.duplicates + shared,
        sandboxes_created=stats.sandboxes_created,
    )


def _header(scenario: Scenario, mode: str) -> str:
    e2b = scenario.e2b
    rate = "no rate limit" if e2b.create_rate_per_s is None else (
        f"{e2b.create_rate_per_s:g} creates/s (burst {e2b.create_burst})")
    return (
        f"== {mode}: {scenario.jobs} jobs, {scenario.tenants} tenant(s); E2B admits "
        f"{e2b.max_concurrent_creates or 'unlimited'} concurrent creates, {rate}, "
        f"{e2b.max_sandboxes or 'unlimited'} sandboxes, {e2b.create_latency_ms / 1000:g}s "
        f"per create; {scenario.turns} turns of {scenario.turn_sim_s / 60:g} min, liveness "
        f"{scenario.liveness_sim_s / 60:g} min (x{scenario.scale.sim_per_real:g}: "
        f"{scenario.session_s:.1f}s and {scenario.scale.real_s(scenario.liveness_sim_s):.1f}s "
        "real)"
    )


def run_simulate(args: argparse.Namespace) -> int:
    scenario = scenario_from_args(args)
    modes = list(MODES) if args.mode == "compare" else [args.mode]
    out = sys.stderr if args.json else sys.stdout
    loaded = None
    if "provisioner" in modes:
        try:
            loaded = load_component(args.component)
        except (FileNotFoundError, ValueError) as error:
            print(f"sandbox-provisioner: {error}", file=sys.stderr)
            return 2
    runs: list[ModeRun] = []
    for mode in modes:
        if not args.json:
            print(_header(scenario, mode), file=out, flush=True)
        live = None if args.quiet else LiveLog(out)
        done = run_mode(
            scenario,
            mode,
            storage_url=args.storage,
            loaded=loaded,
            live=live,
            announce=None if args.quiet else lambda line: print(line, file=out, flush=True),
        )
        runs.append(done)
        if not args.json:
            print(format_table(done.report, done.run.results), file=out, flush=True)
            print(file=out)
    reports = [done.report for done in runs]
    if len(runs) > 1 and not args.json:
        print(comparison_line(reports), file=out, flush=True)
    if args.json:
        document: dict[str, Any] = reports[0] if len(reports) == 1 else {
            "comparison": comparison_line(reports),
            "modes": {done.mode: done.report for done in runs},
        }
        print(json.dumps(document, indent=2))
    return _exit_code(runs)


def _exit_code(runs: list[ModeRun]) -> int:
    for done in runs:
        s = done.report["summary"]
        if done.mode == "provisioner" and (
            s["failed"] or s["orphaned_sandboxes"] or s["duplicate_sandboxes"]
        ):
            return EXIT_PROVISIONER_FAILED
    return EXIT_OK
