"""Reading and rewriting the sections of a WebAssembly component, in plain Python.

Enough of the binary format (component model layer 1 and core wasm 1.0) to say what
takes the space in a componentize-py component and to try two lossless shrinks:
dropping custom sections (names, producers) and dropping the zero bytes from the
pre-initialised memory image (a locally defined memory starts zeroed, so a data
segment's zero runs initialise nothing). Everything else is copied byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

COMPONENT_HEADER = b"\x00asm\x0d\x00\x01\x00"
MODULE_HEADER = b"\x00asm\x01\x00\x00\x00"

# Component-level section ids that hold a nested binary.
COMPONENT_CORE_MODULE = 1
COMPONENT_COMPONENT = 4
# Core section ids.
CUSTOM = 0
CORE_IMPORT = 2
CORE_MEMORY = 5
CORE_CODE = 10
CORE_DATA = 11
CORE_DATA_COUNT = 12
_I32_CONST = 0x41
_END = 0x0B
# A data segment costs a flag, an i32.const offset (up to 5 bytes), an end and a length
# (up to 5 bytes): a zero run shorter than this is cheaper kept than split around.
MIN_ZERO_RUN = 16
# Validators refuse a module with more data segments than this (wasmparser's limit).
MAX_DATA_SEGMENTS = 100_000


def read_uleb(data: bytes, offset: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[offset]
        offset += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, offset


def read_sleb(data: bytes, offset: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[offset]
        offset += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if byte & 0x40:
                result -= 1 << shift
            return result, offset


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

    @property
    def custom_name(self) -> str | None:
        if self.id != CUSTOM:
            return None
        length, start = read_uleb(self.payload, 0)
        return self.payload[start : start + length].decode("utf-8", "replace")


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

    def walk(self, depth: int = 0) -> Iterator[tuple[int, Binary, Section]]:
        """Every section, depth first, with its depth and the binary that holds it."""
        for section in self.sections:
            yield depth, self, section
            if section.nested is not None:
                yield from section.nested.walk(depth + 1)


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


# -- what takes the space ---------------------------------------------------------------


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


def breakdown(data: bytes) -> Breakdown:
    binary = parse(data)
    result = Breakdown(total=len(data))
    for _, holder, section in binary.walk():
        if section.nested is not None:
            if section.nested.is_component:
                result.nested_components += 1
            else:
                result.core_modules += 1
            continue
        if section.id == CUSTOM:
            name = section.custom_name or "?"
            result.custom[name] = result.custom.get(name, 0) + len(section.payload) + 1
        elif not holder.is_component and section.id == CORE_CODE:
            result.code += len(section.payload)
        elif not holder.is_component and section.id == CORE_DATA:
            for segment in parse_data(section.payload):
                result.data_segments += len(segment.data)
                result.data_zero_bytes += segment.data.count(0)
    return result


# -- shrinking -------------------------------------------------------------------------


def strip_custom_sections(data: bytes) -> bytes:
    binary = parse(data)
    _strip(binary)
    return binary.encode()


def _strip(binary: Binary) -> None:
    binary.sections = [s for s in binary.sections if s.id != CUSTOM]
    for section in binary.sections:
        if section.nested is not None:
            _strip(section.nested)


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
    args.target.write_bytes(shrunk)
    print(f"{args.source}: {args.source.stat().st_size} -> {len(shrunk)} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
