"""The retry budget: retries are paid from tokens earned by first attempts and by time,
so a storm of failures cannot multiply the load on E2B."""

from __future__ import annotations

from typing import Protocol

from provisioner.config import AdmissionConfig


class BudgetHolder(Protocol):
    """Where a retry budget is kept: the sandbox gate document."""

    retry_tokens: float | None
    retry_refilled_ms: int


def refill(state: BudgetHolder, config: AdmissionConfig, now_ms: int) -> float:
    if state.retry_tokens is None:
        state.retry_tokens = config.retry_budget
        state.retry_refilled_ms = now_ms
    elapsed = max(0, now_ms - state.retry_refilled_ms)
    state.retry_tokens = min(
        config.retry_budget, state.retry_tokens + elapsed * config.retry_refill_per_s / 1000.0
    )
    state.retry_refilled_ms = max(state.retry_refilled_ms, now_ms)
    return state.retry_tokens


def tokens(state: BudgetHolder, config: AdmissionConfig) -> float:
    return config.retry_budget if state.retry_tokens is None else state.retry_tokens


def earn(state: BudgetHolder, config: AdmissionConfig) -> None:
    state.retry_tokens = min(config.retry_budget, tokens(state, config) + config.retry_ratio)


def spend(state: BudgetHolder, config: AdmissionConfig) -> None:
    state.retry_tokens = tokens(state, config) - 1.0


def wait_for_token_ms(state: BudgetHolder, config: AdmissionConfig, needed: int) -> int:
    """How long until `needed` whole tokens are banked (large when nothing refills)."""
    missing = needed - tokens(state, config)
    if missing <= 0:
        return 0
    if config.retry_refill_per_s <= 0:
        return config.poll_max_ms
    return int(missing * 1000.0 / config.retry_refill_per_s) + 1
