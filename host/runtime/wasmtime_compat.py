"""Patches to wasmtime-py's component value conversion; docs/wasmtime-compat.md gives each
one's reason, its benchmark figure and what would let it go upstream.

1. Thread safety: variants are lowered without wasmtime-py's shared `case_test_cache`.
2. `WitErr`: an error value always lowers as a result's `err` case.
3. Bulk `list<u8>`: bytes cross the boundary in one copy each way, not one call per byte.
4. Cached types: derived type properties are memoized and call signatures reused.

`install()` refuses to patch a wasmtime-py whose internals no longer look as expected, so an
upgrade fails loudly at start instead of misbehaving.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from ctypes import byref, pointer
from dataclasses import dataclass
from typing import Any

from wasmtime import _ffi as ffi
from wasmtime.component import _enter, _func, _linker, _types

_installed = False
_fast_installed = False
_install_lock = threading.Lock()


@dataclass(frozen=True)
class WitErr:
    """The `err` case of a WIT `result`, whatever its `ok` type."""

    payload: object


# -- 4. memoized type properties ---------------------------------------------------

_MEMO = "_compat_memo"


def _memo(obj: Any) -> dict[str, Any]:
    memo: dict[str, Any] | None = obj.__dict__.get(_MEMO)
    if memo is None:
        memo = {}
        obj.__dict__[_MEMO] = memo
    return memo


def _memoized_method(original: Callable[[Any], Any], name: str) -> Callable[[Any], Any]:
    def method(self: Any) -> Any:
        memo = _memo(self)
        try:
            value = memo[name]
        except KeyError:
            value = memo[name] = original(self)
        # Lists are handed out as copies: a caller mutating one must not change the type.
        return list(value) if isinstance(value, list) else value

    method.__name__ = getattr(original, "__name__", name)
    method.__doc__ = original.__doc__
    return method


def _memoized_property(original: property, name: str) -> property:
    getter = original.fget
    assert getter is not None
    return property(_memoized_method(getter, name), doc=original.__doc__)


_MEMO_PROPERTIES: tuple[tuple[str, str], ...] = (
    ("ListType", "element"),
    ("RecordType", "fields"),
    ("TupleType", "elements"),
    ("VariantType", "cases"),
    ("EnumType", "names"),
    ("OptionType", "payload"),
    ("ResultType", "ok"),
    ("ResultType", "err"),
    ("FlagsType", "names"),
)
_MEMO_METHODS: tuple[tuple[str, str], ...] = (
    ("ListType", "_is_bytes"),
    ("VariantLikeType", "_tagged"),
    ("VariantType", "_cases"),
    ("OptionType", "_cases"),
    ("ResultType", "_cases"),
)


# -- 1 and 2. lowering variants --------------------------------------------------------


def _lower_payload(ty: Any, store: Any, payload: Any) -> Any:
    raw = ffi.wasmtime_component_val_t()
    ty.convert_to_c(store, payload, ctypes.pointer(raw))
    return ffi.wasmtime_component_val_new(ctypes.byref(raw))


def _case_classes(variant: Any) -> list[tuple[str, Any, tuple[type, ...] | None]]:
    """(name, payload type, the classes an untagged value of that case has) per case."""
    memo = _memo(variant) if _fast_installed else {}  # without fix 4: as wasmtime-py does
    cases: list[tuple[str, Any, tuple[type, ...] | None]] | None = memo.get("case_classes")
    if cases is None:
        cases = []
        for name, ty in variant._cases():
            classes: set[type] = set()
            if ty is not None:
                ty.add_classes(classes)
            cases.append((name, ty, None if ty is None else tuple(classes)))
        memo["case_classes"] = cases
    return cases


def _thread_safe_lower(self: Any, store: Any, val: Any) -> tuple[str, Any]:
    if isinstance(val, WitErr):
        if not isinstance(self, _types.ResultType):
            raise TypeError("WitErr is only for results")
        err_type = self.err
        return ("err", None if err_type is None else _lower_payload(err_type, store, val.payload))
    tagged = self._tagged()
    if tagged and not isinstance(val, _types.Variant):
        raise TypeError("expected Variant type")
    for name, ty, classes in _case_classes(self):
        if tagged:
            if name != val.tag:
                continue
        elif classes is None:
            if val is not None:
                continue
        elif not isinstance(val, classes):
            continue
        if ty is None:
            return (name, None)
        return (name, _lower_payload(ty, store, val.payload if tagged else val))
    raise ValueError("value not valid for this variant")


# -- 3. bulk list<u8> --------------------------------------------------------------------

_VAL_SIZE = ctypes.sizeof(ffi.wasmtime_component_val_t)
_PAYLOAD_OFFSET = ffi.wasmtime_component_val_t.of.offset  # where the union (u8) starts
_U8_KIND = int(ffi.WASMTIME_COMPONENT_U8.value)


def _bytes_to_vals(data: bytes) -> bytearray:
    """`data` as an array of `wasmtime_component_val_t`, each `{kind: U8, of.u8: byte}`."""
    count = len(data)
    buffer = bytearray(count * _VAL_SIZE)
    buffer[0::_VAL_SIZE] = bytes((_U8_KIND,)) * count
    buffer[_PAYLOAD_OFFSET::_VAL_SIZE] = data
    return buffer


def _vals_to_bytes(raw: bytes, count: int) -> bytes:
    if raw[0::_VAL_SIZE] != bytes((_U8_KIND,)) * count:
        raise TypeError("list<u8> holds a value that is not a u8")
    return raw[_PAYLOAD_OFFSET::_VAL_SIZE]


_original_list_to_c: Callable[..., None] | None = None
_original_list_from_c: Callable[..., Any] | None = None


def _list_to_c(self: Any, store: Any, val: Any, ptr: Any) -> None:
    if not self._is_bytes():
        assert _original_list_to_c is not None
        _original_list_to_c(self, store, val, ptr)
        return
    if not isinstance(val, bytes):
        raise TypeError("expected bytes value")
    raw = ffi.wasmtime_component_vallist_t()
    ffi.wasmtime_component_vallist_new_uninit(raw, len(val))
    if val:
        ctypes.memmove(raw.data, bytes(_bytes_to_vals(val)), len(val) * _VAL_SIZE)
    ptr.contents.kind = ffi.WASMTIME_COMPONENT_LIST
    ptr.contents.of.list = raw


def _list_from_c(self: Any, c: Any) -> Any:
    if not self._is_bytes():
        assert _original_list_from_c is not None
        return _original_list_from_c(self, c)
    assert c.kind == ffi.WASMTIME_COMPONENT_LIST.value
    try:
        count = int(c.of.list.size)
        if count == 0:
            return b""
        return _vals_to_bytes(ctypes.string_at(c.of.list.data, count * _VAL_SIZE), count)
    finally:
        # u8 values own nothing: deleting the list frees only its array.
        ffi.wasmtime_component_vallist_delete(byref(c.of.list))


# -- 4. cached signatures ----------------------------------------------------------------

Signature = tuple[list[tuple[str, Any]], Any]


class SignatureCache:
    """Signatures keyed by a hint (None: no hint, the recent signatures are scanned); a
    hit is used only when wasmtime says the fresh top-level types equal the cached ones
    (their memoized subtrees are then reused)."""

    RECENT = 16

    def __init__(self) -> None:
        self._signatures: dict[object, Signature] = {}
        self._recent: list[Signature] = []
        self.hits = 0
        self.misses = 0

    def signature(self, key: object | None, fty: Any) -> Signature:
        fresh: Signature = (fty.params, fty.result)
        candidates = self._recent if key is None else [self._signatures.get(key)]
        for cached in candidates:
            if cached is not None and _same_signature(cached, fresh):
                self.hits += 1
                return cached
        self.misses += 1
        if key is None:
            self._recent = [fresh, *self._recent[: self.RECENT - 1]]
        else:
            self._signatures[key] = fresh
        return fresh


def _same_signature(cached: Signature, fresh: Signature) -> bool:
    cached_params, cached_result = cached
    fresh_params, fresh_result = fresh
    if len(cached_params) != len(fresh_params):
        return False
    if (cached_result is None) != (fresh_result is None):
        return False
    if cached_result is not None and not _same_type(cached_result, fresh_result):
        return False
    return all(
        name == other_name and _same_type(ty, other)
        for (name, ty), (other_name, other) in zip(cached_params, fresh_params, strict=True)
    )


def _same_type(a: Any, b: Any) -> bool:
    # Compound types compare through wasmtime (`*_type_equal`); primitives are dataclasses.
    return type(a) is type(b) and bool(a == b)


HOST_SIGNATURES = SignatureCache()
EXPORT_SIGNATURES = SignatureCache()


def _host_func_callback(
    idx: Any, context: Any, ty_raw: Any, args: Any, nargs: int, results: Any, nresults: int
) -> Any:
    def run(store: Any) -> None:
        with _types.FuncType._from_ptr(ty_raw, owner=store) as fty:
            func = _linker.FUNCTIONS.get(idx or 0)
            param_tys, result_ty = HOST_SIGNATURES.signature(idx or 0, fty)
            if len(param_tys) != nargs:
                raise TypeError(f"host function got {nargs} arguments for {len(param_tys)}")
            if (result_ty is None) != (nresults == 0):
                raise TypeError("host function result count does not match its type")
            pyargs = [ty.convert_from_c(args[i]) for i, (_, ty) in enumerate(param_tys)]
            result = func(store, *pyargs)
            if result_ty is None:
                if result is not None:
                    raise TypeError("host function returned a value for a function without one")
            else:
                result_ty.convert_to_c(store, result, results)

    return _enter.catch_exceptions(context, run)


_HOST_FUNC_IMPL = ffi.wasmtime_component_func_callback_t(_host_func_callback)


def _export_call(self: Any, store: Any, *params: Any) -> Any:
    fty = self.type(store)
    param_tys, result_ty = EXPORT_SIGNATURES.signature(None, fty)
    if len(params) != len(param_tys):
        raise TypeError(
            f"wrong number of parameters provided: given {len(params)}, expected {len(param_tys)}"
        )
    param_capi = (ffi.wasmtime_component_val_t * len(params))()
    lowered = 0
    try:
        for (_name, ty), val in zip(param_tys, params, strict=True):
            ty.convert_to_c(store, val, pointer(param_capi[lowered]))
            lowered += 1
        result_space = None
        result_capi = None
        if result_ty is not None:
            result_space = ffi.wasmtime_component_val_t()
            result_capi = byref(result_space)

        def run() -> Any:
            return ffi.wasmtime_component_func_call(
                byref(self._func),
                store._context(),
                param_capi,
                lowered,
                result_capi,
                0 if result_space is None else 1,
            )

        _enter.enter_wasm(run)
        if result_space is None:
            return None
        return result_ty.convert_from_c(result_space)
    finally:
        for i in range(lowered):
            ffi.wasmtime_component_val_delete(byref(param_capi[i]))


# -- installing -------------------------------------------------------------------------


def _refuse(what: str) -> RuntimeError:
    return RuntimeError(f"wasmtime-py's {what} changed: review host/runtime/wasmtime_compat.py")


def _check_internals() -> None:
    variant_like = getattr(_types, "VariantLikeType", None)
    if variant_like is None or not hasattr(variant_like, "_lower"):
        raise _refuse("variant lowering")
    # Subclasses that overrode `_lower` themselves would bypass fixes 1 and 2.
    for subclass in (_types.VariantType, _types.OptionType, _types.ResultType):
        if "_lower" in vars(subclass):
            raise _refuse(f"{subclass.__name__}._lower")
    for class_name, name in _MEMO_PROPERTIES:
        if not isinstance(vars(getattr(_types, class_name)).get(name), property):
            raise _refuse(f"{class_name}.{name}")
    for class_name, name in _MEMO_METHODS:
        if not callable(vars(getattr(_types, class_name)).get(name)):
            raise _refuse(f"{class_name}.{name}")
    fields: dict[str, Any] = {f[0]: f[1] for f in ffi.wasmtime_component_val_t._fields_}
    if list(fields) != ["kind", "of"] or fields["kind"] is not ctypes.c_ubyte:
        raise _refuse("wasmtime_component_val_t layout")
    u8_field: Any = ffi.wasmtime_component_valunion_t.u8
    if u8_field.offset != 0 or _VAL_SIZE < _PAYLOAD_OFFSET + 1:
        raise _refuse("wasmtime_component_val_t union layout")
    if [f[0] for f in ffi.wasmtime_component_vallist_t._fields_] != ["size", "data"]:
        raise _refuse("wasmtime_component_vallist_t layout")
    list_type = vars(_types.ListType)
    if not callable(list_type.get("convert_to_c")) or not callable(list_type.get("convert_from_c")):
        raise _refuse("ListType conversion")
    # Fix 4 swaps the callback that `LinkerInstance.add_func` registers, by its global name.
    if not isinstance(getattr(_linker, "func_impl", None), ffi.wasmtime_component_func_callback_t):
        raise _refuse("component linker callback")
    if "func_impl" not in _linker.LinkerInstance.add_func.__code__.co_names:
        raise _refuse("LinkerInstance.add_func")
    for name in ("FUNCTIONS",):
        if not hasattr(_linker, name):
            raise _refuse(f"component linker {name}")
    if not hasattr(_enter, "catch_exceptions") or not hasattr(_enter, "enter_wasm"):
        raise _refuse("component call plumbing")
    if not callable(vars(_func.Func).get("__call__")) or not callable(vars(_func.Func).get("type")):
        raise _refuse("component Func")


FAST_CONVERSIONS_ENV = "SANDBOX_PROVISIONER_FAST_CONVERSIONS"


def fast_conversions_requested() -> bool:
    """Fixes 3 and 4 are on unless the environment says `0` (the benchmarks' baseline: the
    code path before them, for side-by-side figures)."""
    return os.environ.get(FAST_CONVERSIONS_ENV, "1").strip() not in ("0", "false", "no")


def install(*, fast_conversions: bool | None = None) -> None:
    """Idempotent. Refuses to patch a wasmtime whose conversions no longer look as expected.

    Fixes 1 and 2 (correctness) always; fixes 3 and 4 (speed) unless `fast_conversions`
    is False (None: `fast_conversions_requested()`). Must run before the first
    `LinkerInstance.add_func`: host functions registered earlier keep wasmtime-py's own
    callback."""
    global _installed, _fast_installed, _original_list_to_c, _original_list_from_c
    fast = fast_conversions_requested() if fast_conversions is None else fast_conversions
    with _install_lock:
        if not _installed:
            _check_internals()
            _types.VariantLikeType._lower = _thread_safe_lower  # type: ignore[method-assign]
            _installed = True
        if not fast or _fast_installed:
            return
        for class_name, name in _MEMO_PROPERTIES:
            cls = getattr(_types, class_name)
            setattr(cls, name, _memoized_property(vars(cls)[name], name))
        for class_name, name in _MEMO_METHODS:
            cls = getattr(_types, class_name)
            setattr(cls, name, _memoized_method(vars(cls)[name], name))
        _original_list_to_c = _types.ListType.convert_to_c
        _original_list_from_c = _types.ListType.convert_from_c
        _types.ListType.convert_to_c = _list_to_c  # type: ignore[method-assign]
        _types.ListType.convert_from_c = _list_from_c  # type: ignore[method-assign]
        _linker.func_impl = _HOST_FUNC_IMPL
        _func.Func.__call__ = _export_call  # type: ignore[method-assign]
        _fast_installed = True


def fast_conversions_installed() -> bool:
    return _fast_installed


__all__ = [
    "EXPORT_SIGNATURES",
    "FAST_CONVERSIONS_ENV",
    "HOST_SIGNATURES",
    "SignatureCache",
    "WitErr",
    "fast_conversions_installed",
    "fast_conversions_requested",
    "install",
]
