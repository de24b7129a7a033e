"""Which entity action Temper dispatches after a WASM trigger, given its result.

From `nerdsane/temper`, `crates/temper-server/src/state/dispatch/wasm/`:
- success (`invocation.rs`, `invoke_and_handle_result`): the trigger's static `on_success`
  wins over the module's `action`; an empty one dispatches nothing;
- failure (`invocation_artifacts.rs`, `handle_wasm_failure`): when the trigger declares
  `failure_routes`, the failure's category picks the route (`failure_routing.rs`,
  `failure_callback`; an undeclared category is `UndeclaredFailureCategory` and nothing
  is dispatched) with params `{"failure": envelope}`; a legacy or untyped failure counts
  as `permanent` there (`WasmFailure::Legacy`). Without routes, `on_failure` gets
  `{error, error_message, integration}`; without either, the failure propagates.
The envelope here carries the guest's declaration; Temper adds operation and provenance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from host.runtime.temper_result import TemperResult


@dataclass(frozen=True)
class Trigger:
    name: str
    on_success: str | None = None
    on_failure: str | None = None
    failure_routes: Mapping[str, str] | None = None  # category -> callback action


@dataclass(frozen=True)
class Dispatch:
    action: str | None  # None: nothing dispatched
    params: Any
    error: str | None = None  # why nothing was dispatched, when it is a failure


def dispatch_for(trigger: Trigger, result: TemperResult) -> Dispatch:
    if result.success:
        action = trigger.on_success or result.callback_action
        return Dispatch(action or None, result.callback_params)
    if result.typed_failure is not None:
        category = str(result.typed_failure["category"])
        diagnostic = (
            f"typed guest failure category={category.capitalize()}"
            f" code={result.typed_failure['code']}"
        )
    else:
        category = "permanent"  # LegacyFreeFormFailure
        diagnostic = result.error or f"WASM integration '{trigger.name}' returned unsuccessful"
    if trigger.failure_routes:
        callback = trigger.failure_routes.get(category)
        if callback is None:
            return Dispatch(
                None,
                None,
                f"UndeclaredFailureCategory: trigger '{trigger.name}' has no '{category}' route",
            )
        return Dispatch(callback, {"failure": result.typed_failure or {"category": category}})
    if trigger.on_failure:
        return Dispatch(
            trigger.on_failure,
            {"error": diagnostic, "error_message": diagnostic, "integration": trigger.name},
        )
    return Dispatch(None, None, diagnostic)
