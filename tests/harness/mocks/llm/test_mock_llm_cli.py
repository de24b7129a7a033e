"""`sandbox-provisioner mock-llm`: the flags make the config, and a real process serves."""

from __future__ import annotations

import signal

import httpx
import pytest

from harness.cli.main import build_parser
from harness.mocks.llm import TIERS, MockLLMConfig
from harness.mocks.llm.cli import config_from_args
from tests.harness.command_server import command_server


def config_of(*flags: str) -> MockLLMConfig:
    return config_from_args(build_parser().parse_args(["mock-llm", *flags]))


def test_flags_make_the_config() -> None:
    config = config_of(
        "--api-key",
        "k1",
        "--api-key",
        "k2",
        "--tier",
        "tier1",
        "--otpm",
        "99",
        "--rpm-burst",
        "2",
        "--latency-ms",
        "5",
        "--latency-max-ms",
        "9",
        "--output-tokens",
        "3",
        "--output-tokens-max",
        "7",
        "--overload-requests",
        "4-6",
        "--overload-retry-after-s",
        "2",
        "--token-remaining-rounding",
        "1000",
        "--seed",
        "5",
    )
    assert config == config_of().replace(
        api_keys=("k1", "k2"),
        rpm=TIERS["tier1"]["rpm"],
        itpm=TIERS["tier1"]["itpm"],
        otpm=99,
        rpm_burst=2,
        latency_ms=5.0,
        latency_max_ms=9.0,
        output_tokens=3,
        output_tokens_max=7,
        overload_first=4,
        overload_last=6,
        overload_retry_after_s=2.0,
        token_remaining_rounding=1000,
        seed=5,
    )
    assert config_of("--overload-requests", "3-").overload_last is None
    assert config_of("--overloaded").overloaded


def test_bad_flags_are_refused() -> None:
    with pytest.raises(ValueError, match="overload-requests"):
        config_of("--overload-requests", "x-y")
    with pytest.raises(ValueError, match="rpm"):
        config_of("--rpm", "0")


def test_the_command_serves_until_sigterm() -> None:
    with command_server(
        "harness.cli", "mock-llm", "--port", "0", "--api-key", "K", "--rpm", "1"
    ) as (process, url):
        body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
        headers = {"x-api-key": "K", "anthropic-version": "2023-06-01"}
        ok = httpx.post(f"{url}/v1/messages", json=body, headers=headers, timeout=30)
        limited = httpx.post(f"{url}/v1/messages", json=body, headers=headers, timeout=30)
        assert ok.status_code == 200
        assert limited.status_code == 429
        # One request a minute, and the first was just spent.
        assert 58 <= int(limited.headers["retry-after"]) <= 60
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
