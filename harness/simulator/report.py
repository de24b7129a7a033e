"""The run's report: the incident-style table, the JSON summary and the ideal makespan."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from harness.simulator.model import SessionResult
from harness.simulator.runner import RunResult


@dataclass(frozen=True)
class Limits:
    """E2B's limits as the mock enforces them, in real time."""

    create_slots: int
    create_rate_per_s: float | None
    create_burst: int
    max_sandboxes: int | None
    create_latency_s: float


def ideal_makespan_s(jobs: int, limits: Limits, session_s: float) -> float:
    """The shortest time the limits allow N jobs to get a sandbox and run for D seconds.

    With create latency L, session D, create concurrency Cc, create rate R with a GCRA
    burst B, and sandbox cap S:

        max( max(ceil(N/Cc)·L, max(0, N−B)/R + L) + D,  ceil(N/S)·(L + D) )

    ceil(N/Cc)·L: creates go in waves of at most Cc. max(0, N−B)/R + L: the rate lets B
    creates go at once and one every 1/R after, so the last starts no sooner than (N−B)/R
    (with B = 1 this is the familiar (N−1)/R). ceil(N/S)·(L+D): a sandbox slot is held
    from its create to its release. Each term is a lower bound on its own, so their max is
    one too; the release (a few ms) is not counted.
    """
    if jobs <= 0:
        return 0.0
    latency = limits.create_latency_s
    waves = math.ceil(jobs / limits.create_slots) * latency
    paced = 0.0
    if limits.create_rate_per_s:
        paced = max(0, jobs - limits.create_burst) / limits.create_rate_per_s
    created = max(waves, paced + latency)
    capacity = 0.0
    if limits.max_sandboxes:
        capacity = math.ceil(jobs / limits.max_sandboxes) * (latency + session_s)
    return max(created + session_s, capacity)


@dataclass(frozen=True)
class E2BFigures:
    """What the mock E2B saw during the run."""

    max_concurrent_creates: int
    max_running_sandboxes: int
    throttled: int
    orphaned_sandboxes: int
    duplicate_sandboxes: int
    sandboxes_created: int


def tenant_summary(results: Sequence[SessionResult]) -> dict[str, dict[str, Any]]:
    """Per tenant: jobs, completions, waits, and the median place in the order sandboxes
    were handed out (equal medians across tenants mean they were served fairly)."""
    ready = sorted(
        (r for r in results if r.ready_at_s is not None), key=lambda r: r.ready_at_s or 0.0
    )
    rank = {id(r): index + 1 for index, r in enumerate(ready)}
    tenants: dict[str, dict[str, Any]] = {}
    for tenant in sorted({r.job.tenant for r in results}):
        mine = [r for r in results if r.job.tenant == tenant]
        waits = [r.waited_ms for r in mine if r.ready_at_s is not None and r.waited_ms is not None]
        ranks = [rank[id(r)] for r in mine if id(r) in rank]
        tenants[tenant] = {
            "jobs": len(mine),
            "completed": sum(1 for r in mine if r.completed),
            "failed": sum(1 for r in mine if r.failed),
            "median_waited_ms": round(statistics.median(waits)) if waits else None,
            "max_waited_ms": max(waits) if waits else None,
            "median_ready_rank": statistics.median(ranks) if ranks else None,
        }
    return tenants


def build_report(
    run: RunResult,
    *,
    mode: str,
    e2b: E2BFigures,
    ideal_s: float,
) -> dict[str, Any]:
    results = run.results
    summary: dict[str, Any] = {
        "mode": mode,
        "jobs": len(results),
        "completed": run.completed,
        "failed": run.failed,
        "unfinished": sum(1 for r in results if not (r.completed or r.failed)),
        "killed_by_liveness": sum(1 for r in results if r.killed_by_timer),
        "killed_while_queued": sum(1 for r in results if r.killed_while_queued),
        "max_concurrent_creates_seen": e2b.max_concurrent_creates,
        "max_running_sandboxes_seen": e2b.max_running_sandboxes,
        "throttled": e2b.throttled,
        "sandboxes_created": e2b.sandboxes_created,
        "orphaned_sandboxes": e2b.orphaned_sandboxes,
        "duplicate_sandboxes": e2b.duplicate_sandboxes,
        "invocations": sum(r.invocations for r in results),
        "makespan_s": round(run.makespan_s, 3),
        "ideal_makespan_s": round(ideal_s, 3),
        "makespan_ratio": round(run.makespan_s / ideal_s, 3) if ideal_s > 0 else None,
        "interrupted": run.interrupted,
        "overloaded": run.overloaded,
        **run.host,
    }
    return {
        "summary": summary,
        "tenants": tenant_summary(results),
        "jobs": [r.to_json() for r in results],
    }


def _result_text(result: SessionResult) -> str:
    if result.completed:
        return result.state
    reason = result.reason or ""
    if result.killed_by_timer:
        reason += ", by a timer" + (" while queued" if result.killed_while_queued else "")
    if len(reason) > 70:
        reason = reason[:67] + "..."
    return f"{result.state} ({reason})" if reason else result.state


def format_table(report: dict[str, Any], results: Sequence[SessionResult]) -> str:
    rows = [("session", "tenant", "turns", "sandbox", "result", "waited", "calls")]
    for r in results:
        waited = "-" if r.waited_ms is None else f"{r.waited_ms / 1000:.1f}s"
        rows.append(
            (
                r.job.label,
                r.job.tenant,
                str(r.turns),
                "yes" if r.ready_at_s else "none",
                _result_text(r),
                waited,
                str(r.invocations),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    tenants = report.get("tenants", {})
    if len(tenants) > 1:
        lines.append("tenants (a fair share is a median place near the middle of the run):")
        for tenant, t in tenants.items():
            wait = t["median_waited_ms"]
            lines.append(
                f"  {tenant}: {t['completed']}/{t['jobs']} completed, median wait "
                + ("-" if wait is None else f"{wait / 1000:.1f}s")
                + f", median place {t['median_ready_rank']} of {len(results)}"
            )
    s = report["summary"]
    lines.append(
        f"{s['mode']}: {s['completed']}/{s['jobs']} completed, "
        f"{s['killed_by_liveness']} killed by liveness; E2B saw at most "
        f"{s['max_concurrent_creates_seen']} concurrent creates and "
        f"{s['max_running_sandboxes_seen']} sandboxes, {s['throttled']} 429s, "
        f"{s['orphaned_sandboxes']} orphaned, {s['duplicate_sandboxes']} duplicated; "
        f"makespan {s['makespan_s']:.1f}s (ideal {s['ideal_makespan_s']:.1f}s)"
    )
    return "\n".join(lines)


def comparison_line(reports: Sequence[dict[str, Any]]) -> str:
    parts = []
    ideal = None
    for report in reports:
        s = report["summary"]
        ratio = s["makespan_ratio"]
        ideal = s["ideal_makespan_s"]
        text = f"{s['mode']} {s['completed']}/{s['jobs']} completed in {s['makespan_s']:.1f}s"
        if s["failed"]:
            text += f" ({s['failed']} failed, {s['killed_by_liveness']} by liveness)"
        elif ratio is not None:
            text += f" ({ratio:.2f}x ideal)"
        parts.append(text)
    tail = "" if ideal is None else f" [ideal {ideal:.1f}s]"
    return "compare: " + " | ".join(parts) + tail
