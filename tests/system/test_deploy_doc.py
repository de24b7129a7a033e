"""Acceptance 1 of issue 26: following only docs/deploy.md from a clone, the mock, `serve`
and `temper-invoke` with the shipped spec's Provision config give SandboxReady, the same
sandbox again, then SandboxReleased. This runs exactly the page's runnable blocks, in
order, in one bash."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.system.doc_blocks import runnable_blocks

pytestmark = pytest.mark.component

DEPLOY = ROOT / "docs" / "deploy.md"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def json_objects(text: str) -> list[dict[str, Any]]:
    decoder = json.JSONDecoder()
    found, index = [], 0
    while (start := text.find("{", index)) != -1:
        value, index = decoder.raw_decode(text, start)
        found.append(value)
    return found


def test_the_deploy_walkthrough_provisions_reuses_and_releases(
    component_path: Path, component_cache_dir: Path, tmp_path: Path
) -> None:
    script = "\n".join(runnable_blocks(DEPLOY))
    assert "temper-invoke" in script and "serve" in script and "mock-e2b" in script
    assert "mock-temperfs" in script
    env = {
        **os.environ,
        "DEPLOY_DIR": str(tmp_path),
        "MOCK_PORT": str(free_port()),
        "SERVE_PORT": str(free_port()),
        "TEMPERFS_PORT": str(free_port()),
        # Not a step of the page: reuses this test session's compile of the component.
        "SANDBOX_PROVISIONER_CACHE": str(component_cache_dir),
    }
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    logs = {
        name: (tmp_path / name).read_text()
        for name in ("serve.log", "mock.log", "temperfs.log")
        if (tmp_path / name).exists()
    }
    assert process.returncode == 0, (out, err, logs)
    ready, results = json_objects(out)[0], json_objects(out)[1:]
    assert ready["status"] == "ready"
    assert [r["action"] for r in results] == ["SandboxReady", "SandboxReady", "SandboxReleased"]
    assert all(r["success"] for r in results)
    sandbox = results[0]["params"]["sandbox_id"]
    assert results[1]["params"]["sandbox_id"] == sandbox == results[2]["params"]["sandbox_id"]
    assert err.count("Temper dispatches SandboxReady") == 2
    assert "Temper dispatches SandboxReleased" in err
