"""Command line of the mock: ``sandbox-provisioner mock-llm`` (or
``python -m harness.mocks.llm``)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from harness.mocks.llm.config import TIERS, MockLLMConfig
from harness.mocks.llm.server import MockLLMServer
from harness.mocks.shared.cli import (
    add_listen_arguments,
    preset_changes,
    run_command,
    serve_until_signal,
)

# flag destination -> config field, for flags that map one to one.
_FIELDS = {
    "seed": "seed",
    "rpm": "rpm",
    "itpm": "itpm",
    "otpm": "otpm",
    "rpm_burst": "rpm_burst",
    "itpm_burst": "itpm_burst",
    "otpm_burst": "otpm_burst",
    "token_remaining_rounding": "token_remaining_rounding",
    "latency_ms": "latency_ms",
    "latency_max_ms": "latency_max_ms",
    "output_tokens": "output_tokens",
    "output_tokens_max": "output_tokens_max",
    "overload_probability": "overload_probability",
    "overload_retry_after_s": "overload_retry_after_s",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the mock's flags; every flag left out keeps the permissive default."""
    add_listen_arguments(parser)
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accepted x-api-key, each with its own limits (repeatable; "
        "default: $ANTHROPIC_API_KEY, else sk-ant-mock)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of latency, output tokens, overload and ids"
    )
    parser.add_argument(
        "--tier",
        choices=sorted(TIERS),
        default=None,
        help="a usage tier's limits (tier1: 50 RPM, 30k ITPM, 8k OTPM); explicit flags win",
    )
    parser.add_argument("--rpm", type=int, default=None, help="requests per minute per key")
    parser.add_argument(
        "--itpm",
        type=int,
        default=None,
        help="input tokens per minute per key (estimated: 4 chars a token)",
    )
    parser.add_argument(
        "--otpm",
        type=int,
        default=None,
        help="output tokens per minute per key (charged after the answer)",
    )
    parser.add_argument(
        "--rpm-burst",
        type=int,
        default=None,
        help="requests the bucket holds (default: the whole RPM)",
    )
    parser.add_argument(
        "--itpm-burst",
        type=int,
        default=None,
        help="input tokens the bucket holds (default: the whole ITPM)",
    )
    parser.add_argument(
        "--otpm-burst",
        type=int,
        default=None,
        help="output tokens the bucket holds (default: the whole OTPM)",
    )
    parser.add_argument(
        "--token-remaining-rounding",
        type=int,
        default=None,
        help="round token -remaining headers to this (Anthropic: 1000)",
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=None,
        help="time to answer (the minimum, with --latency-max-ms)",
    )
    parser.add_argument(
        "--latency-max-ms",
        type=float,
        default=None,
        help="draw the latency uniformly up to this (seeded)",
    )
    parser.add_argument(
        "--output-tokens",
        type=int,
        default=None,
        help="output tokens of an answer (the minimum, with --output-tokens-max)",
    )
    parser.add_argument(
        "--output-tokens-max",
        type=int,
        default=None,
        help="draw the output tokens uniformly up to this (seeded)",
    )
    parser.add_argument(
        "--overloaded", action="store_true", help="answer every request 529 overloaded_error"
    )
    parser.add_argument(
        "--overload-probability",
        type=float,
        default=None,
        help="answer this fraction of requests 529 (seeded)",
    )
    parser.add_argument(
        "--overload-requests",
        default=None,
        metavar="N-M",
        help="answer requests N to M 529 (N-: from N on; N: just N)",
    )
    parser.add_argument(
        "--overload-retry-after-s",
        type=float,
        default=None,
        help="retry-after header of a 529 (default: none)",
    )


def config_from_args(ns: argparse.Namespace) -> MockLLMConfig:
    """The config the parsed flags describe (raises ValueError on a bad value)."""
    changes = preset_changes(ns, "tier", TIERS, _FIELDS)
    keys = list(getattr(ns, "api_key", None) or [])
    if not keys and os.environ.get("ANTHROPIC_API_KEY"):
        keys = [os.environ["ANTHROPIC_API_KEY"]]
    if keys:
        changes["api_keys"] = tuple(keys)
    if getattr(ns, "overloaded", False):
        changes["overloaded"] = True
    span = getattr(ns, "overload_requests", None)
    if span is not None:
        lo, dash, hi = span.partition("-")
        try:
            changes["overload_first"] = int(lo)
            changes["overload_last"] = (int(hi) if hi else None) if dash else int(lo)
        except ValueError:
            raise ValueError(f"--overload-requests wants N-M, N- or N, got {span!r}") from None
    return MockLLMConfig().replace(**changes)


def serve(config: MockLLMConfig, host: str = "127.0.0.1", port: int = 0) -> int:
    """Runs the mock until Ctrl-C or SIGTERM; prints its URL first. Returns the exit code."""

    def banner(url: str) -> list[str]:
        keys = ", ".join(config.api_keys)
        return [
            f"mock LLM API listening on {url} (x-api-key: {keys})",
            f"control API: {url}/_mock/config, /_mock/stats, /_mock/requests, /_mock/reset",
        ]

    return serve_until_signal(MockLLMServer(config, host=host, port=port), banner, "mock LLM API")


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(
        argv,
        prog="mock-llm",
        description=__doc__,
        add_arguments=add_arguments,
        config_from_args=config_from_args,
        serve=serve,
    )
