"""Admission settings, read from the integration config with documented defaults.

Keys (all optional; times in the config are seconds unless the key ends in `_ms`):

| key | default | meaning |
|---|---|---|
| create_slots | 4 | concurrent E2B create requests per account |
| create_rate_per_s | 1.0 | creates per second per account (E2B Hobby: 1/s, Pro: 5/s) |
| create_burst | 1 | creates allowed back to back before the rate applies |
| max_sandboxes | 20 | running sandboxes per account (E2B Hobby: 20, Pro: 100) |
| max_sandboxes_per_tenant | none | running sandboxes per tenant |
| queue_timeout_s (or _seconds) | 1800 | longest a waiter may queue before `queue_timeout` |
| waiter_ttl_s | 60 | a waiter that stops asking drops out this long after its last poll is due |
| create_lease_s | 150 | a create slot's lease: longer than an invocation (120 s) can live |
| backoff_base_ms / backoff_cap_ms | 500 / 30000 | exponential backoff with full jitter |
| retry_budget | 10 | retry tokens the account may bank |
| retry_ratio | 0.2 | tokens earned by each first-attempt create |
| retry_refill_per_s | 0.1 | tokens earned per second regardless |
| max_create_attempts | 6 | creates per waiter before `retry_budget_exhausted` |
| capacity_grow_after | 5 | successes in a row before a shrunk capacity grows by one |
| poll_min_ms / poll_max_ms | 200 / 15000 | bounds of the retry_after_ms a waiter is given |
| create_latency_ms | 3000 | create latency assumed until one has been observed |
| cas_retries | 16 | compare-and-swap attempts per decision |
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from provisioner.failures import FailureCode
from provisioner.model import ProvisionerError

_DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    create_slots: int = 4
    create_rate_per_s: float = 1.0
    create_burst: int = 1
    max_sandboxes: int = 20
    max_sandboxes_per_tenant: int | None = None
    queue_timeout_ms: int = 1_800_000
    waiter_ttl_ms: int = 60_000
    create_lease_ms: int = 150_000
    backoff_base_ms: int = 500
    backoff_cap_ms: int = 30_000
    retry_budget: float = 10.0
    retry_ratio: float = 0.2
    retry_refill_per_s: float = 0.1
    max_create_attempts: int = 6
    capacity_grow_after: int = 5
    poll_min_ms: int = 200
    poll_max_ms: int = 15_000
    create_latency_ms: int = 3_000
    cas_retries: int = 16

    @property
    def rate_interval_ms(self) -> float:
        return 1000.0 / self.create_rate_per_s

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> AdmissionConfig:
        """Read the settings; a bad value raises ProvisionerError(FailureCode.INVALID_CONFIG)."""
        values: dict[str, Any] = {}
        # Only the keys present are looked at: this runs on every invocation.
        for key, raw in config.items():
            spec = _SPECS_BY_KEY.get(key)
            if spec is None or raw is None or str(raw).strip() == "":
                continue
            values[spec.field] = spec.parse(str(raw).strip())
        built = cls(**values)
        # Every parser bounds its value, so only the relations between settings remain.
        built._check_relations()
        return built

    def validate(self) -> None:
        self._check_relations()
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
                _invalid(f"{item.name} must not be negative")

    def _check_relations(self) -> None:
        if self.backoff_base_ms > self.backoff_cap_ms:
            _invalid("backoff_base_ms must not exceed backoff_cap_ms")
        if self.poll_min_ms > self.poll_max_ms:
            _invalid("poll_min_ms must not exceed poll_max_ms")
        if self.max_sandboxes_per_tenant is not None and (
            self.max_sandboxes_per_tenant > self.max_sandboxes
        ):
            _invalid("max_sandboxes_per_tenant must not exceed max_sandboxes")


def _invalid(message: str) -> None:
    raise ProvisionerError(
        FailureCode.INVALID_CONFIG, f"admission config: {message}", retryable=False
    )


@dataclass(frozen=True, slots=True)
class _Spec:
    key: str
    field: str
    parse: Callable[[str], Any]


def _number(key: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        _invalid(f"{key} must be a number, got {raw!r}")
        raise  # unreachable: keeps the type checker sure `value` is bound
    if not math.isfinite(value):
        _invalid(f"{key} must be finite, got {raw!r}")
    return value


def _positive_int(key: str, upper: int, scale: float = 1.0) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = _number(key, raw) * scale
        if value <= 0:
            _invalid(f"{key} must be positive, got {raw!r}")
        if value > upper:
            _invalid(f"{key} must be at most {upper / scale:g}, got {raw!r}")
        if scale == 1.0 and value != int(value):
            _invalid(f"{key} must be a whole number, got {raw!r}")
        return max(1, round(value))

    return parse


def _non_negative_int(key: str, upper: int, scale: float = 1.0) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = _number(key, raw) * scale
        if value < 0 or value > upper:
            _invalid(f"{key} must be between 0 and {upper / scale:g}, got {raw!r}")
        return round(value)

    return parse


def _positive_float(key: str, upper: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = _number(key, raw)
        if value <= 0 or value > upper:
            _invalid(f"{key} must be above 0 and at most {upper:g}, got {raw!r}")
        return value

    return parse


def _non_negative_float(key: str, upper: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = _number(key, raw)
        if value < 0 or value > upper:
            _invalid(f"{key} must be between 0 and {upper:g}, got {raw!r}")
        return value

    return parse


def _optional_positive_int(key: str, upper: int) -> Callable[[str], int | None]:
    inner = _positive_int(key, upper)

    def parse(raw: str) -> int | None:
        if raw.lower() in ("none", "null", "off", "unlimited"):
            return None
        return inner(raw)

    return parse


_SPECS: tuple[_Spec, ...] = (
    _Spec("create_slots", "create_slots", _positive_int("create_slots", 1_000)),
    _Spec("create_rate_per_s", "create_rate_per_s", _positive_float("create_rate_per_s", 1_000)),
    _Spec("create_burst", "create_burst", _positive_int("create_burst", 1_000)),
    _Spec("max_sandboxes", "max_sandboxes", _positive_int("max_sandboxes", 100_000)),
    _Spec(
        "max_sandboxes_per_tenant",
        "max_sandboxes_per_tenant",
        _optional_positive_int("max_sandboxes_per_tenant", 100_000),
    ),
    _Spec("queue_timeout_s", "queue_timeout_ms", _positive_int("queue_timeout_s", _DAY_MS, 1000)),
    _Spec("queue_timeout_ms", "queue_timeout_ms", _positive_int("queue_timeout_ms", _DAY_MS)),
    # The Temper [admission] block's spelling.
    _Spec(
        "queue_timeout_seconds",
        "queue_timeout_ms",
        _positive_int("queue_timeout_seconds", _DAY_MS, 1000),
    ),
    _Spec("waiter_ttl_s", "waiter_ttl_ms", _positive_int("waiter_ttl_s", _DAY_MS, 1000)),
    _Spec("waiter_ttl_ms", "waiter_ttl_ms", _positive_int("waiter_ttl_ms", _DAY_MS)),
    _Spec("create_lease_s", "create_lease_ms", _positive_int("create_lease_s", _DAY_MS, 1000)),
    _Spec("create_lease_ms", "create_lease_ms", _positive_int("create_lease_ms", _DAY_MS)),
    _Spec("backoff_base_ms", "backoff_base_ms", _positive_int("backoff_base_ms", _DAY_MS)),
    _Spec("backoff_cap_ms", "backoff_cap_ms", _positive_int("backoff_cap_ms", _DAY_MS)),
    _Spec("retry_budget", "retry_budget", _non_negative_float("retry_budget", 1_000_000)),
    _Spec("retry_ratio", "retry_ratio", _non_negative_float("retry_ratio", 100)),
    _Spec(
        "retry_refill_per_s", "retry_refill_per_s", _non_negative_float("retry_refill_per_s", 1e4)
    ),
    _Spec(
        "max_create_attempts", "max_create_attempts", _positive_int("max_create_attempts", 1_000)
    ),
    _Spec(
        "capacity_grow_after",
        "capacity_grow_after",
        _positive_int("capacity_grow_after", 1_000_000),
    ),
    _Spec("poll_min_ms", "poll_min_ms", _positive_int("poll_min_ms", _DAY_MS)),
    _Spec("poll_max_ms", "poll_max_ms", _positive_int("poll_max_ms", _DAY_MS)),
    _Spec("create_latency_ms", "create_latency_ms", _positive_int("create_latency_ms", _DAY_MS)),
    _Spec("cas_retries", "cas_retries", _positive_int("cas_retries", 1_000)),
)
_SPECS_BY_KEY: dict[str, _Spec] = {spec.key: spec for spec in _SPECS}
