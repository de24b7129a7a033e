"""Regression tests of host/runtime/wasmtime_compat.py's conversion fixes (issue 16).

Bulk `list<u8>`: the fast path must produce exactly the C values wasmtime-py's
per-byte path produces, and read back exactly what it reads: checked against the original
functions on a real `list<u8>` type (the probe's storage `value`), for the empty list,
every byte value and a large value, and end to end through a guest that stores bytes and
reads them back. Cached types: a signature is reused only when wasmtime's type equality
says so, and the real callbacks hit the cache after the first call. Guards: a wasmtime-py
whose internals changed is refused.
"""

from __future__ import annotations

import ctypes
import random
from collections.abc import Callable
from typing import Any

import pytest
import wasmtime
from wasmtime import _ffi as ffi
from wasmtime.component import _types

from host.runtime import wasmtime_compat
from host.runtime.loader import LoadedComponent, load_component
from host.services.namespaces import tenant_namespace
from tests.guests.build import build_probe_component
from tests.system.hardening_support import make_probe_host

ALL_BYTES = bytes(range(256))
LARGE = random.Random(16).randbytes(200_000)  # under the 256 KiB storage value limit
VALUES = [b"", b"\x00", ALL_BYTES, ALL_BYTES[::-1] * 3, LARGE]
IDS = ["empty", "one zero", "every byte", "every byte reversed x3", "200 KB"]


@pytest.fixture(scope="module")
def probe() -> LoadedComponent:
    return load_component(build_probe_component())


def _storage_function(probe: LoadedComponent, name: str) -> _types.FuncType:
    """The type of the probe's imported storage function `name`."""
    storage = probe.component.type.imports(probe.engine)[
        "temper:sandbox-provisioner/storage@0.2.0"
    ].ty
    assert isinstance(storage, _types.ComponentInstanceType)
    function = storage.exports(probe.engine)[name].ty
    assert isinstance(function, _types.FuncType)
    return function


@pytest.fixture(scope="module")
def byte_list(probe: LoadedComponent) -> Any:
    """The `list<u8>` of storage `compare-and-swap`'s `value`, as the probe imports it."""
    cas = _storage_function(probe, "compare-and-swap")
    value = dict(cas.params)["value"]
    assert isinstance(value, _types.ListType) and value._is_bytes()
    return value


def _lower(convert: Callable[..., None], ty: Any, data: bytes, store: Any) -> Any:
    raw = ffi.wasmtime_component_val_t()
    convert(ty, store, data, ctypes.pointer(raw))
    return raw


def _c_values(raw: Any) -> list[tuple[int, int]]:
    lst = raw.of.list
    return [(lst.data[i].kind, lst.data[i].of.u8) for i in range(lst.size)]


def test_the_fast_paths_are_installed() -> None:
    assert wasmtime_compat.fast_conversions_installed()
    assert _types.ListType.convert_to_c is wasmtime_compat._list_to_c


@pytest.mark.parametrize("data", VALUES, ids=IDS)
def test_bulk_lowering_writes_what_the_per_byte_path_writes(
    byte_list: Any, probe: LoadedComponent, data: bytes
) -> None:
    store = wasmtime.Store(probe.engine)
    original = wasmtime_compat._original_list_to_c
    assert original is not None
    fast, slow = (_lower(f, byte_list, data, store) for f in (wasmtime_compat._list_to_c, original))
    assert fast.kind == slow.kind == ffi.WASMTIME_COMPONENT_LIST.value
    assert fast.of.list.size == slow.of.list.size == len(data)
    if len(data) <= 4096:  # element by element through ctypes (slow for the large one)
        assert _c_values(fast) == _c_values(slow) == [(_types_u8(), b) for b in data]
    else:
        # Kind bytes and u8 payloads at the struct's stride (padding is left uninitialised).
        stride = ctypes.sizeof(ffi.wasmtime_component_val_t)
        offset = ffi.wasmtime_component_val_t.of.offset
        fast_raw, slow_raw = (
            ctypes.string_at(raw.of.list.data, len(data) * stride) for raw in (fast, slow)
        )
        assert fast_raw[0::stride] == slow_raw[0::stride] == bytes([_types_u8()]) * len(data)
        assert fast_raw[offset::stride] == slow_raw[offset::stride] == data
    # Each lifted by the other path: bulk reads the per-byte path's values and vice versa.
    original_from = wasmtime_compat._original_list_from_c
    assert original_from is not None
    assert wasmtime_compat._list_from_c(byte_list, slow) == data
    assert original_from(byte_list, fast) == data


def _types_u8() -> int:
    return int(ffi.WASMTIME_COMPONENT_U8.value)


def test_bulk_lowering_refuses_what_the_original_refuses(
    byte_list: Any, probe: LoadedComponent
) -> None:
    store = wasmtime.Store(probe.engine)
    for wrong in (bytearray(b"ab"), [1, 2], "ab"):
        with pytest.raises(TypeError, match="expected bytes"):
            _lower(wasmtime_compat._list_to_c, byte_list, wrong, store)  # type: ignore[arg-type]


