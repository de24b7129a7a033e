"""The mock E2B server's parts on their own: GCRA, fault rules, latency, config, CLI."""

from __future__ import annotations

import argparse
import signal

import httpx
import pytest

from harness.mocks.e2b import FaultRule, MockE2BConfig, parse_fault
from harness.mocks.e2b.cli import add_arguments, config_from_args
from harness.mocks.e2b.config import Storm
from harness.mocks.e2b.faults import FaultPicker
from harness.mocks.e2b.latency import LatencySampler
from harness.mocks.e2b.limits import Gcra
from tests.harness.command_server import command_server


def test_gcra_allows_the_burst_then_rejects_until_one_interval_has_passed() -> None:
    # Catches a limiter that forgets the burst, never refills, or refills too early.
    gcra = Gcra(rate_per_s=2.0, burst=3)
    decisions = [gcra.take(100.0) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions[:3]] == [2, 1, 0]
    rejected = decisions[3]
    assert rejected.retry_after_s == pytest.approx(0.5)
    assert rejected.headers()["Retry-After"] == "1"
    assert rejected.headers()["RateLimit-Limit"] == "3"
    assert rejected.headers()["RateLimit-Remaining"] == "0"
    assert rejected.headers()["RateLimit-Reset"] == "2"
    assert not gcra.take(100.49).allowed
    assert gcra.take(100.5).allowed
    assert not gcra.take(100.5).allowed


def test_gcra_sustains_exactly_its_rate() -> None:
    # Catches a drifting emission interval: 1 create/s over 100 s admits 100 (+burst).
    gcra = Gcra(rate_per_s=1.0, burst=1)
    allowed = sum(gcra.take(t / 10).allowed for t in range(1000))
    assert allowed == 100


def test_parse_fault_reads_every_form() -> None:
    # Catches a CLI fault string that silently means something else.
    assert parse_fault("503+retry:n=3-6") == FaultRule(
        kind="status", status=503, should_retry=True, first=3, last=6
    )
    assert parse_fault("502-noretry:p=0.25") == FaultRule(
        status=502, should_retry=False, probability=0.25
    )
    assert parse_fault("500:n=4") == FaultRule(status=500, first=4, last=4)
    assert parse_fault("reset:n=2-:after-create") == FaultRule(
        kind="reset", first=2, last=None, after_create=True
    )
    assert parse_fault("slow-body:p=1:route=get").kind == "slow_body"
    assert parse_fault("malformed:p=0.5").kind == "malformed_json"
    assert parse_fault("hang:n=1").kind == "hang"
    for bad in ("teapot:p=1", "503", "503:p=2", "503:n=6-3", "503:x=1", "reset:route=nowhere:p=1"):
        with pytest.raises(ValueError):
            parse_fault(bad)


def test_fault_schedule_fires_exactly_on_its_requests() -> None:
    # Catches an off-by-one in "creates 3 to 6 fail".
    picker = FaultPicker(seed=1)
    rules = [parse_fault("503:n=3-6")]
    fired = [n for n in range(1, 10) if picker.pick(rules, "create", n, after_create=False)]
    assert fired == [3, 4, 5, 6]
    assert picker.pick(rules, "kill", 4, after_create=False) is None
    assert picker.pick(rules, "create", 4, after_create=True) is None


