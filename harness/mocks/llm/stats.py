"""The counters tests and simulations read (the live tally the state keeps of them too),
and the log of requests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from harness.mocks.shared.stats import MockStats

LIMITS = ("requests", "input_tokens", "output_tokens")


@dataclass
class MockLLMStats(MockStats):
    """A consistent snapshot: every field was read under the same lock acquisition.

    ``requests_total`` counts every POST /v1/messages; each ends as exactly one of:
    ``messages_ok``, ``rate_limited`` (a 429, counted in ``rate_limited_by`` under the limit
    that refused it), ``overloaded`` (a 529), ``unauthorized`` (401) or ``bad_requests``
    (400), or is still ``in_flight``. ``input_tokens`` and ``output_tokens`` are what the
    admitted requests were charged.
    """

    requests_total: int = 0
    in_flight: int = 0
    max_concurrency: int = 0
    messages_ok: int = 0
    rate_limited: int = 0
    rate_limited_by: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LIMITS, 0))
    overloaded: int = 0
    unauthorized: int = 0
    bad_requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class RequestRecord:
    """One Messages request as the mock saw it; times are on the server's clock (seconds).

    ``answered_at`` is taken when the answer is decided, just before it is sent: a client
    that honours a ``retry-after`` of N seconds arrives again at least N seconds later.
    """

    ordinal: int
    arrived_at: float
    answered_at: float
    status: int
    error_type: str | None = None
    limit: str | None = None
    retry_after_s: int | None = None
    input_tokens: int = 0
    output_tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
