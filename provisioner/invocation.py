"""Validating an invocation: a bad input becomes a typed failure before any state changes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from provisioner.failures import FailureCode
from provisioner.model import Invocation, ProvisionerError

MAX_ID_CHARS = 128
MAX_JSON_BYTES = 64 * 1024
MAX_CONFIG_ENTRIES = 64
MAX_CONFIG_VALUE_CHARS = 2048

OPERATIONS = ("provision", "release", "status", "acquire", "settle", "inspect")

# C0 controls, DEL and lone surrogates: none belongs in an id, a key or a log line.
_FORBIDDEN_IN_ID = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


def _check_id(field: str, value: str) -> str:
    if not value:
        raise ProvisionerError(FailureCode.INVALID_INVOCATION, f"{field} is missing")
    if len(value) > MAX_ID_CHARS:
        raise ProvisionerError(
            FailureCode.INVALID_INVOCATION, f"{field} is longer than {MAX_ID_CHARS} characters"
        )
    if _FORBIDDEN_IN_ID.search(value):
        raise ProvisionerError(FailureCode.INVALID_INVOCATION, f"{field} holds control characters")
    return value


def _json_object(field: str, text: str) -> dict[str, Any]:
    if text == "{}":
        return {}
    if len(text.encode("utf-8", "surrogatepass")) > MAX_JSON_BYTES:
        raise ProvisionerError(
            FailureCode.INVALID_INVOCATION, f"{field} is larger than {MAX_JSON_BYTES} bytes"
        )
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as error:
        raise ProvisionerError(
            FailureCode.INVALID_INVOCATION, f"{field} is not valid JSON: {error}"
        ) from None
    if not isinstance(value, dict):
        raise ProvisionerError(FailureCode.INVALID_INVOCATION, f"{field} must be a JSON object")
    return value


@dataclass(frozen=True, slots=True)
class Request:
    """A validated invocation."""

    tenant: str
    entity_type: str
    entity_id: str
    operation: str
    config: dict[str, str]
    trigger_params: dict[str, Any]
    session_id: str | None
    trace_id: str
    # The entity's state fields (the resource gates read a cost estimate from them).
    entity_state: dict[str, Any] = field(default_factory=dict)

    @property
    def entity(self) -> str:
        return f"{self.entity_type}/{self.entity_id}"

    @property
    def fields(self) -> dict[str, Any]:
        """`entity_state.fields`: the entity's state variables, as Temper passes them."""
        fields = self.entity_state.get("fields")
        return fields if isinstance(fields, dict) else {}

    def field_text(self, name: str) -> str:
        """A state variable as text; "" when absent or not a string."""
        value = self.fields.get(name)
        return value if isinstance(value, str) else ""


def validate(invocation: Invocation) -> Request:
    tenant = _check_id("tenant", invocation.tenant)
    entity_type = _check_id("entity_type", invocation.entity_type)
    entity_id = _check_id("entity_id", invocation.entity_id)
    if len(invocation.config) > MAX_CONFIG_ENTRIES:
        raise ProvisionerError(
            FailureCode.INVALID_CONFIG, f"more than {MAX_CONFIG_ENTRIES} config entries"
        )
    for key, value in invocation.config:
        if len(value) > MAX_CONFIG_VALUE_CHARS:
            raise ProvisionerError(
                FailureCode.INVALID_CONFIG, f"config value of {key!r} is too long"
            )
    config = dict(invocation.config)
    operation = config.get("operation", "provision").strip().lower() or "provision"
    if operation not in OPERATIONS:
        raise ProvisionerError(
            FailureCode.UNKNOWN_OPERATION,
            f"operation {operation!r} is not one of {', '.join(OPERATIONS)}",
        )
    trigger_params = _json_object("trigger_params", invocation.trigger_params)
    entity_state = _json_object("entity_state", invocation.entity_state)
    session_id = invocation.session_id
    if session_id is not None:
        _check_id("session_id", session_id)
    if len(invocation.trace_id) > MAX_ID_CHARS:
        raise ProvisionerError(FailureCode.INVALID_INVOCATION, "trace_id is too long")
    return Request(
        tenant=tenant,
        entity_type=entity_type,
        entity_id=entity_id,
        operation=operation,
        config=config,
        trigger_params=trigger_params,
        session_id=session_id,
        trace_id=invocation.trace_id,
        entity_state=entity_state,
    )
