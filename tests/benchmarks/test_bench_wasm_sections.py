"""The section rewriter behind the size benchmark's shrinks (benchmarks/wasm_sections.py):
a shrink that changed what a module computes or initialises would be worse than none."""

from __future__ import annotations

import wasmtime
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.wasm_sections import (
    CUSTOM,
    breakdown,
    drop_zero_runs,
    parse,
    read_sleb,
    read_uleb,
    sleb,
    strip_custom_sections,
    uleb,
)

PAGE = 65536
# Zero runs long and short, a segment that is all zeros, and one that crosses a page.
WAT = r"""
(module
  (memory (export "memory") 2)
  (data (i32.const 16) "head\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00tail")
  (data (i32.const 200) "\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00")
  (data (i32.const 300) "a\00b\00\00c")
  (data (i32.const 65530) "\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00xyz")
  (func (export "answer") (result i32) (i32.const 42))
)
"""
IMPORTED_MEMORY_WAT = r"""
(module
  (import "env" "memory" (memory 1))
  (data (i32.const 0) "x\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00y")
)
"""


def _module_bytes(wat: str) -> bytes:
    return bytes(wasmtime.wat2wasm(wat))


def _with_name_section(wasm: bytes) -> bytes:
    name = b"name"
    payload = uleb(len(name)) + name + b"\x01\x02\x03"
    return wasm + bytes([CUSTOM]) + uleb(len(payload)) + payload


def _memory_after_instantiation(wasm: bytes) -> bytes:
    store = wasmtime.Store()
    instance = wasmtime.Instance(store, wasmtime.Module(store.engine, wasm), [])
    memory = instance.exports(store)["memory"]
    assert isinstance(memory, wasmtime.Memory)
    return bytes(memory.read(store, 0, 2 * PAGE))


def test_parse_then_encode_gives_the_same_bytes() -> None:
    # Catches a section whose size or nesting is re-encoded differently.
    wasm = _with_name_section(_module_bytes(WAT))
    assert parse(wasm).encode() == wasm


def test_dropping_zero_runs_leaves_memory_exactly_as_before() -> None:
    # Catches a wrong offset for a split piece, or a dropped non-zero byte.
    wasm = _module_bytes(WAT)
    shrunk = drop_zero_runs(wasm, min_run=4)
    assert len(shrunk) < len(wasm)
    assert breakdown(shrunk).data_zero_bytes < breakdown(wasm).data_zero_bytes
    assert _memory_after_instantiation(shrunk) == _memory_after_instantiation(wasm)


def test_an_imported_memory_keeps_its_zeros() -> None:
    # Catches zeros dropped from a memory the module does not own (they overwrite bytes).
    wasm = _module_bytes(IMPORTED_MEMORY_WAT)
    assert drop_zero_runs(wasm, min_run=4) == wasm


def test_stripping_custom_sections_keeps_a_working_module() -> None:
    # Catches a strip that removes a non-custom section or breaks the encoding.
    wasm = _with_name_section(_module_bytes(WAT))
    stripped = strip_custom_sections(wasm)
    assert not [s for s in parse(stripped).sections if s.id == CUSTOM]
    store = wasmtime.Store()
    instance = wasmtime.Instance(store, wasmtime.Module(store.engine, stripped), [])
    answer = instance.exports(store)["answer"]
    assert isinstance(answer, wasmtime.Func)
    assert answer(store) == 42


@given(st.integers(min_value=0, max_value=2**64))
def test_uleb_round_trips(value: int) -> None:
    assert read_uleb(uleb(value), 0) == (value, len(uleb(value)))


@given(st.integers(min_value=-(2**63), max_value=2**63))
def test_sleb_round_trips(value: int) -> None:
    # Catches a sign bit lost on an i32.const offset above 2 GiB.
    assert read_sleb(sleb(value), 0) == (value, len(sleb(value)))
