"""Invocation and outcome, mirroring the WIT `provisioner` interface in plain Python."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from provisioner.failures import HOST_CODES

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# Outcome actions: the Temper runtime dispatches these into the entity's state machine.
SANDBOX_READY = "SandboxReady"
SANDBOX_QUEUED = "SandboxQueued"
SANDBOX_RELEASED = "SandboxReleased"
SANDBOX_STATUS = "SandboxStatus"
SANDBOX_FAILED = "SandboxFailed"
# The answer to `operation = inspect` (provisioner/gates/view.py): the account's gates.
GATES_INSPECTED = "GatesInspected"

# The outcome param naming the waiters a decision promised a permit to, for the host to
# wake (`gates.sandbox.promise`). It names other tenants' entities: hosts strip it before
# answering the runtime.
WAKE_UPS = "wake_ups"


@dataclass(frozen=True, slots=True)
class Invocation:
    tenant: str
    entity_type: str
    entity_id: str
    trigger_action: str
    trigger_params: str
    entity_state: str
    config: tuple[tuple[str, str], ...]
    session_id: str | None
    trace_id: str


# Temper resolves `{secret:name}` templates into the config before the invocation; one that
# is still there named a secret the tenant does not have.
UNRESOLVED_SECRET = "{secret:"


def unresolved(value: str) -> bool:
    """Blank, or a `{secret:...}` template Temper could not resolve: the old module's test
    for a missing `e2b_api_key` or `temper_api_url` (the host's credentials use it too)."""
    return not value.strip() or UNRESOLVED_SECRET in value


@dataclass(frozen=True, slots=True)
class Failure:
    code: str
    message: str
    retryable: bool


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the guest decided is `action` and `params`, all the WIT `outcome` carries.
    `success` and `error` are the host's reading of them (`decided`), which the host maps
    to Temper's result: `success` is true for every outcome the guest decided,
    `SandboxFailed` included (its failure is in `error`, read from the params), false only
    for a genuine invocation failure (a host code: trap, budget, malformed result)."""

    action: str
    params: dict[str, Any] = field(default_factory=dict)
    success: bool = True
    error: Failure | None = None

    def params_json(self) -> str:
        return json.dumps(self.params, sort_keys=True, separators=(",", ":"))


def fields_of(record: DataclassInstance) -> dict[str, Any]:
    """A flat record's fields by name, in declaration order (outcome params, stored JSON).
    Shallow: `dataclasses.asdict` deep-copies every value, which cost more guest fuel than
    the rest of a write."""
    return {name: getattr(record, name) for name in record.__dataclass_fields__}


class ProvisionerError(Exception):
    """A typed failure raised inside the guest and turned into a SandboxFailed outcome."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.failure = Failure(code=code, message=message, retryable=retryable)


def failed(failure: Failure, **params: Any) -> Outcome:
    """A `SandboxFailed` outcome. A failure the guest decided is a Temper success whose
    action is `SandboxFailed`, so the spec receives its params (Temper's failure path keeps
    only `{error, error_message, integration}`: `handle_wasm_failure` in
    `crates/temper-server/src/state/dispatch/wasm/invocation_artifacts.rs`); a host code
    is a Temper failure. `error_message` is the name the old module's `Fail` declared."""
    body: dict[str, Any] = {
        "code": failure.code,
        "message": failure.message,
        "retryable": failure.retryable,
        "error_message": failure.message,
    }
    body.update(params)
    return Outcome(
        action=SANDBOX_FAILED,
        params=body,
        success=failure.code not in HOST_CODES,
        error=failure,
    )


_FAILURE_PARAMS = (("code", str), ("message", str), ("retryable", bool))


def decided(action: str, params: dict[str, Any]) -> Outcome:
    """The outcome a guest decided, from the WIT `outcome` (`failed` is the inverse): a
    success, and for `SandboxFailed` the failure its typed params state. ValueError when a
    `SandboxFailed` lacks them or claims a host code (only a host reports those)."""
    if action != SANDBOX_FAILED:
        return Outcome(action, params)
    for name, kind in _FAILURE_PARAMS:
        if not isinstance(params.get(name), kind):
            raise ValueError(f"SandboxFailed's {name} is not a {kind.__name__}")
    failure = Failure(params["code"], params["message"], params["retryable"])
    if failure.code in HOST_CODES:
        raise ValueError(f"SandboxFailed claims the host code {failure.code}")
    return Outcome(action, params, success=True, error=failure)
