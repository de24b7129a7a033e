"""The shim in the Temper-ABI host, calling a real `serve` process, which runs the
component against the mock E2B: the path a Temper deployment takes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.temper_abi import TemperAbiModule, Trigger, dispatch_for
from tests.conftest import API_KEY, ROOT
from tests.harness.mocks.e2b.fixtures import running_mock
from tests.host.serve.serve_process import TOKEN, invocation_events, serve_process

pytestmark = pytest.mark.component

SHIM = ROOT / "dist" / "temper_shim.wasm"
# The CurationJob trigger with typed failure routes (ADR-0187): a transient failure
# (the service unreachable or busy) goes to the retry action.
PROVISION = Trigger(
    name="provision_sandbox",
    failure_routes={
        "transient": "RetryProvision",
        "permanent": "Fail",
        "integrity": "Fail",
        "authorization": "Fail",
    },
)


def context(url: str, operation: str = "provision", token: str = TOKEN) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "entity_type": "CurationJob",
        "entity_id": "job-42",
        "trigger_action": "Provision",
        "wasm_module": "sandbox_provisioner",
        "trigger_params": {"style": "watercolor"},
        "entity_state": {"status": "Provisioning", "fields": {"provisioner_url": "http://evil"}},
        "integration_config": {
            "operation": operation,
            "template_id": "base",
            "provisioner_url": f"{url}/v1/invocations",
            "provisioner_token": token,
        },
        "trace_id": "trace-42",
    }


@pytest.fixture
def shim(component_path: Path) -> Iterator[TemperAbiModule]:
    assert SHIM.is_file()
    with TemperAbiModule.load(SHIM) as module:
        yield module


def test_shim_provisions_reuses_releases_and_routes_an_outage_to_the_retry(
    shim: TemperAbiModule, tmp_path: Path, component_cache_dir: Path
) -> None:
    with running_mock(api_key=API_KEY) as mock:
        storage = f"sqlite:///{tmp_path / 'state.db'}"
        with serve_process(
            e2b_url=mock.url, storage=storage, cache_dir=component_cache_dir
        ) as serve:
            first = shim.invoke(context(serve.url))
            assert first.error is None and first.result is not None, first
            assert first.result.success and first.result.callback_action == "SandboxReady"
            sandbox_id = first.result.callback_params["sandbox_id"]
            assert [s["sandbox_id"] for s in mock.running_sandboxes()] == [sandbox_id]
            assert dispatch_for(PROVISION, first.result).action == "SandboxReady"

            again = shim.invoke(context(serve.url))
            assert again.result is not None and again.result.callback_action == "SandboxReady"
            assert again.result.callback_params["sandbox_id"] == sandbox_id
            assert len(mock.running_sandboxes()) == 1

            wrong_token = shim.invoke(context(serve.url, token="not-the-token"))
            assert wrong_token.result is not None and wrong_token.result.typed_failure
            assert wrong_token.result.typed_failure["code"] == "ProvisionerUnauthorized"
            details = wrong_token.result.typed_failure["details"]
            assert details["status"]["value"] == 401
            assert details["error_code"]["value"] == "unauthorized"
            wrong_path = context(serve.url)
            wrong_path["integration_config"]["provisioner_url"] = f"{serve.url}/v1/invocation"
            rejected = shim.invoke(wrong_path)
            assert rejected.result is not None and rejected.result.typed_failure
            assert rejected.result.typed_failure["code"] == "ProvisionerRejected"
            details = rejected.result.typed_failure["details"]
            assert (details["status"]["value"], details["error_code"]["value"]) == (
                404,
                "not_found",
            )
            refused = serve.wait_for_events(
                lambda e: len([x for x in e if x.get("event") == "refused"]) >= 2
            )
            assert [(x["status"], x["reason"]) for x in refused if x.get("event") == "refused"] == [
                (401, "the bearer token does not match"),
                (404, "no route POST /v1/invocation"),
            ]
            assert "not-the-token" not in "\n".join(serve.seen)

            released = shim.invoke(context(serve.url, operation="release"))
            assert released.result is not None
            assert released.result.callback_action == "SandboxReleased"
            assert mock.running_sandboxes() == []
            logged = serve.wait_for_events(lambda e: len(invocation_events(e)) >= 3)
            events = invocation_events(logged)
            assert [e["action"] for e in events] == [
                "SandboxReady",
                "SandboxReady",
                "SandboxReleased",
            ]
            assert {e["entity_id"] for e in events} == {"job-42"}
            url = serve.url
            assert serve.terminate() == 0

        outage = shim.invoke(context(url))
        assert outage.error is None and outage.result is not None
        assert not outage.result.success
        assert outage.result.typed_failure is not None
        assert outage.result.typed_failure["category"] == "transient"
        assert outage.result.typed_failure["code"] == "ProvisionerUnreachable"
        routed = dispatch_for(PROVISION, outage.result)
        assert routed.action == "RetryProvision"
        assert routed.params["failure"]["code"] == "ProvisionerUnreachable"
        # Without typed routes the legacy on_failure action gets it, never a silent hang.
        legacy = dispatch_for(Trigger("provision_sandbox", on_failure="Fail"), outage.result)
        assert legacy.action == "Fail" and "ProvisionerUnreachable" in legacy.params["error"]
