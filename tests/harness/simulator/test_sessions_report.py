"""The ideal makespan, the per-tenant summary and the table."""

from __future__ import annotations

import pytest

from harness.simulator import Job, Limits, RunResult, SessionResult, ideal_makespan_s
from harness.simulator.report import E2BFigures, build_report, format_table, tenant_summary
from tests.harness.simulator import SUMMARY_KEYS


def limits(**changes: object) -> Limits:
    base: dict[str, object] = dict(
        create_slots=4,
        create_rate_per_s=1.0,
        create_burst=1,
        max_sandboxes=20,
        create_latency_s=2.0,
    )
    base.update(changes)
    return Limits(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("jobs", "changes", "session_s", "expected"),
    [
        # The issue's formula with B = 1: the rate dominates: (10-1)/1 + 2 + 5.
        (10, {}, 5.0, 16.0),
        # Concurrency dominates: ceil(10/4)*2 = 6 > (10-10)/5 + 2.
        (10, {"create_rate_per_s": 5.0, "create_burst": 10}, 5.0, 11.0),
        # A burst lets B creates go at once: (10-4)/1 + 2 = 8 > 6.
        (10, {"create_burst": 4}, 5.0, 13.0),
        # The sandbox cap dominates: ceil(200/20)*(0.2+1) = 12.
        (200, {"create_rate_per_s": 50.0, "create_burst": 10, "create_latency_s": 0.2}, 1.0, 12.0),
        # No rate limit, no cap.
        (8, {"create_rate_per_s": None, "max_sandboxes": None}, 1.0, 5.0),
        (0, {}, 5.0, 0.0),
    ],
)
def test_ideal_makespan_is_the_largest_of_the_lower_bounds(
    jobs: int, changes: dict[str, object], session_s: float, expected: float
) -> None:
    """Bug caught: a term dropped or mis-ordered makes the ratio meaningless."""
    assert ideal_makespan_s(jobs, limits(**changes), session_s) == pytest.approx(expected)


def _result(job: Job, ready_at: float | None) -> SessionResult:
    return SessionResult(
        job=job,
        state="Completed",
        outcome="completed",
        ready_at_s=ready_at,
        waited_ms=0,
        turns=3,
        sandbox_id="sb" if ready_at is not None else None,
    )


def test_tenant_summary_ranks_tenants_by_when_they_got_sandboxes() -> None:
    """Bug caught: the fairness figure computed over submission order, not service order."""
    a = [Job(f"a{i}", "A") for i in range(3)]
    b = [Job(f"b{i}", "B") for i in range(3)]
    # Served alternately although A submitted first: medians 3 and 4 of 6.
    results = [_result(a[i], 2.0 * i) for i in range(3)] + [
        _result(b[i], 2.0 * i + 1) for i in range(3)
    ]
    tenants = tenant_summary(results)
    assert tenants["A"]["median_ready_rank"] == 3
    assert tenants["B"]["median_ready_rank"] == 4
    assert tenants["A"]["completed"] == 3


def test_report_and_table_carry_the_issue_fields() -> None:
    """Bug caught: a renamed or missing field breaks the documented JSON report."""
    job = Job("job-1", "t1", "Neumorphic")
    results = [
        SessionResult(
            job=job,
            state="Failed",
            outcome="failed",
            reason="TimeoutFail: no heartbeat for 30 minutes",
            killed_by_timer=True,
            waited_ms=3000,
            invocations=1,
        )
    ]
    run = RunResult(results=results, makespan_s=3.0)
    report = build_report(run, mode="direct", ideal_s=11.0, e2b=E2BFigures(5, 4, 6, 0, 0, 4))
    assert set(report["summary"]) >= SUMMARY_KEYS
    assert report["jobs"] == [
        {
            "id": "job-1",
            "tenant": "t1",
            "state": "Failed",
            "reason": "TimeoutFail: no heartbeat for 30 minutes",
            "sandbox_id": None,
            "turns": 0,
            "waited_ms": 3000,
            "invocations": 1,
        }
    ]
    table = format_table(report, results)
    assert "Neumorphic" in table
    assert "Failed (TimeoutFail: no heartbeat for 30 minutes, by a timer)" in table
    assert report["summary"]["killed_by_liveness"] == 1
