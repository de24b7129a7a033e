"""Two fixes to wasmtime-py's lowering of host values into WIT variants (checked on 50.0.1).

1. Thread safety. wasmtime-py lowers an untagged variant, option or result by filling a
   module-level set (`case_test_cache`) with the Python classes of each case and testing
   the value against it. Two threads lowering at once clear and refill the same set, so a
   valid value is rejected ("value not valid for this variant", "expected Variant type")
   and the guest call traps. The host runs invocations on many threads, so `_lower` is
   replaced by the same algorithm over a set local to the call.
2. Unambiguous `err`. An untagged result picks its case by the value's Python type, and an
   `option<T>` ok case claims every type (its `none` is "any object"), so an error value
   returned for `result<option<entry>, storage-error>` was lowered as the ok case and the
   guest trapped: a storage failure on `get` became `host_error` instead of the guest's
   retryable `storage_unavailable`. Host functions wrap errors in `WitErr`, which always
   lowers as `err`.

Regression tests: the concurrency test in tests/test_end_to_end.py and the storage-failure
tests in tests/test_hardening_*.py.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from wasmtime import _ffi as ffi
from wasmtime.component import _types

_installed = False


@dataclass(frozen=True)
class WitErr:
    """The `err` case of a WIT `result`, whatever its `ok` type."""

    payload: object


def _lower_payload(ty: Any, store: Any, payload: Any) -> Any:
    raw = ffi.wasmtime_component_val_t()
    ty.convert_to_c(store, payload, ctypes.pointer(raw))
    return ffi.wasmtime_component_val_new(ctypes.byref(raw))


def _thread_safe_lower(self: Any, store: Any, val: Any) -> tuple[str, Any]:
    if isinstance(val, WitErr):
        if not isinstance(self, _types.ResultType):
            raise TypeError("WitErr is only for results")
        err_type = self.err
        return ("err", None if err_type is None else _lower_payload(err_type, store, val.payload))
    tagged = self._tagged()
    if tagged and not isinstance(val, _types.Variant):
        raise TypeError("expected Variant type")
    for name, ty in self._cases():
        if tagged:
            if name != val.tag:
                continue
        elif ty is None:
            if val is not None:
                continue
        else:
            classes: set[type] = set()
            ty.add_classes(classes)
            if not isinstance(val, tuple(classes)):
                continue
        if ty is None:
            return (name, None)
        return (name, _lower_payload(ty, store, val.payload if tagged else val))
    raise ValueError("value not valid for this variant")


def install() -> None:
    """Idempotent. Refuses to patch a wasmtime whose lowering no longer looks as expected."""
    global _installed
    if _installed:
        return
    variant_like = getattr(_types, "VariantLikeType", None)
    if variant_like is None or not hasattr(variant_like, "_lower"):
        raise RuntimeError(
            "wasmtime-py's variant lowering changed: review host/runtime/wasmtime_compat.py"
        )
    variant_like._lower = _thread_safe_lower
    # Subclasses that overrode `_lower` themselves would bypass both fixes.
    for subclass in (_types.VariantType, _types.OptionType, _types.ResultType):
        if "_lower" in vars(subclass):
            raise RuntimeError(
                f"{subclass.__name__} overrides _lower: review host/runtime/wasmtime_compat.py"
            )
    _installed = True
