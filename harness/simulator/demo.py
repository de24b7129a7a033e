"""`sandbox-provisioner demo`: one sandbox provisioned and released through the mock E2B."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from harness.mocks.e2b import MockE2BConfig, MockE2BServer
from host.cli.output import print_outcome
from host.runtime.assembly import open_runtime
from provisioner.model import SANDBOX_READY, SANDBOX_RELEASED, Invocation

DEMO_KEY = "e2b_demo_key"


def demo_invocation(e2b_url: str, operation: str) -> Invocation:
    return Invocation(
        tenant="demo-tenant",
        entity_type="CurationJob",
        entity_id="job-1",
        trigger_action="Provision" if operation == "provision" else "Release",
        trigger_params="{}",
        entity_state=json.dumps({"status": "Provisioning"}),
        config=(("operation", operation), ("e2b_api_url", e2b_url), ("template_id", "base")),
        session_id="session-1",
        trace_id="demo-trace",
    )


def run_demo(*, storage_url: str | None, component: Path | None) -> int:
    with (
        tempfile.TemporaryDirectory(prefix="sandbox-provisioner-demo-") as scratch,
        MockE2BServer(MockE2BConfig(api_key=DEMO_KEY)) as mock,
    ):
        storage = storage_url or f"sqlite:///{Path(scratch) / 'state.db'}"
        print(f"mock E2B at {mock.url}; storage {storage}")
        with open_runtime(
            e2b_url=mock.url,
            api_key=DEMO_KEY,
            storage_url=storage,
            component=component,
            allow_private_network=True,
        ) as runtime:
            first = runtime.invoke(demo_invocation(mock.url, "provision"))
            print_outcome("provision", first)
            again = runtime.invoke(demo_invocation(mock.url, "provision"))
            print_outcome("provision again", again)
            running = len(mock.running_sandboxes())
            print(f"mock E2B holds {running} sandbox(es)")
            released = runtime.invoke(demo_invocation(mock.url, "release"))
            print_outcome("release", released)
            left = len(mock.running_sandboxes())
            print(f"mock E2B holds {left} sandbox(es)")
    same = (
        first.action == SANDBOX_READY
        and again.action == SANDBOX_READY
        and first.params.get("sandbox_id") == again.params.get("sandbox_id")
    )
    ok = same and running == 1 and released.action == SANDBOX_RELEASED and left == 0
    print("demo:", "ok" if ok else "FAILED")
    return 0 if ok else 1
