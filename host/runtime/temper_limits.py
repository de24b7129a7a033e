"""Temper's per-invocation budgets and the integration-config keys that override them.

- Defaults: `WasmResourceLimits::default()` in `crates/temper-wasm/src/types.rs`
  (fuel 1e9, memory 64 MiB, 120 s, HTTP response body 1 MiB) and `MAX_MODULE_SIZE`
  (10 MiB, checked before compiling in `compile_and_cache`, `engine/mod.rs`).
- Overrides: `timeout_secs`, `max_fuel`, `max_memory`, `max_response_bytes` from the
  trigger's config, each parsed as an unsigned integer and ignored when it does not parse
  (`crates/temper-server/src/state/dispatch/wasm/dispatch.rs`, `dispatch_single_integration`).
  `timeout_secs` bounds both the guest (epoch deadline) and its HTTP calls.
- Epochs tick every 10 ms; the deadline is the duration rounded up to whole ticks
  (`WASM_EPOCH_TICK_INTERVAL`, `epoch_deadline_ticks` in `engine/mod.rs`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

MAX_MODULE_SIZE = 10 * 1024 * 1024
EPOCH_TICK_MS = 10


@dataclass(frozen=True)
class TemperLimits:
    max_fuel: int = 1_000_000_000
    max_memory: int = 64 * 1024 * 1024
    max_duration_s: float = 120.0
    max_response_bytes: int = 1024 * 1024

    def epoch_deadline_ticks(self) -> int:
        return max(1, math.ceil(self.max_duration_s * 1000 / EPOCH_TICK_MS))

    @classmethod
    def from_integration_config(
        cls, config: Mapping[str, str], base: TemperLimits | None = None
    ) -> TemperLimits:
        limits = base or cls()
        changes: dict[str, float | int] = {}
        for key, field in (
            ("max_fuel", "max_fuel"),
            ("max_memory", "max_memory"),
            ("max_response_bytes", "max_response_bytes"),
            ("timeout_secs", "max_duration_s"),
        ):
            value = _unsigned(config.get(key))
            if value is not None:
                changes[field] = value
        return replace(limits, **changes)  # type: ignore[arg-type]


def _unsigned(text: str | None) -> int | None:
    """Rust's `str::parse::<u64>()`: ASCII digits with an optional leading `+`."""
    if text is None:
        return None
    digits = text[1:] if text.startswith("+") else text
    if not digits or not digits.isascii() or not digits.isdigit():
        return None
    value = int(digits)
    return value if value < 2**64 else None
