"""AdmissionConfig.from_config: documented defaults, and clear refusals of bad values."""

from __future__ import annotations

import pytest

from provisioner.config import AdmissionConfig
from provisioner.model import ProvisionerError


def test_defaults_match_the_documented_hobby_plan_values() -> None:
    # Catches: a default drifting from the documented E2B Hobby limits.
    config = AdmissionConfig.from_config({})
    assert config.create_slots == 4
    assert config.create_rate_per_s == 1.0
    assert config.max_sandboxes == 20
    assert config.max_sandboxes_per_tenant is None
    assert config.queue_timeout_ms == 1_800_000
    assert config.backoff_base_ms == 500
    assert config.backoff_cap_ms == 30_000
    assert config.create_lease_ms > 120_000  # outlives any invocation


def test_keys_are_read_and_seconds_are_converted() -> None:
    # Catches: seconds keys taken as milliseconds, or a key silently ignored.
    config = AdmissionConfig.from_config(
        {
            "create_slots": "5",
            "create_rate_per_s": "2.5",
            "max_sandboxes": "100",
            "max_sandboxes_per_tenant": "10",
            "queue_timeout_s": "60",
            "waiter_ttl_s": "30",
            "create_lease_s": "200",
            "unrelated": "x",
        }
    )
    assert config.create_slots == 5
    assert config.create_rate_per_s == 2.5
    assert config.max_sandboxes == 100
    assert config.max_sandboxes_per_tenant == 10
    assert config.queue_timeout_ms == 60_000
    assert config.waiter_ttl_ms == 30_000
    assert config.create_lease_ms == 200_000


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("create_slots", "four"),
        ("create_slots", "0"),
        ("create_slots", "-3"),
        ("create_slots", "2.5"),
        ("create_slots", "1e12"),
        ("create_rate_per_s", "0"),
        ("create_rate_per_s", "nan"),
        ("create_rate_per_s", "inf"),
        ("max_sandboxes", "-1"),
        ("max_sandboxes_per_tenant", "0"),
        ("queue_timeout_s", "0"),
        ("queue_timeout_s", "1e300"),
        ("backoff_cap_ms", "abc"),
    ],
)
def test_bad_values_raise_invalid_config_naming_the_key(key: str, value: str) -> None:
    # Catches: a bad value accepted (a zero slot count would block every waiter forever).
    with pytest.raises(ProvisionerError) as raised:
        AdmissionConfig.from_config({key: value})
    assert raised.value.failure.code == "invalid_config"
    assert raised.value.failure.retryable is False
    assert key in raised.value.failure.message


def test_inconsistent_values_are_refused() -> None:
    # Catches: a per-tenant cap above the account cap, or a base above the backoff cap.
    with pytest.raises(ProvisionerError):
        AdmissionConfig.from_config({"max_sandboxes": "5", "max_sandboxes_per_tenant": "6"})
    with pytest.raises(ProvisionerError):
        AdmissionConfig.from_config({"backoff_base_ms": "5000", "backoff_cap_ms": "1000"})
