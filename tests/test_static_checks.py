"""The project's static gates run with the tests, so CI fails on what they reject.

mypy (strict, configured in pyproject.toml) and ruff are conventions of the project; running
them here also makes the mutation report's count honest: a mutant mypy rejects is one CI
rejects (docs/mutation.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_mypy_accepts_the_project() -> None:
    result = run_tool("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_accepts_the_project() -> None:
    result = run_tool("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr
