"""Validating an invocation: a bad input becomes a typed failure before any state changes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, NoReturn

from provisioner.failures import FailureCode
from provisioner.model import Invocation, ProvisionerError

MAX_ID_CHARS = 128
MAX_JSON_BYTES = 64 * 1024
MAX_CONFIG_ENTRIES = 64
MAX_CONFIG_VALUE_CHARS = 2048

OPERATIONS = ("provision", "release", "status", "acquire", "settle", "inspect")

# C0 controls, DEL and lone surrogates: none belongs in an id, a key or a log line.
_FORBIDDEN_IN_ID = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


def _invalid(message: str, code: str = FailureCode.INVALID_INVOCATION) -> NoReturn:
    raise ProvisionerError(code, message)


def _check_id(field: str, value: str) -> str:
    if not value:
        _invalid(f"{field} is missing")
    if len(value) > MAX_ID_CHARS:
        _invalid(f"{field} is longer than {MAX_ID_CHARS} characters")
    if _FORBIDDEN_IN_ID.search(value):
        _invalid(f"{field} holds control characters")
    return value


def _json_object(field: str, text: str) -> dict[str, Any]:
    if text == "{}":
        return {}
    if len(text.encode("utf-8", "surrogatepass")) > MAX_JSON_BYTES:
        _invalid(f"{field} is larger than {MAX_JSON_BYTES} bytes")
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as error:
        _invalid(f"{field} is not valid JSON: {error}")
    if not isinstance(value, dict):
        _invalid(f"{field} must be a JSON object")
    return value


@dataclass(frozen=True, slots=True)
class Request:
    tenant: str
    entity_type: str
    entity_id: str
    operation: str
    config: dict[str, str]
    trigger_params: dict[str, Any]
    entity_state: dict[str, Any]

    @property
    def entity(self) -> str:
        return f"{self.entity_type}/{self.entity_id}"

    def field_text(self, name: str) -> str:
        """A state variable (`entity_state.fields`, as Temper passes them) that is text, or ""."""
        fields = self.entity_state.get("fields")
        value = fields.get(name) if isinstance(fields, dict) else None
        return value if isinstance(value, str) else ""


def validate(invocation: Invocation) -> Request:
    tenant = _check_id("tenant", invocation.tenant)
    entity_type = _check_id("entity_type", invocation.entity_type)
    entity_id = _check_id("entity_id", invocation.entity_id)
    if len(invocation.config) > MAX_CONFIG_ENTRIES:
        _invalid(f"more than {MAX_CONFIG_ENTRIES} config entries", FailureCode.INVALID_CONFIG)
    for key, value in invocation.config:
        if len(value) > MAX_CONFIG_VALUE_CHARS:
            _invalid(f"config value of {key!r} is too long", FailureCode.INVALID_CONFIG)
    config = dict(invocation.config)
    operation = config.get("operation", "provision").strip().lower() or "provision"
    if operation not in OPERATIONS:
        message = f"operation {operation!r} is not one of {', '.join(OPERATIONS)}"
        _invalid(message, FailureCode.UNKNOWN_OPERATION)
    trigger_params = _json_object("trigger_params", invocation.trigger_params)
    entity_state = _json_object("entity_state", invocation.entity_state)
    if invocation.session_id is not None:
        _check_id("session_id", invocation.session_id)
    if len(invocation.trace_id) > MAX_ID_CHARS:
        _invalid("trace_id is too long")
    return Request(tenant, entity_type, entity_id, operation, config, trigger_params, entity_state)
