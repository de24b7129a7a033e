"""The chaos soak (issue 14): a short seeded run passes its audit, and a planted bug fails it.

Real `python -m harness.multihost.worker` processes, a real redis-server and the mock E2B, all
on loopback. With CI set, a missing redis-server fails the tests instead of skipping them.
"""

from __future__ import annotations

import json

from harness.multihost.soak import FAULT_KINDS
from harness.multihost.worker import RELEASE_FORGETS_BEFORE_KILL
from tests.harness.multihost.soak_support import RunSoak, assert_the_audit_finds_the_planted_bug


def test_a_short_seeded_soak_passes_its_audit(run_soak_command: RunSoak) -> None:
    """Bugs caught: any the audit checks (an orphan, a second sandbox for one cycle, a
    limit overrun at E2B, a leaked permit, a job lost or failed untyped) under kills,
    Redis restarts and E2B's faults."""
    code, report = run_soak_command("--minutes", "0.5", "--seed", "1")
    audit, faults = report["audit"], report["faults"]
    print("\nfaults:", [(f["kind"], f["detail"].get("hit")) for f in faults])
    print("audit:", json.dumps(audit["checks"]))
    assert code == 0, audit["violations"]
    assert audit["ok"] and audit["violations"] == []
    checks = audit["checks"]
    assert checks["jobs"] > 0 and checks["jobs_without_result"] == 0
    assert checks["completed"] + sum(checks["failed_by_code"].values()) == checks["jobs"]
    assert checks["running_samples"] > 0
    # The seeded schedule injected faults, each one of the known kinds, and at least one
    # hit its window (how many fit in 30 s depends on the machine: a kill may wait up to
    # `window_timeout_s` for its window, so a loaded machine fits two).
    assert faults and {f["kind"] for f in faults} <= set(FAULT_KINDS)
    assert any(f["detail"].get("hit") for f in faults), faults
    assert report["mock"]["sandboxes_created"] > 0


def test_a_release_that_forgets_before_killing_fails_the_audit(run_soak_command: RunSoak) -> None:
    """The planted bug (worker.py: every kill is answered 204 without being sent) leaves
    each released sandbox running at E2B; the audit, reading only the mock, must say so
    and the command must exit 1."""
    code, report = run_soak_command(
        "--minutes", "0.2", "--seed", "1", "--finish-timeout-s", "20",
        "--planted-bug", RELEASE_FORGETS_BEFORE_KILL,
    )  # fmt: skip
    assert_the_audit_finds_the_planted_bug(code, report)
