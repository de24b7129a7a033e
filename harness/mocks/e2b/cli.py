"""Command line of the mock: ``sandbox-provisioner mock-e2b`` (or
``python -m harness.mocks.e2b``)."""

from __future__ import annotations

import argparse
import os

from harness.mocks.e2b.config import PLANS, MockE2BConfig, Storm, parse_fault
from harness.mocks.e2b.server import MockE2BServer
from harness.mocks.shared.cli import ConfigFlags, serve_until_signal

_FLAG_HELP = {
    "--api-key": "accepted X-API-Key (default: $E2B_API_KEY, else e2b_mock_key)",
    "--seed": "seed of latency, faults, ids",
    "--create-latency-ms": "median create latency",
    "--create-latency-sigma": "lognormal spread of the create latency (0: fixed)",
    "--create-latency-max-ms": "ceiling of the create latency",
    "--create-latency-jitter-ms": "uniform jitter added to each create's latency",
    "--create-rate": "route rate limit, creates per second (GCRA)",
    "--create-burst": "creates allowed at once by the rate limiter",
    "--max-concurrent-creates": "create requests in flight at once",
    "--create-overload": "past the concurrent-create cap: 429 (reject) or wait (slow)",
    "--create-overload-timeout-ms": "in slow mode, answer 504 after waiting this long for a slot",
    "--max-sandboxes": "concurrent sandboxes (the cap's 429 has no Retry-After)",
    "--kill-capacity-lag-ms": "how long a killed sandbox still counts against the cap",
    "--foreign-sandboxes": "sandboxes other users of the account run (they count against the cap)",
    "--default-timeout-s": "sandbox lifetime when a create names none",
    "--max-timeout-s": "longest sandbox lifetime accepted",
    "--hang-s": "how long a hang fault holds the request",
    "--slow-body-ms": "how long a slow-body fault takes to send its body",
}
_CONFIG_FLAGS = ConfigFlags(
    MockE2BConfig,
    "--plan",
    PLANS,
    "E2B plan limits (hobby: 20 sandboxes, 1 create/s; pro: 100, 5/s); explicit flags win",
    _FLAG_HELP,
    renamed={
        "--create-rate": "create_rate_per_s",
        "--create-overload": "create_overload_mode",
    },
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the mock's flags; every flag left out keeps the permissive default."""
    _CONFIG_FLAGS.add_to(parser)
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
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="inject a fault, e.g. 503:p=0.1, 502+retry:n=3-6, "
        "reset:p=0.05:after-create, hang:n=2, malformed:p=0.1, "
        "slow-body:p=0.1:route=get (repeatable)",
    )


def parse_storm(spec: str) -> Storm:
    """``START_MS-END_MS``, milliseconds since the mock started."""
    start, dash, end = spec.partition("-")
    if not dash:
        raise ValueError(f"a storm is START_MS-END_MS, got {spec!r}")
    return Storm(int(start), int(end))


def config_from_args(ns: argparse.Namespace) -> MockE2BConfig:
    """The config the parsed flags describe (raises ValueError on a bad fault or storm)."""
    changes = _CONFIG_FLAGS.changes(ns)
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
