"""The service path's soak (issue 27): sessions through the Temper-ABI host and the shim
to two `serve` processes on one Redis, against the mock E2B. A two-minute seeded run
passes the audit; a planted bug fails it.

Real `serve` processes (killed with SIGKILL by the faults), a real redis-server and the
mock E2B, all on loopback. With CI set, a missing redis-server fails instead of skipping.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from harness.multihost.serve_path import PACE_FAULT_KINDS, SERVE_FAULT_KINDS
from harness.multihost.soak import add_soak_arguments, run_soak
from harness.multihost.worker import RELEASE_FORGETS_BEFORE_KILL
from host.runtime.loader import LoadedComponent
from tests.conftest import require_redis_server

pytestmark = [pytest.mark.component, pytest.mark.redis, pytest.mark.slow]


def _soak(
    capsys: pytest.CaptureFixture[str], loaded: LoadedComponent, cache_dir: Path, *extra: str
) -> tuple[int, dict[str, Any]]:
    require_redis_server()
    parser = argparse.ArgumentParser()
    add_soak_arguments(parser)
    args = parser.parse_args(
        [
            "--path", "serve",
            "--component", str(loaded.path), "--cache-dir", str(cache_dir), "--json",
            *extra,
        ]
    )  # fmt: skip
    code = run_soak(args)
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return code, report


def test_a_two_minute_seeded_soak_of_the_service_path_passes_its_audit(
    loaded_component: LoadedComponent,
    component_cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Bugs caught: any the audit checks (an orphan, a second sandbox for one cycle, a
    limit overrun at E2B, a leaked permit, a job lost or failed untyped) when a `serve`
    dies mid-create or mid-hold, Redis restarts and E2B storms, on the path Temper takes."""
    code, report = _soak(
        capsys, loaded_component, component_cache_dir,
        "--minutes", "2", "--seed", "7", "--finish-timeout-s", "240",
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
    loaded_component: LoadedComponent,
    component_cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The planted bug (a proxy before the mock answers every kill 204 without sending it)
    leaves each released sandbox running at E2B: the audit must say so, and exit 1."""
    code, report = _soak(
        capsys, loaded_component, component_cache_dir,
        "--minutes", "0.3", "--seed", "7", "--finish-timeout-s", "60",
        "--planted-bug", RELEASE_FORGETS_BEFORE_KILL,
    )  # fmt: skip
    audit = report["audit"]
    print("\nviolations:", audit["violations"])
    assert code == 1 and not audit["ok"]
    assert audit["checks"]["orphaned_sandboxes"] > 0
    assert any("alive at E2B whose job has ended" in v for v in audit["violations"])
    assert report["mock"]["sandboxes_killed"] == 0
