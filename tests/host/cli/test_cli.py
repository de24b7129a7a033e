"""`sandbox-provisioner invoke` as a user runs it: a real process, the mock E2B on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY

pytestmark = pytest.mark.component


def run_cli(
    args: list[str], stdin: str, env_extra: dict[str, str], cache: Path
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "E2B_API_KEY": API_KEY,
        "SANDBOX_PROVISIONER_CACHE": str(cache),
        **env_extra,
    }
    return subprocess.run(
        [sys.executable, "-m", "host.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def context(operation: str = "provision") -> str:
    return json.dumps(
        {
            "tenant": "acme",
            "entity_type": "CurationJob",
            "entity_id": "job-7",
            "trigger_action": "Submit",
            "trigger_params": {"style": "watercolor"},
            "entity_state": {"status": "Provisioning"},
            "integration_config": {"operation": operation, "template_id": "base"},
            "session_id": "session-7",
            "trace_id": "trace-7",
        }
    )


def test_invoke_provisions_reuses_and_releases(
    mock_e2b: Any, tmp_path: Path, component_path: Path, component_cache_dir: Path
) -> None:
    storage = f"sqlite:///{tmp_path / 'state.db'}"
    args = [
        "invoke",
        "-",
        "--e2b-url",
        mock_e2b.url,
        "--storage",
        storage,
        "--allow-private-network",
    ]

    first = run_cli(args, context(), {}, component_cache_dir)
    assert first.returncode == 0, first.stderr
    ready = json.loads(first.stdout)
    assert ready["action"] == "SandboxReady"
    sandbox_id = ready["params"]["sandbox_id"]
    assert [s["sandbox_id"] for s in mock_e2b.running_sandboxes()] == [sandbox_id]

    again = json.loads(run_cli(args, context(), {}, component_cache_dir).stdout)
    assert again["params"]["sandbox_id"] == sandbox_id
    assert len(mock_e2b.running_sandboxes()) == 1

    released = run_cli(args, context("release"), {}, component_cache_dir)
    assert json.loads(released.stdout)["action"] == "SandboxReleased"
    assert mock_e2b.running_sandboxes() == []


@pytest.mark.parametrize(
    ("stdin", "complaint"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (json.dumps({"entity_type": "E", "entity_id": "1"}), "tenant is missing"),
        (
            json.dumps({"tenant": 5, "entity_type": "E", "entity_id": "1"}),
            "tenant must be a string",
        ),
        (
            json.dumps(
                {"tenant": "t", "entity_type": "E", "entity_id": "1", "integration_config": [1]}
            ),
            "integration_config",
        ),
    ],
)
def test_a_malformed_context_is_refused_clearly_and_stores_nothing(
    stdin: str, complaint: str, tmp_path: Path, component_cache_dir: Path
) -> None:
    db = tmp_path / "state.db"
    result = run_cli(
        ["invoke", "-", "--e2b-url", "http://127.0.0.1:9", "--storage", f"sqlite:///{db}"],
        stdin,
        {},
        component_cache_dir,
    )
    assert result.returncode == 2
    assert complaint in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not db.exists()


def test_without_any_api_key_a_provision_fails_as_the_old_module_did(
    tmp_path: Path, component_cache_dir: Path
) -> None:
    # Catches: a provision that sends a keyless create, or a host that refuses to start
    # although the context (or a static sandbox_url) could have done without its key.
    storage = f"sqlite:///{tmp_path / 'state.db'}"
    result = run_cli(
        ["invoke", "-", "--e2b-url", "http://127.0.0.1:9", "--storage", storage],
        context(),
        {"E2B_API_KEY": ""},
        component_cache_dir,
    )
    assert result.returncode == 1, result.stderr
    answer = json.loads(result.stdout)
    assert answer["success"] is True and answer["action"] == "SandboxFailed"
    assert answer["params"]["code"] == "e2b_api_key_missing"
    assert "no e2b_api_key available" in answer["params"]["message"]


def test_a_loopback_e2b_url_needs_the_explicit_setting(
    mock_e2b: Any, tmp_path: Path, component_cache_dir: Path
) -> None:
    storage = f"sqlite:///{tmp_path / 'state.db'}"
    result = run_cli(
        ["invoke", "-", "--e2b-url", mock_e2b.url, "--storage", storage],
        context(),
        {},
        component_cache_dir,
    )
    assert result.returncode == 1
    failure = json.loads(result.stdout)["params"]
    assert failure["code"] == "e2b_denied"
    assert "allow_private_network" in failure["message"]
    assert mock_e2b.running_sandboxes() == []
