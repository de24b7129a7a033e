"""Command line of the mock: ``sandbox-provisioner mock-e2b`` (or
``python -m harness.mocks.e2b``)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from harness.mocks.e2b.config import OVERLOAD_MODES, PLANS, MockE2BConfig, Storm, parse_fault
from harness.mocks.e2b.server import MockE2BServer
from harness.mocks.shared.cli import (
    add_listen_arguments,
    preset_changes,
    run_command,
    serve_until_signal,
)

# flag destination -> config field, for flags that map one to one.
_FIELDS = {
    "api_key": "api_key",
    "seed": "seed",
    "create_latency_ms": "create_latency_ms",
    "create_latency_sigma": "create_latency_sigma",
    "create_latency_max_ms": "create_latency_max_ms",
    "create_latency_jitter_ms": "create_latency_jitter_ms",
    "create_rate": "create_rate_per_s",
    "create_burst": "create_burst",
    "max_concurrent_creates": "max_concurrent_creates",
    "create_overload": "create_overload_mode",
    "create_overload_timeout_ms": "create_overload_timeout_ms",
    "max_sandboxes": "max_sandboxes",
    "kill_capacity_lag_ms": "kill_capacity_lag_ms",
    "foreign_sandboxes": "foreign_sandboxes",
    "default_timeout_s": "default_timeout_s",
    "max_timeout_s": "max_timeout_s",
    "hang_s": "hang_s",
    "slow_body_ms": "slow_body_ms",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the mock's flags; every flag left out keeps the permissive default."""
    add_listen_arguments(parser)
    parser.add_argument(
        "--api-key",
        default=None,
        help="accepted X-API-Key (default: $E2B_API_KEY, else e2b_mock_key)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of latency, faults, ids")
    parser.add_argument(
        "--plan",
        choices=sorted(PLANS),
        default=None,
        help="E2B plan limits (hobby: 20 sandboxes, 1 create/s; pro: 100, 5/s); explicit flags win",
    )
    parser.add_argument(
        "--create-latency-ms", type=float, default=None, help="median create latency"
    )
    parser.add_argument(
        "--create-latency-sigma",
        type=float,
        default=None,
        help="lognormal spread of the create latency (0: fixed)",
    )
    parser.add_argument(
        "--create-latency-max-ms", type=float, default=None, help="ceiling of the create latency"
    )
    parser.add_argument(
        "--create-latency-jitter-ms",
        type=float,
        default=None,
        help="uniform jitter added to each create's latency",
    )
    parser.add_argument(
        "--create-rate",
        type=float,
        default=None,
        help="route rate limit, creates per second (GCRA)",
    )
    parser.add_argument(
        "--create-burst", type=int, default=None, help="creates allowed at once by the rate limiter"
    )
    parser.add_argument(
        "--max-concurrent-creates", type=int, default=None, help="create requests in flight at once"
    )
    parser.add_argument(
        "--create-overload",
        choices=OVERLOAD_MODES,
        default=None,
        help="past the concurrent-create cap: 429 (reject) or wait (slow)",
    )
    parser.add_argument(
        "--create-overload-timeout-ms",
        type=float,
        default=None,
        help="in slow mode, answer 504 after waiting this long for a slot",
    )
    parser.add_argument(
        "--max-sandboxes",
        type=int,
        default=None,
        help="concurrent sandboxes (the cap's 429 has no Retry-After)",
    )
    parser.add_argument(
        "--kill-capacity-lag-ms",
        type=float,
        default=None,
        help="how long a killed sandbox still counts against the cap",
    )
    parser.add_argument(
        "--foreign-sandboxes",
        type=int,
        default=None,
        help="sandboxes other users of the account run (they count against the cap)",
    )
    parser.add_argument(
        "--storm",
        action="append",
        default=[],
        metavar="START_MS-END_MS",
        help="answer every create 429 in this window since the start, e.g. 2000-12000 (repeatable)",
    )
    parser.add_argument(
        "--capacity-should-retry",
        choices=["false", "true", "none"],
        default=None,
        help="Should-Retry header on the cap's 429 (none: no header)",
    )
    parser.add_argument(
        "--default-timeout-s",
        type=int,
        default=None,
        help="sandbox lifetime when a create names none",
    )
    parser.add_argument(
        "--max-timeout-s", type=int, default=None, help="longest sandbox lifetime accepted"
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="inject a fault, e.g. 503:p=0.1, 502+retry:n=3-6, "
        "reset:p=0.05:after-create, hang:n=2, malformed:p=0.1, "
        "slow-body:p=0.1:route=get (repeatable)",
    )
    parser.add_argument(
        "--hang-s", type=float, default=None, help="how long a hang fault holds the request"
    )
    parser.add_argument(
        "--slow-body-ms",
        type=float,
        default=None,
        help="how long a slow-body fault takes to send its body",
    )


def parse_storm(spec: str) -> Storm:
    """``START_MS-END_MS``, milliseconds since the mock started."""
    start, dash, end = spec.partition("-")
    if not dash:
        raise ValueError(f"a storm is START_MS-END_MS, got {spec!r}")
    return Storm(int(start), int(end))


def config_from_args(ns: argparse.Namespace) -> MockE2BConfig:
    """The config the parsed flags describe (raises ValueError on a bad fault or storm)."""
    changes = preset_changes(ns, "plan", PLANS, _FIELDS)
    if "api_key" not in changes:
        changes["api_key"] = os.environ.get("E2B_API_KEY") or MockE2BConfig().api_key
    should_retry = getattr(ns, "capacity_should_retry", None)
    if should_retry is not None:
        changes["capacity_should_retry"] = None if should_retry == "none" else should_retry
    changes["faults"] = tuple(parse_fault(spec) for spec in getattr(ns, "fault", None) or [])
    changes["storms"] = tuple(parse_storm(spec) for spec in getattr(ns, "storm", None) or [])
    return MockE2BConfig().replace(**changes)


def serve(config: MockE2BConfig, host: str = "127.0.0.1", port: int = 0) -> int:
    """Runs the mock until Ctrl-C or SIGTERM; prints its URL first. Returns the exit code."""

    def banner(url: str) -> list[str]:
        lines = [
            f"mock E2B listening on {url} (X-API-Key: {config.api_key})",
            f"control API: {url}/_mock/config, /_mock/stats, /_mock/reset",
        ]
        return lines

    return serve_until_signal(MockE2BServer(config, host=host, port=port), banner, "mock E2B")


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(
        argv,
        prog="mock-e2b",
        description=__doc__,
        add_arguments=add_arguments,
        config_from_args=config_from_args,
        serve=serve,
    )
