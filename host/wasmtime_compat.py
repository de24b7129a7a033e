"""A thread-safety fix for wasmtime-py's component value lowering.

wasmtime-py (checked on 50.0.1) lowers an untagged variant, option or result by filling a
module-level set (`case_test_cache`) with the Python classes of each case and testing the
value against it. Two threads lowering at once clear and refill the same set, so a valid
value is rejected ("value not valid for this variant", "expected Variant type") and the
guest call traps. The host runs invocations on many threads, so it replaces `_lower` with
the same algorithm over a set local to the call. `tests/test_wasmtime_compat.py` shows the
race with the stock method and its absence with this one.
"""

from __future__ import annotations

import ctypes
from typing import Any

from wasmtime import _ffi as ffi
from wasmtime.component import _types

_installed = False


def _thread_safe_lower(self: Any, store: Any, val: Any) -> tuple[str, Any]:
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
        raw = ffi.wasmtime_component_val_t()
        payload = val.payload if tagged else val
        ty.convert_to_c(store, payload, ctypes.pointer(raw))
        return (name, ffi.wasmtime_component_val_new(ctypes.byref(raw)))
    raise ValueError("value not valid for this variant")


def install() -> None:
    """Idempotent. Refuses to patch a wasmtime whose lowering no longer looks as expected."""
    global _installed
    if _installed:
        return
    variant_like = getattr(_types, "VariantLikeType", None)
    if variant_like is None or not hasattr(_types, "case_test_cache"):
        return  # a wasmtime-py without the shared cache: nothing to fix
    variant_like._lower = _thread_safe_lower
    _installed = True
