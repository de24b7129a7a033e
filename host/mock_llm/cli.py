"""Command line of the mock: ``sandbox-provisioner mock-llm`` (or ``python -m host.mock_llm``)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from host.mock_llm.config import TIERS, MockLLMConfig
from host.mock_llm.server import MockLLMServer

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
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (0: any free port)")
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY",
                        help="accepted x-api-key, each with its own limits (repeatable; "
                             "default: $ANTHROPIC_API_KEY, else sk-ant-mock)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of latency, output tokens, overload and ids")
    parser.add_argument("--tier", choices=sorted(TIERS), default=None,
                        help="a usage tier's limits (tier1: 50 RPM, 30k ITPM, 8k OTPM); "
                             "explicit flags win")
    parser.add_argument("--rpm", type=int, default=None, help="requests per minute per key")
    parser.add_argument("--itpm", type=int, default=None,
                        help="input tokens per minute per key (estimated: 4 chars a token)")
    parser.add_argument("--otpm", type=int, default=None,
                        help="output tokens per minute per key (charged after the answer)")
    parser.add_argument("--rpm-burst", type=int, default=None,
                        help="requests the bucket holds (default: the whole RPM)")
    parser.add_argument("--itpm-burst", type=int, default=None,
                        help="input tokens the bucket holds (default: the whole ITPM)")
    parser.add_argument("--otpm-burst", type=int, default=None,
                        help="output tokens the bucket holds (default: the whole OTPM)")
    parser.add_argument("--token-remaining-rounding", type=int, default=None,
                        help="round token -remaining headers to this (Anthropic: 1000)")
    parser.add_argument("--latency-ms", type=float, default=None,
                        help="time to answer (the minimum, with --latency-max-ms)")
    parser.add_argument("--latency-max-ms", type=float, default=None,
                        help="draw the latency uniformly up to this (seeded)")
    parser.add_argument("--output-tokens", type=int, default=None,
                        help="output tokens of an answer (the minimum, with --output-tokens-max)")
    parser.add_argument("--output-tokens-max", type=int, default=None,
                        help="draw the output tokens uniformly up to this (seeded)")
    parser.add_argument("--overloaded", action="store_true",
                        help="answer every request 529 overloaded_error")
    parser.add_argument("--overload-probability", type=float, default=None,
                        help="answer this fraction of requests 529 (seeded)")
    parser.add_argument("--overload-requests", default=None, metavar="N-M",
                        help="answer requests N to M 529 (N-: from N on; N: just N)")
    parser.add_argument("--overload-retry-after-s", type=float, default=None,
                        help="retry-after header of a 529 (default: none)")


def config_from_args(ns: argparse.Namespace) -> MockLLMConfig:
    """The config the parsed flags describe (raises ValueError on a bad value)."""
    changes: dict[str, Any] = {}
    tier = getattr(ns, "tier", None)
    if tier is not None:
        changes.update(TIERS[tier])
    for dest, name in _FIELDS.items():
        value = getattr(ns, dest, None)
        if value is not None:
            changes[name] = value
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
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    in_main = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_signal)
    try:
        with MockLLMServer(config, host=host, port=port) as server:
            keys = ", ".join(config.api_keys)
            print(f"mock LLM API listening on {server.url} (x-api-key: {keys})", flush=True)
            print(f"control API: {server.url}/_mock/config, /_mock/stats, /_mock/requests, "
                  "/_mock/reset", flush=True)
            while not stop.wait(0.5):
                pass
        return 0
    except OSError as exc:
        print(f"mock LLM API could not start: {exc}", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mock-llm", description=__doc__)
    add_arguments(parser)
    ns = parser.parse_args(argv)
    try:
        config = config_from_args(ns)
    except ValueError as exc:
        parser.error(str(exc))
    return serve(config, ns.host, ns.port)
