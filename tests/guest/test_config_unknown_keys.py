"""An unknown key in the integration config is refused as invalid_config naming the nearest
known key, except Temper's and the shim's own keys (issue 26, point 7)."""

from __future__ import annotations

import pytest

from provisioner.config import FOREIGN_KEYS, KEYS_BY_NAME, read_config
from provisioner.failures import FailureCode
from provisioner.model import ProvisionerError


@pytest.mark.parametrize(
    ("key", "nearest"),
    [("create_slot", "create_slots"), ("max_sandbox", "max_sandboxes"),
     ("queue_timout_s", "queue_timeout_s"), ("provisioner_urll", "provisioner_url")],
)  # fmt: skip
def test_a_misspelt_key_is_refused_naming_the_nearest_known_one(key: str, nearest: str) -> None:
    with pytest.raises(ProvisionerError) as refused:
        read_config({key: "4"})
    assert refused.value.failure.code == FailureCode.INVALID_CONFIG
    assert f"unknown config key {key!r}; did you mean {nearest!r}?" in refused.value.failure.message


def test_a_key_like_nothing_known_is_refused_without_a_guess() -> None:
    with pytest.raises(ProvisionerError) as refused:
        read_config({"zzzz": "1"})
    assert "did you mean" not in refused.value.failure.message


def test_temper_and_shim_keys_and_every_known_key_are_accepted() -> None:
    assert {"timeout_secs", "max_fuel", "max_memory", "max_response_bytes"} <= FOREIGN_KEYS
    assert {"provisioner_url", "provisioner_token"} <= FOREIGN_KEYS
    read_config({key: "" for key in FOREIGN_KEYS})
    for key in KEYS_BY_NAME:
        try:
            read_config({key: ""})
        except ProvisionerError as refused:  # a blank value some keys refuse: not unknown
            assert "unknown config key" not in refused.failure.message, key
    read_config({"operation": "release", "resource": "", "granted_action": "A"})
