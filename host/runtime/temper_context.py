"""Temper invocation contexts (JSON) into WIT invocations, with clear errors, and outcomes
into Temper's terminal results."""

from __future__ import annotations

import json
import re
from typing import Any

from host.runtime.temper_result import MAX_DIAGNOSTIC_BYTES
from provisioner.model import WAKE_UPS, Invocation, Outcome

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


_NOT_TOKEN = re.compile(r"[^A-Za-z0-9._:-]")


def stable_code(code: str) -> str:
    token = _NOT_TOKEN.sub("_", code)[:64]
    return token or "UnknownFailure"


def outcome_to_json(outcome: Outcome) -> dict[str, Any]:
    """The outcome as the terminal result Temper accepts, exactly: the one mapping from
    what the component decided (`{action, params}`, read by `component_runtime.decided`) or what the
    host reports (a host code) to Temper's result.

    `decode_terminal_result` (`crates/temper-wasm/src/engine/result.rs` in `nerdsane/temper`;
    `host/runtime/temper_result.py`) takes three shapes, each with no other field:

    - success `{"action": A, "params": P, "success": true}`: every outcome the guest
      decided, `SandboxQueued` and `SandboxFailed` included (`Outcome.success`). With no
      static `on_success` on the trigger, Temper dispatches A with P
      (`invoke_and_handle_result` in `crates/temper-server/src/state/dispatch/wasm/
      invocation.rs`), so the spec's `SandboxQueued` / `SandboxFailed` get their params;
    - a typed failure `{"success": false, "typed_failure": {...}}` (ADR-0187) for a genuine
      invocation failure (a host code: trap, budget, malformed result): a retryable one is
      `transient` / `with_backoff`, any other `permanent` / `never`, both `not_applied`
      (nothing the guest holds survives a trap: the entity record makes a retry adopt any
      create in flight). The code is the stable `code`, the message the `diagnostic` when
      it fits 512 bytes, the action a detail. Temper routes it by category, else to
      `on_failure` with `{error, error_message, integration}` (`handle_wasm_failure`);
    - the legacy failure shape is never produced.
    """
    if outcome.success:
        # The waiters the component promised a permit to are the host's to wake; they
        # name other tenants' entities, so Temper never sees them.
        params = {k: v for k, v in outcome.params.items() if k != WAKE_UPS}
        return {"action": outcome.action, "params": params, "success": True}
    error = outcome.error
    retryable = bool(error and error.retryable)
    declaration: dict[str, Any] = {
        "version": 1,
        "category": "transient" if retryable else "permanent",
        "code": stable_code(error.code if error else "UnknownFailure"),
        "retryability": "with_backoff" if retryable else "never",
        "outcome": "not_applied",
        "details": {"action": {"kind": "string", "value": outcome.action[:256]}},
    }
    if error and len(error.message.encode()) <= MAX_DIAGNOSTIC_BYTES:
        declaration["diagnostic"] = error.message
    return {"success": False, "typed_failure": declaration}
