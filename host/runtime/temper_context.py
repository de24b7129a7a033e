"""Temper invocation contexts (JSON) into WIT invocations, with clear errors."""

from __future__ import annotations

import json
from typing import Any

from provisioner.model import Invocation

MAX_CONTEXT_BYTES = 1024 * 1024


class InvalidContext(ValueError):
    """The invocation context is malformed; the message says what and where."""


def _text(data: dict[str, Any], field: str, *, required: bool = True) -> str:
    value = data.get(field)
    if value is None:
        if required:
            raise InvalidContext(f"{field} is missing")
        return ""
    if not isinstance(value, str):
        raise InvalidContext(f"{field} must be a string, got {type(value).__name__}")
    return value


def _json_field(data: dict[str, Any], field: str) -> str:
    value = data.get(field, {})
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        raise InvalidContext(f"{field} must be a JSON object, got {type(value).__name__}")
    return json.dumps(value)


def invocation_from_context(data: Any) -> Invocation:
    """Accepts the Temper context's field names (tenant, entity_type, entity_id,
    trigger_action, trigger_params, entity_state, integration_config, session_id, trace_id)."""
    if not isinstance(data, dict):
        raise InvalidContext("the invocation context must be a JSON object")
    config = data.get("integration_config", data.get("config", {}))
    if not isinstance(config, dict):
        raise InvalidContext("integration_config must be a JSON object of strings")
    pairs: list[tuple[str, str]] = []
    for key, value in config.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, int | float):
            value = str(value)
        if not isinstance(value, str):
            raise InvalidContext(f"integration_config.{key} must be a string or a number")
        pairs.append((str(key), value))
    session_id = data.get("session_id")
    if session_id is not None and not isinstance(session_id, str):
        raise InvalidContext("session_id must be a string or null")
    return Invocation(
        tenant=_text(data, "tenant"),
        entity_type=_text(data, "entity_type"),
        entity_id=_text(data, "entity_id"),
        trigger_action=_text(data, "trigger_action", required=False) or "Provision",
        trigger_params=_json_field(data, "trigger_params"),
        entity_state=_json_field(data, "entity_state"),
        config=tuple(pairs),
        session_id=session_id,
        trace_id=_text(data, "trace_id", required=False),
    )


def parse_context(text: str) -> Invocation:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CONTEXT_BYTES:
        raise InvalidContext(f"the invocation context is larger than {MAX_CONTEXT_BYTES} bytes")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidContext(
            f"not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    return invocation_from_context(data)


def outcome_to_json(outcome: Any) -> dict[str, Any]:
    error = outcome.error
    return {
        "action": outcome.action,
        "params": outcome.params,
        "success": outcome.success,
        "error": None
        if error is None
        else {
            "code": error.code,
            "message": error.message,
            "retryable": error.retryable,
        },
    }
