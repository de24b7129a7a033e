"""The shared cooldown after a 429 or 5xx: no invocation of the account calls E2B during it."""

from __future__ import annotations

from typing import Protocol

from provisioner.config import AdmissionConfig


class Cooldown(Protocol):
    """Where a shared cooldown is kept: the sandbox gate document and each resource gate's."""

    cooldown_until_ms: int
    backoff_failures: int


def backoff_ms(failures: int, config: AdmissionConfig, uniform: float) -> int:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**failures)]."""
    ceiling = min(config.backoff_cap_ms, config.backoff_base_ms * (2 ** min(failures, 40)))
    return int(uniform * ceiling)


def record_failure(
    state: Cooldown,
    config: AdmissionConfig,
    now_ms: int,
    retry_after_ms: int | None,
    uniform: float,
) -> int:
    """Extend the cooldown (never shorten it); returns its new end."""
    if retry_after_ms is not None and retry_after_ms >= 0:
        pause = retry_after_ms
    else:
        pause = backoff_ms(state.backoff_failures, config, uniform)
    state.backoff_failures += 1
    state.cooldown_until_ms = max(state.cooldown_until_ms, now_ms + pause)
    return state.cooldown_until_ms


def record_success(state: Cooldown) -> None:
    state.backoff_failures = 0


def cooling_ms(state: Cooldown, now_ms: int) -> int:
    return max(0, state.cooldown_until_ms - now_ms)
