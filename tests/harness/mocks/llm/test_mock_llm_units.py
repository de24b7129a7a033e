"""The mock LLM API's pieces without a server: the bucket, the estimate, the config."""

from __future__ import annotations

from typing import Any

import pytest

from harness.mocks.llm import TIERS, MockLLMConfig
from harness.mocks.llm.limits import TokenBucket
from harness.mocks.llm.wire import BadRequest, estimate_tokens, parse_messages_request


def test_bucket_starts_full_and_refills_continuously_up_to_its_capacity() -> None:
    bucket = TokenBucket(60, None, now=0.0)  # 1 a second, holds 60
    assert bucket.level(0.0) == 60
    bucket.charge(60, 0.0)
    assert bucket.level(0.5) == pytest.approx(0.5)
    assert bucket.level(30.0) == pytest.approx(30.0)
    assert bucket.level(500.0) == 60  # never past the capacity
    assert bucket.until_full(500.0) == 0


def test_bucket_debt_delays_admission_by_the_whole_debt() -> None:
    # A cost known only afterwards is charged in full: 100 from a bucket of 60 is -40,
    # and one unit is admitted again only after 41 s at 1/s, not after 1 s.
    bucket = TokenBucket(60, None, now=0.0)
    bucket.charge(100, 0.0)
    assert bucket.level(0.0) == -40
    assert bucket.remaining(0.0) == 0
    assert bucket.wait_for(1, 0.0) == pytest.approx(41.0)
    assert bucket.until_full(0.0) == pytest.approx(100.0)
    assert not bucket.admits(1, 40.0)
    assert bucket.admits(1, 41.0)


def test_bucket_burst_caps_what_it_holds() -> None:
    bucket = TokenBucket(30, 1, now=0.0)  # 30/min = one per 2 s, holds one
    assert bucket.admits(1, 0.0)
    bucket.charge(1, 0.0)
    assert bucket.wait_for(1, 0.0) == pytest.approx(2.0)
    assert bucket.level(100.0) == 1


def test_a_need_larger_than_the_bucket_waits_for_a_full_bucket_then_goes_into_debt() -> None:
    bucket = TokenBucket(100, None, now=0.0)
    bucket.charge(10, 0.0)
    assert not bucket.admits(250, 0.0)
    assert bucket.wait_for(250, 0.0) == pytest.approx(10 / (100 / 60))
    assert bucket.admits(250, 6.0)
    bucket.charge(250, 6.0)
    assert bucket.level(6.0) == pytest.approx(-150)


def test_bucket_refill_arithmetic_is_exact_at_the_boundary() -> None:
    # 20 s at 3/min refills exactly one request, despite float error in 3/60.
    bucket = TokenBucket(3, None, now=0.0)
    bucket.charge(3, 0.0)
    assert not bucket.admits(1, 19.999)
    assert bucket.admits(1, 20.0)


def test_input_tokens_are_four_characters_each_rounded_up() -> None:
    assert estimate_tokens(0) == 1
    assert estimate_tokens(4) == 1
    assert estimate_tokens(5) == 2
    assert estimate_tokens(400) == 100
    request = parse_messages_request(
        {
            "model": "m",
            "max_tokens": 5,
            "system": [{"type": "text", "text": "x" * 8}],
            "messages": [
                {"role": "user", "content": "y" * 10},
                {"role": "assistant", "content": [{"type": "text", "text": "z" * 6}]},
            ],
        }
    )
    assert request.input_tokens == 6  # 24 characters
    assert (request.model, request.max_tokens) == ("m", 5)


def test_non_text_blocks_count_by_their_json() -> None:
    block = {"type": "tool_result", "tool_use_id": "t1", "content": "ok"}
    with_block = parse_messages_request(
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": [block]}],
        }
    )
    assert with_block.input_tokens == estimate_tokens(
        len('{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}')
    )


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ([], "JSON object"),
        ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        (
            {"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
            "max_tokens",
        ),
        (
            {"model": "m", "max_tokens": True, "messages": [{"role": "user", "content": "x"}]},
            "max_tokens",
        ),
        ({"model": "m", "max_tokens": 5, "messages": []}, "messages"),
        (
            {"model": "m", "max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]},
            "messages.0.role",
        ),
        (
            {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": 3}]},
            "messages.0.content",
        ),
        (
            {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{}]}]},
            "messages.0.content.0",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
                "system": [{"type": "image"}],
            },
            "system.0.type",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
                "stream": True,
            },
            "does not stream",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
                "stream": "yes",
            },
            "boolean",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
                "temprature": 1,
            },
            "temprature: Extra inputs",
        ),
    ],
)
def test_malformed_requests_are_refused_with_the_field_named(body: Any, fragment: str) -> None:
    with pytest.raises(BadRequest, match=fragment):
        parse_messages_request(body)


@pytest.mark.parametrize(
    "changes",
    [
        {"api_keys": ()},
        {"api_keys": ("",)},
        {"api_keys": "k"},
        {"rpm": 0},
        {"itpm_burst": 0},
        {"latency_ms": -1},
        {"latency_ms": 10, "latency_max_ms": 5},
        {"output_tokens": 0},
        {"output_tokens": 10, "output_tokens_max": 5},
        {"overload_probability": 1.5},
        {"overload_first": 0},
        {"overload_first": 5, "overload_last": 4},
        {"overload_retry_after_s": 0},
        {"token_remaining_rounding": 0},
        {"no_such_field": 1},
    ],
)
def test_bad_config_is_refused(changes: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        MockLLMConfig().replace(**changes)


def test_config_round_trips_through_json_and_tiers_set_the_limits() -> None:
    config = MockLLMConfig.for_tier("tier1", api_keys=("a", "b"), seed=3, otpm=100)
    assert (config.rpm, config.itpm, config.otpm) == (
        TIERS["tier1"]["rpm"],
        TIERS["tier1"]["itpm"],
        100,
    )
    assert MockLLMConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown tier"):
        MockLLMConfig.for_tier("tier9")


def test_overload_schedule_covers_its_span_only() -> None:
    config = MockLLMConfig(overload_first=2, overload_last=3)
    assert [config.overload_scheduled_for(n) for n in range(1, 5)] == [False, True, True, False]
    open_ended = MockLLMConfig(overload_first=3)
    assert [open_ended.overload_scheduled_for(n) for n in (2, 3, 99)] == [False, True, True]
    assert not MockLLMConfig().overload_scheduled_for(1)
