"""Every shell block marked runnable (```sh runnable) in README.md and docs/ runs and exits
0, from the repository root, so the commands the docs show work as written. docs/deploy.md's
blocks form one session and are run together by test_deploy_doc.py."""

from __future__ import annotations

import os
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
