"""`sandbox-provisioner simulate --llm`: sessions that take LLM turns, with and without the
resource gates, side by side. The runs are in virtual time (`llm_sessions.py`):
the provider is the mock LLM API's own state with the tier's per-minute limits, so a run of
hours of traffic takes seconds and replays from its seed, and the figures do not depend on
how fast the machine is.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from harness.mocks.llm.config import TIERS
from harness.simulator.contract import ContractError
from harness.simulator.llm_sessions import (
    GATED,
    LLM_MODES,
    UNGATED,
    LlmScenario,
    format_llm_table,
    run_llm_mode,
)
from harness.simulator.spec import SpecError, load_spec
from host.cli.options import add_value_option

EXIT_OK = 0
EXIT_GATED_FAILED = 1
EXIT_USAGE = 2


def add_llm_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = LlmScenario()
    group = parser.add_argument_group(
        "LLM sessions (--llm: virtual time, the mock LLM API's limits; --jobs, --tenants, "
        "--turns, --seed, --spec and --json apply)"
    )
    group.add_argument(
        "--llm",
        action="store_true",
        help="sessions take LLM turns through examples/llm_gated_agent.ioa.toml "
        "(gated) or call the provider directly with the SDK's retries (ungated)",
    )
    group.add_argument(
        "--llm-mode",
        choices=(*LLM_MODES, "compare"),
        default="compare",
        help="gated, ungated, or both side by side (default)",
    )
    group.add_argument(
        "--llm-tier",
        choices=sorted(TIERS),
        default=defaults.tier,
        help=f"the provider's per-minute limits (default {defaults.tier})",
    )
    add_value_option(
        group,
        "--llm-input-tokens",
        int,
        defaults.input_tokens,
        "input tokens per call, also its estimate",
        "N",
    )
    add_value_option(
        group, "--llm-output-tokens", int, defaults.output_tokens, "output tokens per answer", "N"
    )
    add_value_option(
        group,
        "--llm-latency-ms",
        float,
        defaults.latency_s * 1000,
        "the provider's time to answer",
        "MS",
    )
    group.add_argument(
        "--llm-concurrency",
        type=int,
        default=None,
        metavar="N",
        help="the llm gate's calls in flight (default: the spec's)",
    )
    group.add_argument(
        "--llm-real-time",
        action="store_true",
        help="run against the mock LLM API on loopback in real time, "
        "--llm-scale times faster (figures depend on the machine's speed)",
    )
    add_value_option(
        group,
        "--llm-scale",
        float,
        20.0,
        "real time: the tier's rates times X, latency and the spec's timers over X",
        "X",
    )
    add_value_option(
        group,
        "--llm-burst-headroom",
        float,
        0.1,
        "real time: the gate's bursts this fraction below the provider's, for network jitter",
        "F",
    )


def llm_scenario_from_args(args: argparse.Namespace) -> LlmScenario:
    return LlmScenario(
        jobs=args.jobs,
        tenants=args.tenants,
        turns=args.turns,
        tier=args.llm_tier,
        input_tokens=args.llm_input_tokens,
        output_tokens=args.llm_output_tokens,
        latency_s=args.llm_latency_ms / 1000.0,
        seed=args.seed,
        llm_concurrency=args.llm_concurrency,
    )


def comparison(summaries: dict[str, dict[str, Any]]) -> str:
    if set(summaries) != {GATED, UNGATED}:
        return ""
    g, u = summaries[GATED], summaries[UNGATED]
    return (
        f"without the gates the provider answered {u['provider_429']} 429s and "
        f"{u['completed']}/{u['jobs']} jobs completed; with them {g['provider_429']} 429s "
        f"and {g['completed']}/{g['jobs']} completed in {g['makespan_s']:.0f} s "
        f"(ideal {g['ideal_after_burst_s']:.0f} s)"
    )


def run_llm_simulate(args: argparse.Namespace) -> int:
    try:
        scenario = llm_scenario_from_args(args)
        spec = load_spec(args.spec) if args.spec is not None else None
        modes = list(LLM_MODES) if args.llm_mode == "compare" else [args.llm_mode]
        if args.llm_real_time:
            from harness.simulator.llm_realtime import RealTimeLlm, run_realtime_mode

            real = RealTimeLlm(scenario, args.llm_scale, args.llm_burst_headroom)
            summaries = {mode: run_realtime_mode(mode, real, spec).summary() for mode in modes}
        else:
            summaries = {mode: run_llm_mode(mode, scenario, spec).summary() for mode in modes}
    except (ValueError, SpecError, ContractError) as error:
        print(f"sandbox-provisioner: {error}", file=sys.stderr)
        return EXIT_USAGE
    line = comparison(summaries)
    if args.json:
        document: dict[str, Any] = {"llm": _scenario_json(scenario, args), "summary": summaries}
        if line:
            document["comparison"] = line
        print(json.dumps(document, indent=2))
    else:
        limits = scenario.limits
        print(
            f"LLM sessions: {scenario.jobs} jobs, {scenario.tenants} tenant(s), "
            f"{scenario.turns} turns of {scenario.input_tokens} input tokens; "
            f"{scenario.tier}: {limits['rpm']} rpm, {limits['itpm']} itpm, "
            f"{limits['otpm']} otpm "
            + (
                f"(real time, x{args.llm_scale:g}, the mock LLM API on loopback)"
                if args.llm_real_time
                else "(virtual time)"
            )
        )
        print(format_llm_table(list(summaries.values())))
        if line:
            print(line)
    gated = summaries.get(GATED)
    if gated is not None and (gated["failed"] or gated["unfinished"] or gated["provider_429"]):
        return EXIT_GATED_FAILED
    return EXIT_OK


def _scenario_json(scenario: LlmScenario, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "jobs": scenario.jobs,
        "tenants": scenario.tenants,
        "turns": scenario.turns,
        "tier": scenario.tier,
        "limits": dict(scenario.limits),
        "input_tokens": scenario.input_tokens,
        "output_tokens": scenario.output_tokens,
        "max_tokens": scenario.max_tokens,
        "latency_s": scenario.latency_s,
        "seed": scenario.seed,
        "llm_concurrency": scenario.llm_concurrency,
        "time": "real" if args.llm_real_time else "virtual",
        "scale": args.llm_scale if args.llm_real_time else 1.0,
        "burst_headroom": args.llm_burst_headroom if args.llm_real_time else 0.0,
    }
