"""build.sh run twice at once (as pytest-xdist's workers do from the `component_path`
fixture) builds the component once and both runs succeed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import ROOT


def _project_copy(tmp_path: Path) -> Path:
    """The build's inputs in a fresh directory with no dist/: the stamp is missing, so an
    unlocked build.sh would componentize in both runs at once."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("wit", "provisioner", "shim"):
        shutil.copytree(ROOT / name, project / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
    for name in ("build.sh", "pyproject.toml"):
        shutil.copy2(ROOT / name, project / name)  # keeps pyproject's mtime: no reinstall
    (project / ".venv").symlink_to(ROOT / ".venv")
    return project


def test_two_builds_at_once_both_succeed_and_componentize_once(tmp_path: Path) -> None:
    # Catches: two unlocked runs racing on build/guest and dist/*.tmp (one failed with
    # "mv: cannot stat 'dist/sandbox_provisioner.wasm.tmp'", which errored every
    # component test of one xdist worker after a guest change).
    project = _project_copy(tmp_path)
    runs = [
        subprocess.Popen(
            ["./build.sh"], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert sum(out.count("componentizing") for out in outputs) == 1, outputs
    assert sum(out.count("is up to date") for out in outputs) == 1, outputs
    built = project / "dist" / "sandbox_provisioner.wasm"
    assert built.stat().st_size > 1_000_000
    assert not list((project / "dist").glob("*.tmp"))
