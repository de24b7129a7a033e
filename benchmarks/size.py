"""Figure 5: the component's size against the Temper runtime's 10 MiB module cap, what
takes the space, and what stripping its custom sections saves (wasm-tools, through
benchmarks/wasm_sections.py).

The probe guest (a ~200-line app built the same way) is measured beside it: the
difference is what the provisioner's own code adds. Each shrink is applied to a copy and
checked by wasm-tools' validator; unless --quick, the stripped copy is also compiled and
runs one provision and one release against the mock, so "safe" means it was run, not
assumed. The memory image's zero runs are shown but not dropped: no maintained tool
rewrites a component's data segments, and even dropped they would leave the component
over the cap (docs/temper-upstream.md).

Run alone: .venv/bin/python -m benchmarks.size [--quick]
"""

from __future__ import annotations

import gzip
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.support import invocation, mock_e2b, open_hosts, run_alone
from benchmarks.table import Row, times
from benchmarks.wasm_sections import Breakdown, breakdown, strip_custom_sections, validate
from host.runtime.loader import load_component
from host.runtime.paths import default_component
from provisioner.model import SANDBOX_READY, SANDBOX_RELEASED
from tests.guests.build import build_probe_component

MIB = 1 << 20
TEMPER_MODULE_CAP = 10 * MIB


def mib(size: int) -> str:
    return f"{size / MIB:.2f} MiB"


@dataclass(frozen=True)
class SizeFigures:
    size: int
    gzipped: int
    parts: Breakdown
    probe_size: int
    stripped: int
    stripped_runs: bool | None


def verify_runs(component: Path) -> bool:
    """Compiles `component` (an empty cache) and runs a provision and a release with it."""
    with tempfile.TemporaryDirectory(prefix="bench-size-") as cache:
        loaded = load_component(component, cache_dir=Path(cache), use_cache=False)
        with mock_e2b() as mock:
            hosts = open_hosts(loaded, mock.url)
            try:
                ready = hosts.component.invoke(invocation(mock.url, "stripped"))
                released = hosts.component.invoke(
                    invocation(mock.url, "stripped", operation="release")
                )
            finally:
                hosts.close()
    return ready.action == SANDBOX_READY and released.action == SANDBOX_RELEASED


def measure(path: Path | None, quick: bool) -> SizeFigures:
    wasm = Path(path or default_component()).read_bytes()
    stripped = strip_custom_sections(wasm)
    validate(stripped)  # ValueError: the figure fails rather than report an invalid size
    verified: bool | None = None
    if not quick:
        with tempfile.TemporaryDirectory(prefix="bench-stripped-") as scratch:
            target = Path(scratch) / "stripped.wasm"
            target.write_bytes(stripped)
            verified = verify_runs(target)
    return SizeFigures(
        size=len(wasm),
        gzipped=len(gzip.compress(wasm, 9)),
        parts=breakdown(wasm),
        probe_size=build_probe_component().stat().st_size,
        stripped=len(stripped),
        stripped_runs=verified,
    )


def rows(f: SizeFigures) -> list[Row]:
    parts = f.parts
    custom = ", ".join(
        f"{name} {size / 1024:.0f} KiB"
        for name, size in sorted(parts.custom.items(), key=lambda kv: -kv[1])
    )
    ran = {
        None: "valid, not run (--quick)",
        True: "valid, compiled and ran provision+release",
        False: "valid but FAILED to run",
    }[f.stripped_runs]
    cap = "<= 10 MiB (Temper's module cap)"
    return [
        Row(
            "5",
            "component size (dist/sandbox_provisioner.wasm)",
            mib(f.size),
            times(f.size / TEMPER_MODULE_CAP),
            "10 MiB cap",
            cap,
            f.size <= TEMPER_MODULE_CAP,
        ),
        Row(
            "5",
            "  pre-initialised memory image (data segments)",
            f"{mib(parts.data_segments)}, of which {mib(parts.data_zero_bytes)} zero bytes",
            f"{parts.data_segments / f.size:.0%}",
            "component",
        ),
        Row(
            "5",
            "  code (CPython interpreter, runtime, adapters)",
            mib(parts.code),
            f"{parts.code / f.size:.0%}",
            "component",
        ),
        Row(
            "5",
            "  custom sections",
            f"{mib(parts.custom_total)} ({custom})",
            f"{parts.custom_total / f.size:.1%}",
            "component",
        ),
        Row(
            "5",
            "  everything else (types, imports, exports, glue)",
            mib(parts.other),
            f"{parts.other / f.size:.1%}",
            "component",
        ),
        Row(
            "5",
            "  the probe guest, built the same way",
            mib(f.probe_size),
            f"{(f.probe_size - f.size) / 1024:+.0f} KiB",
            "component",
        ),
        Row(
            "5",
            "gzip -9 of the component",
            mib(f.gzipped),
            times(f.gzipped / TEMPER_MODULE_CAP),
            "10 MiB cap",
        ),
        Row(
            "5",
            "shrink: strip custom sections",
            f"{mib(f.stripped)} ({ran})",
            times(f.stripped / TEMPER_MODULE_CAP),
            "10 MiB cap",
            cap,
            f.stripped <= TEMPER_MODULE_CAP,
        ),
    ]


def main() -> None:
    run_alone(__doc__, lambda quick: rows(measure(None, quick)))


if __name__ == "__main__":
    main()
