"""`sandbox-provisioner temper-invoke`: the shim under the Temper-ABI host from the command
line, with a spec's trigger config and secrets (no serve needed for these answers)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import wasmtime

from harness.cli.main import main
from tests.conftest import ROOT

SHIM = ROOT / "dist" / "temper_shim.wasm"
SPEC = ROOT / "examples" / "temper_agent.ioa.toml"


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_serve_is_a_decoded_typed_failure_routed_to_the_retry(
    component_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1/invocations"
    code = main([
        "temper-invoke", "--module", str(SHIM), "--spec", str(SPEC), "--action", "Provision",
        "--entity-id", "e-1", "--secret", f"sandbox_provisioner_url={url}",
        "--secret", "sandbox_provisioner_token=t",
    ])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["success"] is False
    assert result["typed_failure"]["code"] == "ProvisionerUnreachable"
    assert "Temper dispatches RetryProvision" in err


def test_an_unresolved_secret_is_left_verbatim_as_temper_does(
    component_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([
        "temper-invoke", "--module", str(SHIM), "--spec", str(SPEC), "--action", "Provision",
        "--entity-id", "e-1",
    ])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["typed_failure"]["category"] == "integrity"
    assert "Temper dispatches ProvisionRefused" in err


def test_usage_errors_and_engine_errors_have_their_exit_codes(
    component_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["temper-invoke", "--module", str(SHIM), "--spec", str(SPEC)]) == 2
    assert "--spec needs --action" in capsys.readouterr().err
    trap = tmp_path / "trap.wasm"
    trap.write_bytes(
        wasmtime.wat2wasm(
            '(module (memory (export "memory") 1)'
            ' (func (export "run") (param i32 i32) (result i32) unreachable))'
        )
    )
    context = tmp_path / "context.json"
    context.write_text(
        json.dumps({"tenant": "t", "entity_type": "E", "entity_id": "e", "trigger_action": "A"})
    )
    assert main(["temper-invoke", "--module", str(trap), str(context)]) == 1
    assert "Temper would raise guest_execution" in capsys.readouterr().err
