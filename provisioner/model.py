"""Invocation and outcome, mirroring the WIT `provisioner` interface in plain Python."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from provisioner.failures import HOST_CODES

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# Outcome actions, dispatched into the entity's state machine.
SANDBOX_READY = "SandboxReady"
SANDBOX_QUEUED = "SandboxQueued"
SANDBOX_RELEASED = "SandboxReleased"
SANDBOX_STATUS = "SandboxStatus"
SANDBOX_FAILED = "SandboxFailed"
GATES_INSPECTED = "GatesInspected"

# The waiters a decision promised a permit to, for the host to wake; it names other
# tenants' entities, so hosts strip it before answering the runtime.
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


def unresolved(value: str) -> bool:
    """The old module's test for a missing `e2b_api_key` or `temper_api_url`: blank, or a
    `{secret:name}` template still there (the tenant has no such secret)."""
    return not value.strip() or "{secret:" in value


@dataclass(frozen=True, slots=True)
class Failure:
    code: str
    message: str
    retryable: bool


@dataclass(frozen=True, slots=True)
class Outcome:
    """`action` and `params` are what the WIT `outcome` carries; `success` and `error` are the
    host's reading of them (`decided`): false only for a host code (trap, budget, ...)."""

    action: str
    params: dict[str, Any] = field(default_factory=dict)
    success: bool = True
    error: Failure | None = None

    def params_json(self) -> str:
        return json.dumps(self.params, sort_keys=True, separators=(",", ":"))


def fields_of(record: DataclassInstance) -> dict[str, Any]:
    """A flat record's fields in order; shallow (`asdict`'s deep copy costs guest fuel)."""
    return {name: getattr(record, name) for name in record.__dataclass_fields__}


class ProvisionerError(Exception):
    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.failure = Failure(code=code, message=message, retryable=retryable)


def failed(failure: Failure, **params: Any) -> Outcome:
    """A `SandboxFailed` outcome: a Temper success unless a host code, so the spec gets its
    params (Temper's failure path drops them). `error_message`: the old module's name."""
    body = {"code": failure.code, "message": failure.message, "retryable": failure.retryable}
    body |= {"error_message": failure.message, **params}
    return Outcome(SANDBOX_FAILED, body, failure.code not in HOST_CODES, failure)
