"""`sandbox-provisioner simulate`: the incident, replayed against a mock E2B, then fixed.

Every mode runs a Temper spec under Temper's rules (`executor.py`): `direct` runs the
upstream TemperAgent flow (`specs/temper_agent_upstream.ioa.toml`) with the old module's
behaviour (every Provision POSTs at once, a refused create fails the invocation), `batches`
the same flow four jobs at a time (the manual workaround), `provisioner` the example spec
(`examples/temper_agent.ioa.toml`) with this component, and `compare` all three on the same
limits. After the runs it prints how the spec's poll interval trades makespan against
invocations (in virtual time, `detsim.py`), and `--timeline FILE` draws the runs.

The provisioner mode runs the way a deployment does: each invocation goes through the Temper
shim to a real `serve` on 127.0.0.1 (`served.py`) with held answers (`--hold-ms`, below the
spec's poll) and, with `--push`, wake-ups through the run's own Temper API endpoint;
`--hold-ms 0` without `--push` invokes the component directly, as before.

`--virtual` runs the provisioner mode in virtual time instead (`detsim.py`: the same executor
and spec, the guest's provision path natively over an in-process E2B with the same limits), with
`serve`'s held answers (`--hold-ms`) and push wake-ups (`--push`) modelled as
`host/serve/pace.py` decides them; see docs/simulate-pace.md.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from harness.mocks.e2b import MockE2BServer
from harness.mocks.e2b.config import MockE2BConfig
from harness.simulator.contract import ContractError, require_clean
from harness.simulator.detsim import VirtualScenario, poll_tradeoff, run_virtual
from harness.simulator.driver import DriverSettings, Invoker, SessionDriver
from harness.simulator.executor import ConfigHook, EventSink
from harness.simulator.fake_e2b import SIMULATED_E2B
from harness.simulator.invokers import ComponentInvoker, DirectInvoker
from harness.simulator.live import LiveLog
from harness.simulator.model import Job
from harness.simulator.report import (
    E2BFigures,
    build_report,
    comparison_line,
    format_table,
    ideal_makespan_s,
)
from harness.simulator.runner import RunResult
from harness.simulator.scenario import MODES, E2BLimits, Scenario, mode_spec
from harness.simulator.served import ServedInvoker, ServedProvisioner
from harness.simulator.spec import Spec, SpecError, load_spec
from harness.simulator.timeline import write_timeline
from harness.simulator.timescale import TimeScale
from host.cli.options import ExitCode, add_component_option, add_value_option, load_or_fail
from host.runtime.assembly import open_runtime
from host.runtime.component_runtime import ComponentRuntime
from host.runtime.loader import LoadedComponent, load_component
from host.serve.pace import PaceSettings
from host.serve.wakeups import DEFAULT_WAKE_ACTION
from host.services.telemetry import InvocationTag
from provisioner.config import AdmissionConfig
from provisioner.ports import LogLevel

SIM_API_KEY = "e2b_simulated_key"
MODULE = "sandbox_provisioner"
EXIT_OK = ExitCode.OK
EXIT_PROVISIONER_FAILED = ExitCode.FAILED
EXIT_USAGE = ExitCode.USAGE
EXIT_HOST_OVERLOADED = ExitCode.OVERLOADED
TRADEOFF_POLLS = (1, 2, 5, 10, 30)
# Where the guest sends E2B requests in virtual time (the in-process E2B answers them).
VIRTUAL_E2B_URL = "http://e2b.virtual"


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
    parser.add_argument(
        "--mode",
        choices=(*MODES, "compare"),
        default="compare",
        help="direct: the old provisioner; batches: 4 jobs at a time by hand; "
        "provisioner: this component; compare: all three (default)",
    )
    add_value_option(
        parser, "--jobs", _positive_int, defaults.jobs, "CurationJobs submitted at once"
    )
    add_value_option(
        parser,
        "--tenants",
        _positive_int,
        defaults.tenants,
        "tenants sharing the E2B account; each submits its jobs together",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed for the mock E2B (latency spread, ids)",
    )
    parser.add_argument(
        "--storage",
        default="memory://",
        metavar="URL",
        help="the component's storage: memory:// (default), sqlite:///path.db, "
        "redis://host:port/db; each run uses a fresh account namespace",
    )
    add_component_option(parser)
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON report on stdout (live lines go to stderr)",
    )
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="also print every session event as it happens"
    )
    # Quiet is the default now; the old flag is still accepted.
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    group = parser.add_argument_group("the mock E2B account (real time)")
    add_value_option(
        group,
        "--e2b-max-concurrent-creates",
        _limit,
        e2b.max_concurrent_creates,
        "create requests E2B serves at once; past it, --e2b-overload",
        "N",
    )
    group.add_argument(
        "--e2b-create-rate",
        type=_rate,
        default=e2b.create_rate_per_s,
        metavar="PER_S",
        help="E2B's create rate limit, per second (default "
        f"{e2b.create_rate_per_s:g}; Hobby plan 1, Pro 5)",
    )
    add_value_option(
        group,
        "--e2b-create-burst",
        _positive_int,
        e2b.create_burst,
        "the rate limiter's burst",
        "N",
    )
    add_value_option(
        group, "--e2b-max-sandboxes", _limit, e2b.max_sandboxes, "concurrent sandboxes", "N"
    )
    group.add_argument(
        "--e2b-create-latency-ms",
        type=float,
        default=e2b.create_latency_ms,
        metavar="MS",
        help=f"create latency (default {e2b.create_latency_ms:g}); "
        "keep it under the real liveness timeout: a create in flight shows "
        "no sign of life until it returns",
    )
    group.add_argument(
        "--e2b-overload",
        choices=("reject", "slow"),
        default=e2b.overload,
        help="past the concurrent-create cap: 429 at once (default) or wait",
    )
    timing = parser.add_argument_group("sessions (simulated time, scaled)")
    add_value_option(
        timing,
        "--time-scale",
        _positive_float,
        defaults.scale.sim_per_real,
        "simulated seconds per real second",
        "X",
    )
    add_value_option(timing, "--turns", int, defaults.turns, "turns per session")
    timing.add_argument(
        "--turn-ms",
        type=_positive_float,
        default=defaults.turn_sim_s * 1000,
        metavar="MS",
        help="simulated time per turn (default "
        f"{defaults.turn_sim_s * 1000:g}, {defaults.turn_sim_s / 60:g} min)",
    )
    spec = parser.add_argument_group("the spec")
    spec.add_argument(
        "--spec",
        type=Path,
        default=None,
        metavar="FILE",
        help="the spec the provisioner mode runs (default: the packaged "
        "examples/temper_agent.ioa.toml)",
    )
    spec.add_argument(
        "--poll-s",
        type=_positive_int,
        default=None,
        metavar="S",
        help="replace the spec's poll interval (Queued's after_seconds)",
    )
    spec.add_argument(
        "--timeline",
        type=Path,
        default=None,
        metavar="FILE",
        help="write a picture of the runs: FILE.html (self-contained SVG) or "
        "FILE.png (rendered with a headless chromium)",
    )
    spec.add_argument(
        "--no-tradeoff", action="store_true", help="skip the poll-interval table (virtual time)"
    )
    virtual = parser.add_argument_group("serve's pacing, and virtual time (--virtual)")
    virtual.add_argument(
        "--virtual",
        action="store_true",
        help="run the provisioner mode in virtual time (detsim): same spec, "
        "executor and limits, no mock server, no wall clock",
    )
    virtual.add_argument(
        "--hold-ms",
        type=int,
        default=None,
        metavar="MS",
        help="how long serve may hold a queued answer to ask again (default "
        f"{PaceSettings().hold_ms}, in real time kept below the spec's poll; 0: never). "
        "In real time, --hold-ms 0 without --push runs the component without serve",
    )
    virtual.add_argument(
        "--push",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="serve wakes a queued entity at its turn through Temper's API (the spec's "
        "WakeProvision; in real time the run's own endpoint); default off",
    )
    from harness.simulator.llm_simulate import add_llm_arguments

    add_llm_arguments(parser)


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
    )


class _SessionTelemetry:
    """Prints the guest's first few warnings and counts the rest. Progress events are not
    signs of life: Temper broadcasts them and never resets a timer on one
    (crates/temper-server/src/state/dispatch/wasm/callbacks.rs)."""

    MAX_PRINTED = 5

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()
        self.warnings = 0

    def log(self, tag: InvocationTag, level: LogLevel, message: str) -> None:
        if level not in (LogLevel.WARN, LogLevel.ERROR):
            return
        with self._lock:
            self.warnings += 1
            count = self.warnings
        if count <= self.MAX_PRINTED:
            print(
                f"guest {level.value} [{tag.tenant} {tag.entity_id}] {message[:300]}",
                file=self._out,
                flush=True,
            )
        elif count == self.MAX_PRINTED + 1:
            print("guest warnings: further ones are counted, not shown", file=self._out, flush=True)

    def progress(self, tag: InvocationTag, event: dict[str, Any]) -> None:
        return None


@dataclass
class ModeRun:
    mode: str
    run: RunResult
    report: dict[str, Any]
    spec: Spec


def run_mode(
    scenario: Scenario,
    mode: str,
    *,
    storage_url: str = "memory://",
    loaded: LoadedComponent | None = None,
    live: LiveLog | None = None,
    announce: Callable[[str], None] | None = None,
    spec: Spec | None = None,
    keep_up: bool = True,
    pace: PaceSettings | None = None,
) -> ModeRun:
    """Starts a mock E2B, runs the scenario's jobs in `mode` through the mode's spec (the
    example spec with the component, or the upstream TemperAgent flow with the old module),
    stops everything it started. In the provisioner mode, `pace` puts a `serve` with those
    settings in front of the component (`served.py`); None invokes it directly."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    spec = mode_spec(mode, spec)
    run_id = secrets.token_hex(3)
    jobs = scenario.job_list(run_id)
    mock = MockE2BServer(scenario.mock_config(SIM_API_KEY)).start()
    try:
        if announce is not None:
            announce(f"mock E2B at {mock.url}")
        settings = replace(scenario.driver_settings(mode, run_id), keep_up=keep_up)
        on_event = live.event if live is not None else None
        telemetry = None
        served: dict[str, Any] | None = None
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
                if pace is None:
                    driver = _session_driver(
                        spec,
                        ComponentInvoker(runtime),
                        settings,
                        scenario.configure(mock.url),
                        on_event,
                    )
                    run = _drive(driver, jobs, mock)
                else:
                    run, served = _run_served(
                        runtime, scenario, spec, jobs, mock, settings, pace, on_event
                    )
        else:
            direct = DirectInvoker(mock.url, SIM_API_KEY)
            try:
                driver = _session_driver(
                    spec, direct, settings, scenario.configure(mock.url), on_event
                )
                run = _drive(driver, jobs, mock)
            finally:
                direct.close()
        figures = _e2b_figures(mock, run)
    finally:
        mock.stop()
    ideal = ideal_makespan_s(len(jobs), scenario.e2b.limits(), scenario.session_s)
    report = build_report(run, mode=mode, e2b=figures, ideal_s=ideal)
    report["summary"]["spec"] = spec.source
    report["summary"]["poll_s"] = _poll_s(spec)
    report["summary"]["guest_warnings"] = telemetry.warnings if telemetry is not None else 0
    if mode == "provisioner":
        report["summary"]["serve"] = served  # None: the component was invoked directly
    return ModeRun(mode, run, report, spec)


