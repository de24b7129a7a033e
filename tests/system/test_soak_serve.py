"""The service path's soak (issue 27): sessions through the Temper-ABI host and the shim
to two `serve` processes on one Redis, against the mock E2B. A two-minute seeded run
passes the audit; a planted bug fails it.

Real `serve` processes (killed with SIGKILL by the faults), a real redis-server and the
mock E2B, all on loopback. With CI set, a missing redis-server fails instead of skipping.
"""

from __future__ import annotations

import json

import pytest

from harness.multihost.serve_path import PACE_FAULT_KINDS, SERVE_FAULT_KINDS
from harness.multihost.worker import RELEASE_FORGETS_BEFORE_KILL
from tests.harness.multihost.soak_support import RunSoak, assert_the_audit_finds_the_planted_bug

pytestmark = [pytest.mark.component, pytest.mark.redis, pytest.mark.slow]


def test_a_two_minute_seeded_soak_of_the_service_path_passes_its_audit(
    run_soak_command: RunSoak,
) -> None:
    """Bugs caught: any the audit checks (an orphan, a second sandbox for one cycle, a
    limit overrun at E2B, a leaked permit, a job lost or failed untyped) when a `serve`
    dies mid-create or mid-hold, Redis restarts and E2B storms, on the path Temper takes."""
    # The jobs that arrive last may wait out the spec's 180 s Provisioning guard after a kill;
    # 240 s was too little at load 14 (the last 8 arrivals had no result yet). A healthy run
    # ends when its jobs do, so the longer bound costs nothing unless jobs are stuck.
    code, report = run_soak_command(
        "--path", "serve", "--minutes", "2", "--seed", "7", "--finish-timeout-s", "420",
    )  # fmt: skip
    audit, faults = report["audit"], report["faults"]
    print("\nfaults:", report["faults_by_kind"])
    print("audit:", json.dumps(audit["checks"]))
    assert code == 0, audit["violations"]
    checks = audit["checks"]
    assert checks["jobs"] > 0 and checks["jobs_without_result"] == 0
    assert checks["completed"] > 0
    kinds = SERVE_FAULT_KINDS + PACE_FAULT_KINDS
    assert {f["kind"] for f in faults} <= set(kinds)
    # Every kind once per shuffled round: two minutes fit at least one round.
    assert set(report["faults_by_kind"]) == set(kinds)
    assert all(report["faults_by_kind"][kind] >= 1 for kind in kinds), faults
    kills = [f for f in faults if f["kind"] == "kill_serve_mid_create"]
    assert any(f["detail"].get("hit") for f in kills), kills
    assert report["mock"]["sandboxes_created"] > 0


def test_a_release_that_forgets_before_killing_fails_the_service_path_audit(
    run_soak_command: RunSoak,
) -> None:
    """The planted bug (a proxy before the mock answers every kill 204 without sending it)
    leaves each released sandbox running at E2B: the audit must say so, and exit 1."""
    code, report = run_soak_command(
        "--path", "serve", "--minutes", "0.3", "--seed", "7", "--finish-timeout-s", "60",
        "--planted-bug", RELEASE_FORGETS_BEFORE_KILL,
    )  # fmt: skip
    assert_the_audit_finds_the_planted_bug(code, report)
