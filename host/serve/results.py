"""A provisioner outcome as a Temper terminal result.

Temper decodes a guest's result strictly (`decode_terminal_result`,
`crates/temper-wasm/src/engine/result.rs` in `nerdsane/temper`; `host/temper_abi/result.py`):
a success is exactly `{"action", "params", "success": true}` (no `error` key), a failure
either the exact legacy `callback` shape or a typed failure. The shim hands the service's
answer to Temper verbatim, so the service answers in those shapes:

- a successful outcome (SandboxReady, SandboxQueued, SandboxReleased, SandboxStatus):
  `{"action": A, "params": P, "success": true}`;
- a failed outcome (SandboxFailed): a typed failure (ADR-0187), routed by category:
  a retryable failure is `transient` / `with_backoff`, any other `permanent` / `never`,
  both `not_applied` (the component records a create before it returns, and a failure
  leaves no sandbox it holds). The component's code is the stable `code` (reduced to the
  token alphabet), its message the `diagnostic` when it fits 512 bytes, and the
  outcome's action a detail. A spec without failure routes receives it through its
  legacy `on_failure` action (`handle_wasm_failure`, ADR-0187 Sub-Decision 3).
"""

from __future__ import annotations

import re
from typing import Any

from host.temper_abi.result import MAX_DIAGNOSTIC_BYTES
from provisioner.model import Outcome

_NOT_TOKEN = re.compile(r"[^A-Za-z0-9._:-]")


def stable_code(code: str) -> str:
    token = _NOT_TOKEN.sub("_", code)[:64]
    return token or "UnknownFailure"


def temper_result(outcome: Outcome) -> dict[str, Any]:
    if outcome.success:
        return {"action": outcome.action, "params": outcome.params, "success": True}
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