def _run_served(
    runtime: ComponentRuntime,
    scenario: Scenario,
    spec: Spec,
    jobs: list[Job],
    mock: MockE2BServer,
    settings: DriverSettings,
    pace: PaceSettings,
    on_event: EventSink | None,
) -> tuple[RunResult, dict[str, Any]]:
    """The provisioner mode through the shim and a real `serve`; with push, the driver
    serves Temper's API and each tenant has its own credential there."""
    tokens = {tenant: secrets.token_hex(16) for tenant in sorted({job.tenant for job in jobs})}
    # A held invocation keeps its thread, as in Temper (one blocking thread per
    # invocation): give every job one, so holding never delays another's invocation.
    workers = scenario.workers or max(settings.workers, min(2 * len(jobs), 256))
    settings = replace(
        settings,
        workers=workers,
        temper_api=pace.push,
        api_credentials=tuple((token, tenant) for tenant, token in tokens.items()),
    )
    with ServedProvisioner(
        runtime,
        mock.url,
        pace,
        workers=workers,
        credentials=tokens,
        entity_sets={spec.name: f"{spec.name}s"},
    ) as served:
        invoker = ServedInvoker(served, MODULE)
        try:
            driver = _session_driver(
                spec, invoker, settings, scenario.configure(mock.url), on_event
            )
            try:
                served.start(driver.api_url if pace.push else None)
            except BaseException:
                driver.close()
                raise
            run = _drive(driver, jobs, mock)
        finally:
            invoker.close()
        return run, served.summary()


