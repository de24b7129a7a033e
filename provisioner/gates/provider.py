"""What the provider answered a gated call, as the settle operation is told it.

Anthropic's Messages API (https://docs.anthropic.com/en/api/rate-limits): a 429
`rate_limit_error` carries `retry-after` (seconds) and the `anthropic-ratelimit-*` headers,
whose `-reset` values are RFC 3339 times at which that limit is fully replenished
(`requests`, `tokens`, `input-tokens`, `output-tokens`) and whose `-remaining` values say
which limit ran out; a 529 `overloaded_error` means the API as a whole is overloaded.
Either pauses every invocation of the account (the gate's shared cooldown), the way E2B's
429s pause creates.

The pause: `retry-after` when sent; else, for a 429, the latest reset among the limits
whose remaining count is 0 (or the earliest reset still ahead when none says 0); else the
gate's exponential backoff with full jitter (`backoff_base_ms`, `backoff_cap_ms`).
Headers that do not parse are ignored: the call has happened, its cost must be settled
whatever the headers say.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

SUCCESS = "success"
RATE_LIMITED = "rate_limited"
OVERLOADED = "overloaded"
FAILED = "failed"

_LIMITS = ("requests", "tokens", "input-tokens", "output-tokens")
# A pause longer than a day is a broken header, not advice.
_MAX_PAUSE_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    status: int
    pause_ms: int | None = None

    @property
    def kind(self) -> str:
        if 200 <= self.status < 300:
            return SUCCESS
        if self.status == 429:
            return RATE_LIMITED
        if self.status == 529 or 500 <= self.status < 600:
            return OVERLOADED
        return FAILED

    @property
    def backs_off(self) -> bool:
        return self.kind in (RATE_LIMITED, OVERLOADED)


def _epoch_ms(text: str) -> int | None:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return int(moment.timestamp() * 1000)


def _retry_after_ms(text: str, now_ms: int) -> int | None:
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if moment.tzinfo is None:
            return None
        return max(0, int(moment.timestamp() * 1000) - now_ms)
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return int(seconds * 1000)


def pause_from_headers(status: int, headers: dict[str, str], now_ms: int) -> int | None:
    """How long the provider asked every caller to wait (None: it did not say)."""
    retry_after = headers.get("retry-after")
    if retry_after is not None:
        pause = _retry_after_ms(retry_after, now_ms)
        if pause is not None:
            return min(pause, _MAX_PAUSE_MS)
    if status != 429:
        return None
    exhausted: list[int] = []
    ahead: list[int] = []
    for limit in _LIMITS:
        reset = headers.get(f"anthropic-ratelimit-{limit}-reset")
        at = None if reset is None else _epoch_ms(reset)
        if at is None or at <= now_ms:
            continue
        ahead.append(at - now_ms)
        if headers.get(f"anthropic-ratelimit-{limit}-remaining", "").strip() == "0":
            exhausted.append(at - now_ms)
    if exhausted:
        return min(max(exhausted), _MAX_PAUSE_MS)
    if ahead:
        return min(min(ahead), _MAX_PAUSE_MS)
    return None


def read_answer(status: int, headers: dict[str, Any], now_ms: int) -> ProviderAnswer:
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    return ProviderAnswer(status, pause_from_headers(status, lowered, now_ms))
