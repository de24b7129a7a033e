"""Running `sandbox-provisioner soak` in-process with its JSON report, for the soak tests."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness.multihost.soak import add_soak_arguments, run_soak
from host.runtime.loader import LoadedComponent
from tests.conftest import require_redis_server

RunSoak = Callable[..., tuple[int, dict[str, Any]]]
"""`soak_report` with the test's capture, component and cache (the `run_soak_command` fixture):
called with the extra arguments."""


def soak_report(
    capsys: pytest.CaptureFixture[str], loaded: LoadedComponent, cache_dir: Path, *extra: str
) -> tuple[int, dict[str, Any]]:
    """The soak's exit code and JSON report, with the component and `extra` arguments."""
    require_redis_server()
    parser = argparse.ArgumentParser()
    add_soak_arguments(parser)
    args = parser.parse_args(
        ["--component", str(loaded.path), "--cache-dir", str(cache_dir), "--json", *extra]
    )
    code = run_soak(args)
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return code, report


def assert_the_audit_finds_the_planted_bug(code: int, report: dict[str, Any]) -> None:
    """The planted bug (every kill answered 204 without being sent) leaves each released
    sandbox running at E2B: the audit, reading only the mock, must say so, and exit 1."""
    audit = report["audit"]
    print("\nviolations:", audit["violations"])
    assert code == 1 and not audit["ok"]
    assert audit["checks"]["orphaned_sandboxes"] > 0
    assert any("alive at E2B whose job has ended" in v for v in audit["violations"])
    # The mock never saw a kill: the bug is in the host, and the audit found it at E2B.
    assert report["mock"]["sandboxes_killed"] == 0
