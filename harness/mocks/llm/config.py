"""What the mock LLM API does: its keys, per-key limits, latency, answers and overload.

The defaults are permissive (no limits, no latency, no overload), so that
``MockLLMConfig(api_keys=("k",))`` answers every request at once; a tier's limits are set by
the caller (``MockLLMConfig.for_tier("tier1")``, or ``rpm``/``itpm``/``otpm``).

The three limits are token buckets that refill continuously, the way Anthropic describes
its rate limits (docs.anthropic.com/en/api/rate-limits: "capacity is continuously
replenished up to your maximum limit"): a bucket holds at most its burst (by default the
whole per-minute limit) and refills at ``limit / 60`` per second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.mocks.shared.config import MockConfig

# Anthropic's per-model-class limits for Claude Sonnet 4.x at the two lowest usage tiers
# (RPM, input and output tokens per minute), as copies of docs.anthropic.com/en/api/rate-limits
# list them (e.g. rate-limits.apis.io/rate-limits/claude). Starting points for scenarios: the
# console shows an organisation's real limits.
TIERS: dict[str, dict[str, int]] = {
    "tier1": {"rpm": 50, "itpm": 30_000, "otpm": 8_000},
    "tier2": {"rpm": 1_000, "itpm": 450_000, "otpm": 90_000},
}

# The mock has no tokenizer: input tokens are the request's text length over this, rounded
# up (about four characters per token for English text, as Anthropic's docs put it).
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class MockLLMConfig(MockConfig):
    """Everything that shapes the mock's answers. Times are in the unit their name says.

    Limits apply per API key: every key in ``api_keys`` has its own three buckets.
    """

    api_keys: tuple[str, ...] = ("sk-ant-mock",)
    seed: int = 0
    # Requests, input tokens and output tokens per minute (None: unlimited), and how much
    # each bucket holds at most (None: the whole per-minute limit).
    rpm: int | None = None
    itpm: int | None = None
    otpm: int | None = None
    rpm_burst: int | None = None
    itpm_burst: int | None = None
    otpm_burst: int | None = None
    # How the token ``-remaining`` headers are rounded: Anthropic rounds them to the nearest
    # thousand; 1 (the default) gives exact values.
    token_remaining_rounding: int = 1
    # Time to answer a request that was admitted: fixed, or seeded-uniform up to the max.
    latency_ms: float = 0.0
    latency_max_ms: float | None = None
    # Output tokens of an answer: fixed, or seeded-uniform up to the max; never more than
    # the request's max_tokens (then stop_reason is "max_tokens").
    output_tokens: int = 16
    output_tokens_max: int | None = None
    # 529 overloaded_error: always (``overloaded``), for the requests numbered
    # ``overload_first`` to ``overload_last`` (1-based, both included), or with a seeded
    # probability. ``overload_retry_after_s`` adds a retry-after to the 529 (None: none).
    overloaded: bool = False
    overload_probability: float = 0.0
    overload_first: int | None = None
    overload_last: int | None = None
    overload_retry_after_s: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.api_keys, str):
            raise TypeError("api_keys must be a list of keys, not a single string")
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        if not self.api_keys or not all(isinstance(k, str) and k for k in self.api_keys):
            raise ValueError("api_keys must hold at least one non-empty key")
        for name in ("rpm", "itpm", "otpm", "rpm_burst", "itpm_burst", "otpm_burst"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 (None: no limit)")
        if self.token_remaining_rounding < 1:
            raise ValueError("token_remaining_rounding must be >= 1")
        if self.latency_ms < 0:
            raise ValueError("latency_ms must be >= 0")
        if self.latency_max_ms is not None and self.latency_max_ms < self.latency_ms:
            raise ValueError("latency_max_ms must be >= latency_ms")
        if self.output_tokens < 1:
            raise ValueError("output_tokens must be >= 1")
        if self.output_tokens_max is not None and self.output_tokens_max < self.output_tokens:
            raise ValueError("output_tokens_max must be >= output_tokens")
        if not 0.0 <= self.overload_probability <= 1.0:
            raise ValueError("overload_probability must be in [0, 1]")
        if self.overload_first is not None and self.overload_first < 1:
            raise ValueError("overload schedules count requests from 1")
        if (
            self.overload_first is not None
            and self.overload_last is not None
            and self.overload_last < self.overload_first
        ):
            raise ValueError(f"empty overload schedule {self.overload_first}..{self.overload_last}")
        if self.overload_retry_after_s is not None and self.overload_retry_after_s <= 0:
            raise ValueError("overload_retry_after_s must be > 0 (None: no retry-after)")

    @property
    def has_overload_schedule(self) -> bool:
        return self.overload_first is not None or self.overload_last is not None

    def overload_scheduled_for(self, ordinal: int) -> bool:
        """Whether request number ``ordinal`` falls inside the overload schedule."""
        if not self.has_overload_schedule:
            return False
        lo = self.overload_first if self.overload_first is not None else 1
        hi = self.overload_last
        return lo <= ordinal and (hi is None or ordinal <= hi)

    @classmethod
    def for_tier(cls, tier: str, **changes: Any) -> MockLLMConfig:
        """A usage tier's limits (see ``TIERS``), then ``changes``."""
        return cls.from_preset("tier", tier, TIERS, changes)

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        data["api_keys"] = list(self.api_keys)
        return data
