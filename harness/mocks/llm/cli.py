"""Command line of the mock: ``sandbox-provisioner mock-llm`` (or
``python -m harness.mocks.llm``)."""

from __future__ import annotations

import argparse
import os

from harness.mocks.llm.config import TIERS, MockLLMConfig
from harness.mocks.llm.server import MockLLMServer
from harness.mocks.shared.cli import ConfigFlags, serve_until_signal

_FLAG_HELP = {
    "--seed": "seed of latency, output tokens, overload and ids",
    "--rpm": "requests per minute per key",
    "--itpm": "input tokens per minute per key (estimated: 4 chars a token)",
    "--otpm": "output tokens per minute per key (charged after the answer)",
    "--rpm-burst": "requests the bucket holds (default: the whole RPM)",
    "--itpm-burst": "input tokens the bucket holds (default: the whole ITPM)",
    "--otpm-burst": "output tokens the bucket holds (default: the whole OTPM)",
    "--token-remaining-rounding": "round token -remaining headers to this (Anthropic: 1000)",
    "--latency-ms": "time to answer (the minimum, with --latency-max-ms)",
    "--latency-max-ms": "draw the latency uniformly up to this (seeded)",
    "--output-tokens": "output tokens of an answer (the minimum, with --output-tokens-max)",
    "--output-tokens-max": "draw the output tokens uniformly up to this (seeded)",
    "--overload-probability": "answer this fraction of requests 529 (seeded)",
    "--overload-retry-after-s": "retry-after header of a 529 (default: none)",
}
_CONFIG_FLAGS = ConfigFlags(
    MockLLMConfig,
    "--tier",
    TIERS,
    "a usage tier's limits (tier1: 50 RPM, 30k ITPM, 8k OTPM); explicit flags win",
    _FLAG_HELP,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the mock's flags; every flag left out keeps the permissive default."""
    _CONFIG_FLAGS.add_to(parser)
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accepted x-api-key, each with its own limits (repeatable; "
        "default: $ANTHROPIC_API_KEY, else sk-ant-mock)",
    )
    parser.add_argument(
        "--overloaded", action="store_true", help="answer every request 529 overloaded_error"
    )
    parser.add_argument(
        "--overload-requests",
        default=None,
        metavar="N-M",
        help="answer requests N to M 529 (N-: from N on; N: just N)",
    )


def config_from_args(ns: argparse.Namespace) -> MockLLMConfig:
    """The config the parsed flags describe (raises ValueError on a bad value)."""
    changes = _CONFIG_FLAGS.changes(ns)
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
