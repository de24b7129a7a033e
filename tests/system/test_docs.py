"""Every shell block marked runnable (```sh runnable) in README.md and docs/ runs and exits
0, from the repository root, so the commands the docs show work as written. docs/deploy.md's
blocks form one session and are run together by test_deploy_doc.py."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.system.doc_blocks import documents, runnable_blocks

pytestmark = pytest.mark.component

CASES = [
    pytest.param(path, index, block, id=f"{path.name}-{index}")
    for path in documents()
    if path.name != "deploy.md"
    for index, block in enumerate(runnable_blocks(path))
]


def test_the_docs_have_runnable_blocks() -> None:
    assert CASES, "no ```sh runnable block in README.md or docs/"
    assert runnable_blocks(ROOT / "docs" / "deploy.md")


@pytest.mark.parametrize(("path", "index", "block"), CASES)
def test_a_runnable_block_runs(
    component_path: Path, path: Path, index: int, block: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=ROOT,
        env={**os.environ, "DOC_TMP": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (path.name, index, result.stdout[-2000:], result.stderr[-2000:])


# Written by other branches at the same time (the lead merges them); every other link of
# README.md and docs/ must resolve.
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_is_a_front_door_and_the_benchmark_table_lives_in_results() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "./build.sh && .venv/bin/sandbox-provisioner simulate\n" in readme
    assert "./build.sh && .venv/bin/python -m pytest -q -n 3 --dist loadfile\n" in readme
    assert "(benchmarks/RESULTS.md)" in readme and "bench:begin" not in readme
    assert "## Machine" in (ROOT / "benchmarks" / "RESULTS.md").read_text()


@pytest.mark.parametrize("path", documents(), ids=lambda p: p.name)
def test_every_relative_link_resolves(path: Path) -> None:
    for target in LINK.findall(path.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        resolved = (path.parent / target).resolve()
        assert resolved.exists(), f"{path.name} links {target}, which does not exist"


def test_no_doc_calls_the_components_sandboxfailed_a_typed_failure() -> None:
    """Issue 26, point 3: the old deployment section said serve answers SandboxFailed as a
    typed failure routed as `permanent`; serve answers it as a success naming its action."""
    for path in documents():
        flat = " ".join(path.read_text().split())
        assert "SandboxFailed as a typed failure" not in flat, path.name
    contract = " ".join((ROOT / "docs" / "contract.md").read_text().split())
    assert (
        '{"action": "SandboxFailed", "params": {code, message, retryable, ...}, "success": true}'
        in contract
    )