def test_lifting_refuses_a_list_that_does_not_hold_u8(byte_list: Any) -> None:
    raw = ffi.wasmtime_component_val_t()
    raw.kind = ffi.WASMTIME_COMPONENT_LIST
    ffi.wasmtime_component_vallist_new_uninit(raw.of.list, 2)
    for i in range(2):
        raw.of.list.data[i].kind = ffi.WASMTIME_COMPONENT_BOOL
        raw.of.list.data[i].of.boolean = True
    with pytest.raises(TypeError, match="not a u8"):
        wasmtime_compat._list_from_c(byte_list, raw)


@pytest.mark.parametrize("data", VALUES, ids=IDS)
def test_bytes_cross_the_boundary_unchanged_both_ways(probe: LoadedComponent, data: bytes) -> None:
    host = make_probe_host(probe)
    try:
        outcome = host.call("bytes_echo", tenant="echo", probe_bytes_hex=data.hex())
        stored = host.storage.get(tenant_namespace("echo"), "echo")
    finally:
        host.close()
    assert outcome.action == "ProbeDone", outcome
    # Guest to host (the compare-and-swap's value), then host to guest (get's entry).
    assert stored is not None and stored.value == data
    assert outcome.params["found"] is True
    assert outcome.params["equal"] is True
    assert outcome.params["length"] == len(data)
    if len(data) <= 4096:
        assert outcome.params["hex"] == data.hex()


def test_host_function_signatures_are_reused_after_the_first_call(
    probe: LoadedComponent,
) -> None:
    host = make_probe_host(probe)
    try:
        host.call("bytes_echo", tenant="warm", probe_bytes_hex="01")
        hits = wasmtime_compat.HOST_SIGNATURES.hits
        misses = wasmtime_compat.HOST_SIGNATURES.misses
        export_hits = wasmtime_compat.EXPORT_SIGNATURES.hits
        host.call("bytes_echo", tenant="again", probe_bytes_hex="02")
    finally:
        host.close()
    assert wasmtime_compat.HOST_SIGNATURES.misses == misses
    assert wasmtime_compat.HOST_SIGNATURES.hits >= hits + 2  # compare-and-swap, get
    assert wasmtime_compat.EXPORT_SIGNATURES.hits == export_hits + 1  # run


class _FuncType:
    def __init__(self, params: list[tuple[str, Any]], result: Any) -> None:
        self.params = params
        self.result = result


def test_a_cached_signature_is_used_only_for_an_equal_type() -> None:
    cache = wasmtime_compat.SignatureCache()
    first = cache.signature(7, _FuncType([("a", _types.String())], _types.U8()))
    same = cache.signature(7, _FuncType([("a", _types.String())], _types.U8()))
    assert same is first and cache.hits == 1
    for changed in (
        _FuncType([("a", _types.U8())], _types.U8()),  # a parameter's type
        _FuncType([("b", _types.U8())], _types.U8()),  # a parameter's name
        _FuncType([("b", _types.U8())], None),  # the result
        _FuncType([], None),  # the arity
    ):
        fresh = cache.signature(7, changed)
        assert fresh[0] == changed.params and fresh[1] == changed.result
    assert cache.hits == 1 and cache.misses == 5


def test_memoized_type_properties_hand_out_copies(byte_list: Any, probe: LoadedComponent) -> None:
    get_result = _storage_function(probe, "get").result
    assert isinstance(get_result, _types.ResultType)
    found = get_result.ok
    assert isinstance(found, _types.OptionType)
    entry = found.payload
    assert isinstance(entry, _types.RecordType)
    fields = entry.fields
    fields.clear()  # a caller mutating the list must not change the type
    assert [name for name, _ in entry.fields] == ["value", "version"]


@pytest.mark.parametrize(
    ("target", "name", "replacement"),
    [
        (_types.ListType, "element", None),  # a property no longer a property
        (_types.VariantType, "_lower", lambda self, store, val: None),  # a subclass override
    ],
)
def test_a_changed_wasmtime_is_refused(
    monkeypatch: pytest.MonkeyPatch, target: type, name: str, replacement: Any
) -> None:
    monkeypatch.setattr(target, name, replacement, raising=False)
    with pytest.raises(RuntimeError, match=r"review host/runtime/wasmtime_compat\.py"):
        wasmtime_compat._check_internals()


def test_a_changed_linker_callback_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from wasmtime.component import _linker

    monkeypatch.setattr(_linker, "func_impl", lambda *args: 0)
    with pytest.raises(RuntimeError, match="linker callback"):
        wasmtime_compat._check_internals()


def test_the_baseline_switch_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(wasmtime_compat.FAST_CONVERSIONS_ENV, "0")
    assert not wasmtime_compat.fast_conversions_requested()
    monkeypatch.delenv(wasmtime_compat.FAST_CONVERSIONS_ENV)
    assert wasmtime_compat.fast_conversions_requested()