def serve_pace(hold_ms: int | None, push: bool, spec: Spec) -> PaceSettings | None:
    """`serve`'s settings for a real-time provisioner run: held answers kept below the
    spec's poll (a request held past it would meet the entity's next poll), or None for
    the component invoked directly (`--hold-ms 0` without `--push`). Raises ValueError
    for a hold at or past the poll, or push with a spec lacking the wake action."""
    default = PaceSettings()
    poll_ms = (_poll_s(spec) or 0) * 1000
    hold = default.hold_ms if hold_ms is None else hold_ms
    if hold < 0:
        raise ValueError("--hold-ms must be >= 0")
    if poll_ms and hold >= poll_ms:
        if hold_ms is not None:
            raise ValueError(f"--hold-ms must stay below the spec's poll ({poll_ms} ms)")
        hold = poll_ms * 3 // 4
    if push and spec.action(DEFAULT_WAKE_ACTION) is None:
        raise ValueError(f"--push needs the spec's {DEFAULT_WAKE_ACTION} action ({spec.source})")
    if hold == 0 and not push:
        return None
    return replace(default, hold_ms=hold, push=push)


def _session_driver(
    spec: Spec,
    invoker: Invoker,
    settings: DriverSettings,
    configure: ConfigHook,
    on_event: EventSink | None,
) -> SessionDriver:
    return SessionDriver(spec, {MODULE: invoker}, settings, configure=configure, on_event=on_event)


