"""The invocation context JSON the way Temper serialises it.

`WasmInvocationContext` in `crates/temper-wasm/src/types.rs` is serialised with
`serde_json::to_string` (`invoke_blocking`, `engine/mod.rs`): compact, fields in
declaration order, `integration_config` a `BTreeMap<String, String>` (sorted keys), the
optional fields left out when empty. Non-ASCII text is written as UTF-8, not escaped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

_ORDER = (
    "tenant",
    "entity_type",
    "entity_id",
    "trigger_action",
    "wasm_module",
    "trigger_params",
    "entity_state",
    "agent_id",
    "session_id",
    "integration_config",
    "trace_id",
    "workflow_root_entity_type",
    "workflow_root_entity_id",
    "workflow_run_id",
    "http_request",
)
_REQUIRED = ("tenant", "entity_type", "entity_id", "trigger_action")
_SKIP_WHEN_NONE = (
    "wasm_module",
    "agent_id",
    "session_id",
    "workflow_root_entity_type",
    "workflow_root_entity_id",
    "workflow_run_id",
    "http_request",
)


def temper_context_json(context: Mapping[str, Any]) -> str:
    unknown = set(context) - set(_ORDER)
    if unknown:
        raise ValueError(f"not WasmInvocationContext fields: {sorted(unknown)}")
    missing = [name for name in _REQUIRED if not isinstance(context.get(name), str)]
    if missing:
        raise ValueError(f"missing string fields: {missing}")
    config = context.get("integration_config") or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in config.items()):
        raise ValueError("integration_config must map strings to strings")
    out: dict[str, Any] = {}
    for name in _ORDER:
        value = context.get(name)
        if name in _SKIP_WHEN_NONE and value is None:
            continue
        if name == "integration_config":
            if config:
                out[name] = dict(sorted(config.items()))
            continue
        if name == "trace_id":
            if value:
                out[name] = value
            continue
        out[name] = value  # trigger_params / entity_state: null when absent, as serde writes
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


_SECRET = re.compile(r"\{secret:([^}]*)\}")


def resolve_secret_templates(
    config: Mapping[str, str], secrets: Mapping[str, str]
) -> dict[str, str]:
    """`resolve_secret_templates` (`crates/temper-server/src/secrets/template.rs`): every
    `{secret:NAME}` in a value becomes the tenant's secret NAME; a missing secret is left
    verbatim, so the module can tell it was not resolved."""
    return {
        key: _SECRET.sub(lambda m: secrets.get(m.group(1), m.group(0)), value)
        for key, value in config.items()
    }
