"""How the guest reads E2B's answers to a create."""

from __future__ import annotations

import pytest

from provisioner.e2b import classify_failure
from provisioner.gates.results import RateLimited
from provisioner.ports import HttpResponse


@pytest.mark.parametrize(
    ("retry_after", "expected_ms"),
    [("2.5", 2_500), ("inf", 3_600_000), ("1e300", 3_600_000), ("nan", None), ("soon", None)],
)
def test_a_rate_limit_answer_keeps_its_retry_after_within_an_hour(
    retry_after: str, expected_ms: int | None
) -> None:
    # Catches: an infinite or huge Retry-After turned into an int before it is capped (an
    # OverflowError that made E2B's rate limit an internal_error).
    response = HttpResponse(429, (("Retry-After", retry_after),), b"{}")
    assert classify_failure(response) == RateLimited(retry_after_ms=expected_ms)