def test_fault_probability_is_reproducible_from_the_seed() -> None:
    # Catches fault draws taken from an unseeded or shared random stream.
    rules = [parse_fault("502:p=0.3")]

    def run(seed: int) -> list[bool]:
        picker = FaultPicker(seed)
        return [picker.pick(rules, "create", n, False) is not None for n in range(1, 401)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert 80 <= sum(run(7)) <= 160


def test_latency_is_seeded_capped_and_fixed_without_spread() -> None:
    # Catches an unseeded latency stream or an ignored ceiling.
    first = [LatencySampler(3).sample_ms(100, 0.5, 250) for _ in range(1)]
    a, b = LatencySampler(3), LatencySampler(3)
    draws_a = [a.sample_ms(100, 0.5, 250) for _ in range(200)]
    draws_b = [b.sample_ms(100, 0.5, 250) for _ in range(200)]
    assert draws_a == draws_b
    assert draws_a[0] == first[0]
    assert max(draws_a) == 250
    assert min(draws_a) < 100 < max(draws_a)
    assert LatencySampler(3).sample_ms(40, 0.0, None) == 40
    assert LatencySampler(3).sample_ms(0, 1.0, None) == 0


def test_config_defaults_are_permissive_and_bad_values_are_refused() -> None:
    # Catches defaults that would throttle a plain MockE2BConfig(api_key="k").
    config = MockE2BConfig(api_key="k")
    assert config.max_sandboxes is None
    assert config.max_concurrent_creates is None
    assert config.create_rate_per_s is None
    assert config.create_latency_ms == 0
    assert config.faults == ()
    for bad in (
        {"api_key": ""},
        {"create_rate_per_s": 0},
        {"create_burst": 0},
        {"max_sandboxes": -1},
        {"create_overload_mode": "drop"},
        {"default_timeout_s": 0},
        {"create_latency_ms": -1},
    ):
        with pytest.raises(ValueError):
            MockE2BConfig(**bad)
    with pytest.raises(ValueError):
        config.replace(no_such_field=1)


def test_config_round_trips_through_json_with_faults_in_any_form() -> None:
    # Catches a control API that loses or mangles fault rules.
    config = MockE2BConfig(
        api_key="k",
        max_sandboxes=20,
        faults=("503+retry:n=3-6", {"kind": "reset", "probability": 0.1}),  # type: ignore[arg-type]
    )
    assert config.faults == (
        FaultRule(status=503, should_retry=True, first=3, last=6),
        FaultRule(kind="reset", probability=0.1),
    )
    assert MockE2BConfig.from_json(config.to_json()) == config


def test_cli_flags_build_the_config_and_explicit_flags_beat_the_plan() -> None:
    # Catches a flag that is parsed but never reaches the config.
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(
        [
            "--plan",
            "hobby",
            "--max-sandboxes",
            "5",
            "--api-key",
            "e2b_x",
            "--seed",
            "9",
            "--create-latency-ms",
            "250",
            "--create-latency-sigma",
            "0.3",
            "--max-concurrent-creates",
            "4",
            "--create-overload",
            "slow",
            "--create-overload-timeout-ms",
            "30000",
            "--kill-capacity-lag-ms",
            "2000",
            "--capacity-should-retry",
            "none",
            "--fault",
            "503:n=3-6",
            "--fault",
            "reset:p=0.1",
            "--create-latency-jitter-ms",
            "40",
            "--foreign-sandboxes",
            "2",
            "--storm",
            "2000-12000",
            "--port",
            "0",
        ]
    )
    config = config_from_args(ns)
    assert config.max_sandboxes == 5
    assert config.create_rate_per_s == 1.0
    assert config.api_key == "e2b_x"
    assert config.seed == 9
    assert config.create_latency_ms == 250
    assert config.create_latency_sigma == 0.3
    assert config.max_concurrent_creates == 4
    assert config.create_overload_mode == "slow"
    assert config.create_overload_timeout_ms == 30000
    assert config.kill_capacity_lag_ms == 2000
    assert config.capacity_should_retry is None
    assert config.faults == (parse_fault("503:n=3-6"), parse_fault("reset:p=0.1"))
    assert config.create_latency_jitter_ms == 40
    assert config.foreign_sandboxes == 2
    assert config.storms == (Storm(2_000, 12_000),)
    assert MockE2BConfig.for_plan("hobby", api_key="e2b_x", max_sandboxes=5) == (
        config.replace(
            create_latency_ms=0.0,
            create_latency_sigma=0.0,
            seed=0,
            max_concurrent_creates=None,
            create_overload_mode="reject",
            create_overload_timeout_ms=None,
            kill_capacity_lag_ms=0.0,
            capacity_should_retry="false",
            faults=(),
            create_latency_jitter_ms=0.0,
            foreign_sandboxes=0,
            storms=(),
        )
    )
    plain = config_from_args(parser.parse_args(["--api-key", "k"]))
    assert plain == MockE2BConfig(api_key="k")


def test_cli_serves_until_sigterm_and_exits_cleanly() -> None:
    # Catches a serve() that ignores SIGTERM, never prints its URL, or exits non-zero.
    with command_server("harness.mocks.e2b", "--api-key", "k", "--max-sandboxes", "3") as (
        proc,
        url,
    ):
        stats = httpx.get(f"{url}/_mock/stats", timeout=5).json()
        assert stats["sandboxes_created"] == 0
        assert httpx.get(f"{url}/_mock/config", timeout=5).json()["max_sandboxes"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