def _poll_s(spec: Spec) -> int | None:
    for timeout in spec.timeouts:
        if timeout.state == "Queued":
            return timeout.after_seconds
    return None


def _drive(driver: SessionDriver, jobs: list[Job], mock: MockE2BServer) -> RunResult:
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
    held = [r.sandbox_id for r in run.results if r.sandbox_id]  # one per session that had one
    shared = len(held) - len(set(held))
    return E2BFigures(
        max_concurrent_creates=stats.max_concurrent_creates,
        max_running_sandboxes=stats.max_running_sandboxes,
        throttled=stats.throttled,
        orphaned_sandboxes=len(orphans),
        duplicate_sandboxes=stats.duplicates + shared,
        sandboxes_created=stats.sandboxes_created,
    )


def _header(scenario: Scenario, mode: str, spec: Spec) -> str:
    e2b = scenario.e2b
    poll = _poll_s(spec)
    rate = (
        "no rate limit"
        if e2b.create_rate_per_s is None
        else (f"{e2b.create_rate_per_s:g} creates/s (burst {e2b.create_burst})")
    )
    return (
        f"== {mode}: {scenario.jobs} jobs, {scenario.tenants} tenant(s); E2B admits "
        f"{e2b.max_concurrent_creates or 'unlimited'} concurrent creates, {rate}, "
        f"{e2b.max_sandboxes or 'unlimited'} sandboxes, {e2b.create_latency_ms / 1000:g}s "
        f"per create; {scenario.turns} turns of {scenario.turn_sim_s / 60:g} min "
        f"(x{scenario.scale.sim_per_real:g}: {scenario.session_s:.1f}s real with the finish); spec "
        f"{spec.source}" + ("" if poll is None else f", polling every {poll}s")
    )


def _spec_from_args(args: argparse.Namespace) -> Spec | None:
    spec = load_spec(args.spec) if args.spec is not None else None
    if args.poll_s is not None:
        from harness.simulator.detsim import with_poll
        from harness.simulator.runner import SessionScript

        spec = spec or mode_spec("provisioner")
        spec = with_poll(spec, SessionScript.for_spec(spec), args.poll_s)
    return spec


def tradeoff_scenario(scenario: Scenario) -> VirtualScenario:
    """The scenario in virtual time, for the poll-interval table: the same jobs, limits and
    session length, the admission logic natively in front of the fake E2B."""
    e2b = scenario.e2b
    # The fake E2B's limiter has no burst: give it the rate only where E2B's has none.
    fake = SIMULATED_E2B.replace(
        create_latency_ms=round(e2b.create_latency_ms),
        create_rate_per_s=e2b.create_rate_per_s if e2b.create_burst <= 1 else None,
        max_sandboxes=e2b.max_sandboxes,
    )
    return _guest_scenario(scenario, fake, PaceSettings(hold_ms=0))


def virtual_scenario(scenario: Scenario, pace: PaceSettings) -> VirtualScenario:
    """The scenario in virtual time with every limit of the mock E2B (its create
    concurrency, 429 past it; its rate limiter with its burst; its sandbox cap), the guest's
    whole provision path configured as in real time (`virtual_guest.py`)."""
    e2b = scenario.e2b
    fake = SIMULATED_E2B.replace(
        create_latency_ms=round(e2b.create_latency_ms),
        create_rate_per_s=e2b.create_rate_per_s,
        create_burst=e2b.create_burst,
        max_sandboxes=e2b.max_sandboxes,
        # The fake never waits: "slow" overload is left to the real-time mock.
        max_concurrent_creates=e2b.max_concurrent_creates if e2b.overload == "reject" else None,
    )
    return _guest_scenario(scenario, fake, pace)


