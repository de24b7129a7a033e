"""The reader's rules, the same for every row of `KEYS`: spellings and their precedence,
units, blanks, nullable counts, and gates whose keys are all blank."""

from __future__ import annotations

import pytest

from provisioner.config import ACCOUNT, TENANT, read_config
from provisioner.model import ProvisionerError


def refused(config: dict[str, str]) -> str:
    with pytest.raises(ProvisionerError) as raised:
        read_config(config)
    assert raised.value.failure.code == "invalid_config"
    return raised.value.failure.message


@pytest.mark.parametrize(
    "config",
    [
        {"queue_timeout_ms": "5000", "queue_timeout_s": "7", "queue_timeout_seconds": "9"},
        {"queue_timeout_seconds": "9", "queue_timeout_s": "7", "queue_timeout_ms": "5000"},
    ],
)
def test_the_key_wins_over_its_aliases_whatever_the_config_order(config: dict[str, str]) -> None:
    # Catches: the last spelling in config order winning (the reader iterating the config
    # rather than the row's names), which made the outcome depend on the map's order.
    assert read_config(config).admission.queue_timeout_ms == 7_000
    without_key = {k: v for k, v in config.items() if k != "queue_timeout_s"}
    assert read_config(without_key).admission.queue_timeout_ms == 5_000
    pair = {"e2b_template_id": "old", "template_id": "new"}
    assert read_config(pair).sandbox.template_id == "new"
    assert read_config({"e2b_template_id": "old"}).sandbox.template_id == "old"


def test_a_spelling_that_loses_is_still_validated() -> None:
    # Catches: only the winning spelling parsed, so a bad value passes unnoticed.
    assert "e2b_template_id" in refused({"template_id": "base", "e2b_template_id": "../x"})
    assert "queue_timeout_ms" in refused({"queue_timeout_s": "5", "queue_timeout_ms": "-1"})


def test_seconds_may_be_fractional_and_milliseconds_are_integers() -> None:
    # Catches: a `_ms` spelling scaled by 1000, or a seconds value truncated to whole seconds.
    admission = read_config(
        {"waiter_ttl_s": "1.5", "create_lease_ms": "2500", "create_timeout_ms": "1000"}
    ).admission
    assert (admission.waiter_ttl_ms, admission.create_lease_ms) == (1_500, 2_500)
    assert read_config({"queue_timeout_s": "0.0001"}).admission.queue_timeout_ms == 1
    assert "integer" in refused({"waiter_ttl_ms": "1.5"})
    gate = read_config({"resource.llm.concurrency": "1", "resource.llm.lease_s": "2.5"})
    assert gate.resources["llm"].lease_ms == 2_500
    assert "at most 86400000" in refused({"resource.llm.rpm": "1", "resource.llm.lease_ms": "1e9"})


def test_a_blank_value_is_the_default_except_where_the_key_refuses_it() -> None:
    # Catches: a blank number parsed (and refused), or a blank API URL taken as the default.
    assert read_config({"create_slots": " ", "template_id": "x"}).admission.create_slots == 4
    assert "e2b_api_url" in refused({"e2b_api_url": " "})


@pytest.mark.parametrize("word", ["none", "Unlimited", "off", "null"])
def test_a_nullable_count_takes_the_words_for_no_limit(word: str) -> None:
    # Catches: the words refused as non-numbers, or read as a limit.
    config = {"max_sandboxes_per_tenant": word}
    assert read_config(config).admission.max_sandboxes_per_tenant is None
    assert "max_sandboxes" in refused({"max_sandboxes": word})


def test_a_gate_whose_keys_are_all_blank_is_not_declared() -> None:
    # Catches: a blank key declaring a gate with no limit (refused as declaring no limit).
    read = read_config({"resource.llm.rpm": "", "resource.sessions.tenant_concurrency": "2"})
    assert list(read.resources) == ["sessions"]
    gate = read.resources["sessions"]
    assert gate.permits(TENANT) == 2 and gate.permits(ACCOUNT) is None


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"backoff_cap_ms": "100"}, "backoff_base_ms must not exceed backoff_cap_ms"),
        ({"poll_max_ms": "100"}, "poll_min_ms must not exceed poll_max_ms"),
    ],
)
def test_a_bound_set_below_the_default_it_bounds_is_refused(
    config: dict[str, str], fragment: str
) -> None:
    # Catches: relations checked only when the bounded key itself is set, so a cap below
    # the default base (500 ms) would pass and the backoff would exceed its own cap.
    assert fragment in refused(config)


@pytest.mark.parametrize(
    "config",
    [
        {"create_lease_ms": "10000"},
        {"create_lease_ms": "30000", "create_timeout_ms": "30000"},
        {"create_timeout_ms": "110000", "create_lease_ms": "100000"},
    ],
)
def test_a_create_lease_no_longer_than_a_create_request_is_refused(config: dict[str, str]) -> None:
    # Catches: a create slot's lease that can end while its request is still in flight (a late
    # Created answer could then find the entity granted a second create).
    with pytest.raises(ProvisionerError) as raised:
        read_config(config)
    assert raised.value.failure.code == "invalid_config"
    message = raised.value.failure.message
    assert "create_lease_s" in message and "create_timeout_ms" in message, message
    assert read_config({**config, "create_lease_ms": "120000"}).admission.create_lease_ms == 120_000
