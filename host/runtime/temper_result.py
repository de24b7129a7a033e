"""Decoding a guest's result the way Temper does.

`decode_terminal_result` in `crates/temper-wasm/src/engine/result.rs` accepts exactly one
of three wire shapes (each `deny_unknown_fields`, tried in this order, `serde(untagged)`):

- typed failure: `{"success": false, "typed_failure": {...}}`, the declaration being
  `GuestFailureDeclarationV1` (`crates/temper-failure/src/declaration.rs`);
- legacy failure: `{"action": "callback", "params": {"error": E}, "success": false,
  "error": E}`, exactly;
- success: `{"action": A, "params": P, "success": true}` with a non-empty action.

Anything else is `InvalidShape`; text that is not JSON is `InvalidJson`. serde also
refuses a repeated field, so a duplicate key is an invalid shape here too. The empty-action
rule is from the newer of the two stored versions of result.rs (19eee756); the older one
(36cd9837) accepted an empty action.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

CATEGORIES = ("transient", "integrity", "authorization", "budget", "ambiguous", "permanent")
RETRYABILITIES = ("never", "after_refresh", "with_backoff", "after_authorization", "reconcile")
OUTCOMES = ("not_applied", "applied", "unknown")
DETAIL_KINDS = ("string", "signed", "unsigned", "boolean")
# ADR-0187 v1 budgets (docs/adrs/0187-*.md in nerdsane/temper).
_TOKEN = re.compile(r"[A-Za-z0-9._:-]{1,64}")
MAX_DIAGNOSTIC_BYTES = 512
MAX_DETAILS = 16
MAX_DETAIL_STRING_BYTES = 256


class InvalidGuestResult(ValueError):
    def __init__(self, kind: Literal["invalid_json", "invalid_shape"], detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True)
class TemperResult:
    """`WasmInvocationResult` (`crates/temper-wasm/src/types.rs`) plus the typed failure."""

    callback_action: str
    callback_params: Any
    success: bool
    error: str | None = None
    typed_failure: dict[str, Any] | None = None


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _Duplicate(key)
        seen[key] = value
    return seen


def decode_terminal_result(text: str) -> TemperResult:
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate as error:
        raise InvalidGuestResult("invalid_shape", f"duplicate field {error}") from None
    except json.JSONDecodeError as error:
        raise InvalidGuestResult("invalid_json", error.msg) from None
    if not isinstance(data, dict):
        raise InvalidGuestResult("invalid_shape", "the result is not a JSON object")
    keys = set(data)
    if keys == {"success", "typed_failure"}:
        if data["success"] is not False:
            raise InvalidGuestResult("invalid_shape", "a typed failure needs success false")
        declaration = data["typed_failure"]
        _check_declaration(declaration)
        return TemperResult("", None, False, typed_failure=declaration)
    if keys == {"action", "params", "success", "error"}:
        message = data["error"]
        if (
            data["success"] is not False
            or data["action"] != "callback"
            or not isinstance(message, str)
            or data["params"] != {"error": message}
        ):
            raise InvalidGuestResult("invalid_shape", "not the exact legacy failure shape")
        return TemperResult("callback", data["params"], False, error=message)
    if keys == {"action", "params", "success"}:
        action = data["action"]
        if data["success"] is not True or not isinstance(action, str) or not action:
            raise InvalidGuestResult("invalid_shape", "a success needs success true and an action")
        return TemperResult(action, data["params"], True)
    raise InvalidGuestResult("invalid_shape", f"unexpected fields {sorted(keys)}")


def _check_declaration(declaration: Any) -> None:
    def bad(why: str) -> InvalidGuestResult:
        return InvalidGuestResult("invalid_shape", f"typed_failure: {why}")

    if not isinstance(declaration, dict):
        raise bad("not an object")
    required = {"version", "category", "code", "retryability", "outcome"}
    allowed = required | {"diagnostic", "details"}
    if not required <= set(declaration) <= allowed:
        raise bad(f"fields {sorted(declaration)}")
    version = declaration["version"]
    if version != 1 or isinstance(version, bool):
        raise bad("version must be 1")
    category, retry, outcome = (
        declaration["category"],
        declaration["retryability"],
        declaration["outcome"],
    )
    if category not in CATEGORIES or retry not in RETRYABILITIES or outcome not in OUTCOMES:
        raise bad("unknown category, retryability or outcome")
    code = declaration["code"]
    if not isinstance(code, str) or not _TOKEN.fullmatch(code):
        raise bad("code is not a stable token")
    # validate_failure_semantics (crates/temper-failure/src/envelope.rs).
    if category == "ambiguous" and outcome != "unknown":
        raise bad("an ambiguous failure must have an unknown outcome")
    if (outcome == "unknown") != (retry == "reconcile"):
        raise bad("an unknown outcome goes with reconcile, and only with it")
    diagnostic = declaration.get("diagnostic")
    if diagnostic is not None and (
        not isinstance(diagnostic, str) or len(diagnostic.encode()) > MAX_DIAGNOSTIC_BYTES
    ):
        raise bad("diagnostic is not a bounded string")
    details = declaration.get("details", {})
    if not isinstance(details, dict) or len(details) > MAX_DETAILS:
        raise bad("details is not a bounded object")
    for key, value in details.items():
        if not _TOKEN.fullmatch(key):
            raise bad(f"detail key {key!r}")
        if not isinstance(value, dict) or set(value) != {"kind", "value"}:
            raise bad(f"detail {key!r} is not {{kind, value}}")
        if value["kind"] not in DETAIL_KINDS:
            raise bad(f"detail {key!r} has an unknown kind")
        if value["kind"] == "string" and (
            not isinstance(value["value"], str)
            or len(value["value"].encode()) > MAX_DETAIL_STRING_BYTES
        ):
            raise bad(f"detail {key!r} is not a bounded string")
