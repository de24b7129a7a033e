"""What a session's integration invocation runs: this component, or the old provisioner."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx

from host.runtime.component_runtime import ComponentRuntime
from provisioner.failures import FailureCode
from provisioner.gates.resource import action_name
from provisioner.model import (
    SANDBOX_READY,
    SANDBOX_RELEASED,
    Failure,
    Invocation,
    Outcome,
    ProvisionerError,
    failed,
)

# What the old provisioner answered when its create failed: a failed invocation, which
# Temper hands to the trigger's on_failure ("Fail" in the upstream TemperAgent spec) with
# {error, error_message, integration}; the action named here is lost on the way.
LEGACY_CREATE_FAILED = "SandboxCreateFailed"


class ComponentInvoker:
    """Runs the provisioner component (fresh instance per call, as Temper does)."""

    def __init__(self, runtime: ComponentRuntime) -> None:
        self.runtime = runtime

    def invoke(self, invocation: Invocation) -> Outcome:
        return self.runtime.invoke(invocation)


class DirectInvoker:
    """The provisioner before this project: each provision POSTs `/sandboxes` at once.

    No concurrency cap, no rate limit, no retry, no backoff, no queue, no idempotency key:
    whatever E2B answers other than 201 comes back as LEGACY_CREATE_FAILED.
    """

    def __init__(self, e2b_url: str, api_key: str, *, request_timeout_s: float = 60.0) -> None:
        self._client = httpx.Client(
            base_url=e2b_url.rstrip("/"),
            headers={"X-API-Key": api_key},
            timeout=request_timeout_s,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )

    def close(self) -> None:
        self._client.close()

    def invoke(self, invocation: Invocation) -> Outcome:
        config = dict(invocation.config)
        if config.get("operation", "provision") == "release":
            return self._release(invocation)
        return self._create(invocation, config)

    def _create(self, invocation: Invocation, config: dict[str, str]) -> Outcome:
        body = {
            "templateID": config.get("template_id", "base"),
            "timeout": int(config.get("sandbox_timeout_s", "3600")),
            "metadata": {
                "temper_tenant": invocation.tenant,
                "temper_entity_type": invocation.entity_type,
                "temper_entity_id": invocation.entity_id,
            },
        }
        try:
            response = self._client.post("/sandboxes", json=body)
        except httpx.HTTPError as error:
            return legacy_create_failure(f"{type(error).__name__}: {error}")
        if response.status_code != 201:
            return legacy_create_failure(
                f"E2B answered {response.status_code}: {_message(response)}"
            )
        data = response.json()
        return Outcome(
            SANDBOX_READY,
            {
                "sandbox_id": data.get("sandboxID"),
                "template_id": data.get("templateID"),
                "attempts": 1,
                "queued_ms": 0,
            },
        )

    def _release(self, invocation: Invocation) -> Outcome:
        # Named as the component names it, so a spec's Failing -> Failed answer arrives.
        try:
            released = action_name(dict(invocation.config), "released_action", SANDBOX_RELEASED)
        except ProvisionerError as error:
            return failed(error.failure)
        state: Any = json.loads(invocation.entity_state or "{}")
        sandbox_id = state.get("sandbox_id") if isinstance(state, dict) else None
        if not sandbox_id:
            return Outcome(released, {"released": False})
        path = f"/sandboxes/{quote(str(sandbox_id), safe='')}"
        try:
            try:
                response = self._client.delete(path)
            except (httpx.RemoteProtocolError, httpx.ReadError):
                # A kept-alive connection the server closed as we reused it: DELETE is
                # idempotent, so send it again on a fresh one.
                response = self._client.delete(path)
        except httpx.HTTPError as error:
            return _release_failure(f"{type(error).__name__}: {error}")
        if response.status_code not in (200, 204, 404):
            return _release_failure(f"E2B answered {response.status_code}: {_message(response)}")
        return Outcome(
            released, {"released": response.status_code != 404, "sandbox_id": sandbox_id}
        )


def _message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:200]
    return str(data.get("message", ""))[:200] if isinstance(data, dict) else ""


def _release_failure(message: str) -> Outcome:
    return failed(Failure(FailureCode.E2B_UNAVAILABLE, message, retryable=True))


def legacy_create_failure(message: str) -> Outcome:
    """The old provisioner's answer to a create that failed (`LEGACY_CREATE_FAILED`)."""
    failure = Failure("e2b_error", message, retryable=False)
    return Outcome(
        LEGACY_CREATE_FAILED,
        {"code": failure.code, "message": message},
        success=False,
        error=failure,
    )