def _guest_scenario(scenario: Scenario, fake: MockE2BConfig, pace: PaceSettings) -> VirtualScenario:
    """The scenario's jobs, sessions and integration config in virtual time, the guest's
    whole path in front of `fake`."""
    integration = scenario.integration_config(VIRTUAL_E2B_URL)
    return VirtualScenario(
        jobs=scenario.jobs,
        tenants=scenario.tenants,
        turns=scenario.turns,
        turn_s=scenario.scale.real_s(scenario.turn_sim_s),
        admission=AdmissionConfig.from_config(dict(integration)),
        guest=True,
        integration=integration,
        e2b=fake,
        seed=scenario.seed,
        sim_per_real=scenario.scale.sim_per_real,
        pace=pace,
    )


def run_virtual_simulate(args: argparse.Namespace, scenario: Scenario) -> int:
    """`simulate --virtual`: the provisioner mode in virtual time, one JSON or text report."""
    if args.hold_ms is None:
        args.hold_ms = PaceSettings().hold_ms
    if args.hold_ms < 0:
        print("sandbox-provisioner: --hold-ms must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    try:
        override = _spec_from_args(args)
        spec = mode_spec("provisioner", override)
        require_clean(spec)
    except (SpecError, ContractError) as error:
        print(f"sandbox-provisioner: {error}", file=sys.stderr)
        return EXIT_USAGE
    pace = PaceSettings(hold_ms=args.hold_ms, push=args.push)
    done = run_virtual(spec, virtual_scenario(scenario, pace))
    summary = {
        **done.summary(),
        "spec": spec.source,
        "poll_s": _poll_s(spec),
        "hold_ms": pace.hold_ms,
        "push": pace.push,
        "virtual_end_s": round(done.end_s, 3),
    }
    if args.json:
        print(json.dumps({"mode": "provisioner", "virtual": True, "summary": summary}, indent=2))
    else:
        print(format_virtual(summary))
    bad = (
        summary["failed"]
        or summary["completed"] < summary["jobs"]
        or summary["orphaned_sandboxes"]
        or summary["duplicate_sandboxes"]
    )
    return EXIT_PROVISIONER_FAILED if bad else EXIT_OK


def format_virtual(summary: dict[str, Any]) -> str:
    poll = summary["poll_s"]
    pace = (
        f"held answers up to {summary['hold_ms']} ms" if summary["hold_ms"] else "no held answers"
    ) + (", push wake-ups" if summary["push"] else ", no push")
    ratio = summary["makespan_ratio"]
    return "\n".join(
        [
            f"== provisioner, virtual time: {summary['jobs']} jobs; poll every {poll}s, {pace}",
            f"  completed {summary['completed']}/{summary['jobs']}, failed {summary['failed']}",
            f"  makespan {summary['makespan_s']:.1f}s vs ideal {summary['ideal_makespan_s']:.1f}s"
            + (f" ({ratio:.2f}x)" if ratio is not None else ""),
            f"  invocations {summary['invocations']} "
            f"({summary['invocations_per_completed']} per completed job), "
            f"held at once {summary['max_held_at_once']}, wake-ups {summary['wake_ups']}",
            f"  E2B: {summary['max_concurrent_creates_seen']} creates at once, "
            f"{summary['max_running_sandboxes_seen']} sandboxes at once, "
            f"{summary['throttled']} throttled (429), {summary['orphaned_sandboxes']} orphaned, "
            f"{summary['duplicate_sandboxes']} duplicate",
        ]
    )


def _pace_line(pace: PaceSettings | None) -> str:
    if pace is None:
        return "the component invoked directly (no serve: --hold-ms 0, no push)"
    held = f"held answers up to {pace.hold_ms} ms" if pace.hold_ms else "no held answers"
    push = "push wake-ups through the run's Temper API" if pace.push else "no push"
    return f"through the Temper shim and serve: {held}, {push}"


def format_served(served: dict[str, Any]) -> str:
    return (
        f"serve: {served['requests']} requests, {served['held_requests']} held "
        f"(at most {served['max_held_at_once']} at once), {served['component_calls']} "
        f"component calls ({served['reasks']} re-asks), wake-ups {served['wake_ups'] or '-'}"
    )


def format_tradeoff(rows: list[dict[str, Any]], ideal_s: float) -> str:
    lines = [
        "poll interval against makespan and invocations (virtual time, same limits; "
        f"ideal {ideal_s:.1f}s):",
        "  poll   makespan   vs ideal   invocations   completed",
    ]
    for row in rows:
        lines.append(
            f"  {row['poll_s']:>3}s   {row['makespan_s']:>7.1f}s   "
            f"{row['makespan_s'] / ideal_s if ideal_s else 0:>7.2f}x   "
            f"{row['invocations']:>11}   {row['completed']:>4}/{row['jobs']}"
        )
    return "\n".join(lines)


def run_simulate(args: argparse.Namespace) -> int:
    if getattr(args, "llm", False):
        from harness.simulator.llm_simulate import run_llm_simulate

        return run_llm_simulate(args)
    scenario = scenario_from_args(args)
    if args.virtual:
        return run_virtual_simulate(args, scenario)
    modes = list(MODES) if args.mode == "compare" else [args.mode]
    out = sys.stderr if args.json else sys.stdout
    pace: PaceSettings | None = None
    try:
        override = _spec_from_args(args)
        if override is not None and "provisioner" in modes:
            require_clean(override)
        if "provisioner" in modes:
            pace = serve_pace(args.hold_ms, args.push, mode_spec("provisioner", override))
    except (SpecError, ContractError, ValueError) as error:
        print(f"sandbox-provisioner: {error}", file=sys.stderr)
        return EXIT_USAGE
    loaded: LoadedComponent | None = None
    if "provisioner" in modes:
        component = load_or_fail(args.component)
        if isinstance(component, int):
            return component
        loaded = component
    runs: list[ModeRun] = []
    for mode in modes:
        spec = mode_spec(mode, override)
        if not args.json:
            print(_header(scenario, mode, spec), file=out, flush=True)
            if mode == "provisioner":
                print(f"   {_pace_line(pace)}", file=out, flush=True)
        live = LiveLog(out) if args.verbose and not args.quiet else None
        done = run_mode(
            scenario,
            mode,
            storage_url=args.storage,
            loaded=loaded,
            live=live,
            announce=None if args.quiet else lambda line: print(line, file=out, flush=True),
            spec=spec,
            pace=pace if mode == "provisioner" else None,
        )
        runs.append(done)
        if not args.json:
            served = done.report["summary"].get("serve")
            if served:
                print(format_served(served), file=out, flush=True)
            print(format_table(done.report, done.run.results), file=out, flush=True)
            print(file=out)
        if done.run.overloaded:
            print(f"sandbox-provisioner: {done.run.overloaded}", file=sys.stderr, flush=True)
            break
    reports = [done.report for done in runs]
    if len(runs) > 1 and not args.json:
        print(comparison_line(reports), file=out, flush=True)
    tradeoff: list[dict[str, Any]] = []
    if "provisioner" in modes and not args.no_tradeoff and not runs[-1].run.overloaded:
        ideal = reports[-1]["summary"]["ideal_makespan_s"]
        tradeoff = poll_tradeoff(
            mode_spec("provisioner", override), tradeoff_scenario(scenario), TRADEOFF_POLLS
        )
        if not args.json:
            print(file=out)
            print(format_tradeoff(tradeoff, ideal), file=out, flush=True)
    if args.timeline is not None:
        written = write_timeline(args.timeline, [(d.mode, d.run, d.spec) for d in runs])
        print(f"timeline: {written}", file=out, flush=True)
    if args.json:
        document: dict[str, Any] = (
            dict(reports[0])
            if len(reports) == 1
            else {
                "comparison": comparison_line(reports),
                "modes": {done.mode: done.report for done in runs},
            }
        )
        if tradeoff:
            document["poll_tradeoff"] = tradeoff
        print(json.dumps(document, indent=2))
    return _exit_code(runs)


def _exit_code(runs: list[ModeRun]) -> int:
    if any(done.run.overloaded for done in runs):
        return EXIT_HOST_OVERLOADED
    for done in runs:
        s = done.report["summary"]
        if done.mode == "provisioner" and (
            s["failed"] or s["unfinished"] or s["orphaned_sandboxes"] or s["duplicate_sandboxes"]
        ):
            return EXIT_PROVISIONER_FAILED
    return EXIT_OK
