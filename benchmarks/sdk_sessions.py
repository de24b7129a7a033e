"""Sessions that create with the official `e2b` SDK: its default retries, no gates.

What a team would write without admission control but with the vendor's client:
`Sandbox.create` (an API call only: it builds envd clients but never reaches envd) and
`Sandbox.kill`, pointed at the mock through `api_url`/`api_key`. The SDK retries a 429 that
carries `Retry-After` (E2B's rate limiter, and the mock's concurrent-create cap) up to its
default count; the concurrent-sandbox cap's 429 is not retried.

The sessions run the upstream TemperAgent flow under Temper's rules, as `simulate --mode
direct` does: a create the SDK gives up on is a failed invocation, which the spec's
on_failure = "Fail" ends. That flow has no timer on Provisioning, so the SDK's real-second
retries are never cut short by the scaled session clock.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from e2b import Sandbox
from e2b.exceptions import SandboxException

from harness.mocks.e2b import MockE2BServer
from harness.simulator.driver import SessionDriver
from harness.simulator.invokers import legacy_create_failure
from harness.simulator.report import E2BFigures, build_report, ideal_makespan_s
from harness.simulator.runner import RunResult
from harness.simulator.scenario import Scenario, mode_spec
from provisioner.failures import FailureCode
from provisioner.model import SANDBOX_READY, SANDBOX_RELEASED, Failure, Invocation, Outcome

SDK_API_KEY = "e2b_sdk_bench_key"
SDK_MODE = "e2b_sdk"


class SdkInvoker:
    def __init__(self, e2b_url: str, api_key: str, request_timeout_s: float = 60.0) -> None:
        self._opts: dict[str, Any] = {
            "api_url": e2b_url,
            "api_key": api_key,
            "request_timeout": request_timeout_s,
        }

    def invoke(self, invocation: Invocation) -> Outcome:
        config = dict(invocation.config)
        if config.get("operation", "provision") == "release":
            return self._release(invocation)
        try:
            sandbox = Sandbox.create(
                template=config.get("template_id", "base"),
                timeout=int(config.get("sandbox_timeout_s", "3600")),
                metadata={
                    "temper_tenant": invocation.tenant,
                    "temper_entity_id": invocation.entity_id,
                },
                **self._opts,
            )
        except Exception as error:  # every SDK failure is the session's failure
            return legacy_create_failure(f"{type(error).__name__}: {error}"[:300])
        return Outcome(SANDBOX_READY, {"sandbox_id": sandbox.sandbox_id, "attempts": 1})

    def _release(self, invocation: Invocation) -> Outcome:
        state: Any = json.loads(invocation.entity_state or "{}")
        sandbox_id = state.get("sandbox_id") if isinstance(state, dict) else None
        if not sandbox_id:
            return Outcome(SANDBOX_RELEASED, {"released": False})
        try:
            killed = Sandbox.kill(sandbox_id, **self._opts)
        except SandboxException as error:
            failure = Failure(FailureCode.E2B_UNAVAILABLE, str(error)[:300], retryable=True)
            return Outcome("SandboxFailed", {"code": failure.code}, success=False, error=failure)
        return Outcome(SANDBOX_RELEASED, {"released": bool(killed), "sandbox_id": sandbox_id})


def run_sdk_sessions(scenario: Scenario) -> tuple[RunResult, dict[str, Any]]:
    """The scenario's jobs as SDK sessions against a fresh mock with the scenario's limits."""
    run_id = secrets.token_hex(3)
    jobs = scenario.job_list(run_id)
    mock = MockE2BServer(scenario.mock_config(SDK_API_KEY)).start()
    try:
        # Like `direct`: the upstream TemperAgent flow, the SDK's own retries only.
        settings = scenario.driver_settings("direct", run_id)
        driver = SessionDriver(
            mode_spec("direct"),
            {"sandbox_provisioner": SdkInvoker(mock.url, SDK_API_KEY)},
            settings,
            configure=scenario.configure(mock.url),
        )
        try:
            run = driver.run(jobs)
        finally:
            mock.stop()
            driver.close()
        stats = mock.stats()
        held = [r.sandbox_id for r in run.results if r.sandbox_id]
        figures = E2BFigures(
            max_concurrent_creates=stats.max_concurrent_creates,
            max_running_sandboxes=stats.max_running_sandboxes,
            throttled=stats.throttled,
            orphaned_sandboxes=len(mock.orphans(set())),
            duplicate_sandboxes=stats.duplicates + len(held) - len(set(held)),
            sandboxes_created=stats.sandboxes_created,
        )
    finally:
        mock.stop()
    ideal = ideal_makespan_s(len(jobs), scenario.e2b.limits(), scenario.session_s)
    return run, build_report(run, mode=SDK_MODE, e2b=figures, ideal_s=ideal)
