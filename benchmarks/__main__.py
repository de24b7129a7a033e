"""`python -m benchmarks`: every benchmark figure, printed as one table of ratios.

The benchmarks live in the source checkout (they import the installed product, never the
other way round). Figures are ratios measured side by side in one run; nothing here is a
pass/fail gate, and the exit status says only whether the benchmarks ran.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FIGURES = ("invocation", "throughput", "makespan", "scaling", "memory", "size", "pace")
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes (about a minute): incident scenario only in real "
        "time, fewer repetitions, shrunk component not compiled",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=FIGURES,
        metavar="FIGURE",
        help=f"run only this figure (repeatable): {', '.join(FIGURES)}",
    )
    parser.add_argument(
        "--calls",
        type=int,
        default=None,
        metavar="N",
        help="invocations per series for the overhead figure (default 200; 40 with --quick)",
    )
    parser.add_argument(
        "--component",
        type=Path,
        default=None,
        help="the component (default dist/sandbox_provisioner.wasm)",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the table, the targets and the machine to PATH "
        "(e.g. benchmarks/RESULTS.md)",
    )


def run_bench(args: argparse.Namespace) -> int:
    from host.runtime.paths import default_component

    source = Path(args.component or default_component())
    if not source.is_file():
        print(f"benchmarks: {source} not found: run ./build.sh first", file=sys.stderr)
        return EXIT_USAGE
    # Every figure measures the same bytes, even if the component is rebuilt meanwhile.
    with tempfile.TemporaryDirectory(prefix="bench-component-") as scratch:
        component = Path(scratch) / source.name
        shutil.copyfile(source, component)
        return _run(args, component, source)


def _run(args: argparse.Namespace, component: Path, source: Path) -> int:
    from benchmarks import (
        invocation,
        machine,
        makespan,
        memory,
        pace,
        scaling,
        size,
        throughput,
    )
    from benchmarks.table import Row, format_markdown, format_targets, print_rows
    from host.runtime.loader import load_component

    quick: bool = args.quick
    chosen = args.only or list(FIGURES)
    try:
        loaded = load_component(component)
    except (FileNotFoundError, ValueError) as error:
        print(f"benchmarks: {error}", file=sys.stderr)
        return EXIT_USAGE
    calls = args.calls or (40 if quick else 200)
    facts = machine.describe()
    facts["component"] = f"{source} (sha256 {loaded.sha256[:16]}…)"
    runs: dict[str, Callable[[], list[Row]]] = {
        "invocation": lambda: invocation.rows(
            invocation.measure(loaded, calls, component_path=component)
        ),
        "throughput": lambda: throughput.rows(throughput.measure(component, quick)),
        "makespan": lambda: makespan.measure(loaded, quick),
        "scaling": lambda: scaling.measure(loaded, quick),
        "memory": lambda: memory.rows(memory.measure(component)),
        "size": lambda: size.rows(size.measure(component, quick)),
        "pace": lambda: pace.measure(quick),
    }
    rows: list[Row] = []
    timings: dict[str, float] = {}
    failed: list[str] = []
    for name in FIGURES:
        if name not in chosen:
            continue
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            found = runs[name]()
        except Exception as error:  # one broken figure must not hide the others
            failed.append(f"{name}: {type(error).__name__}: {error}")
            print(f"bench: {name} failed: {error}", file=sys.stderr, flush=True)
            continue
        timings[name] = time.perf_counter() - started
        rows += found
        # Progress on stderr; stdout gets the whole table once, at the end.
        print_rows(found, sys.stderr)
        print(file=sys.stderr, flush=True)
    facts["load average at end"] = machine.load_average()
    facts["run took"] = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    facts["mode"] = "--quick" if quick else "full"
    print_rows(rows)
    print()
    print("targets:")
    print(format_targets(rows))
    for problem in failed:
        print(f"FAILED {problem}")
    if args.markdown is not None:
        args.markdown.write_text(_markdown(rows, facts, failed, format_markdown, format_targets))
        print(f"wrote {args.markdown}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _markdown(
    rows: list[Any],
    facts: dict[str, str],
    failed: list[str],
    table: Callable[[list[Any]], str],
    targets: Callable[[list[Any]], str],
) -> str:
    from benchmarks.machine import format_markdown as machine_markdown

    parts = [
        "# Benchmark results",
        "",
        "Produced by `python -m benchmarks --markdown benchmarks/RESULTS.md`; what each "
        "figure means is in benchmarks/README.md. Ratios are measured side by side in the "
        "same run; absolute times depend on the machine and its load.",
        "",
        "## Machine",
        "",
        machine_markdown(facts),
        "",
        "## Table",
        "",
        table(rows),
        "",
        "## Targets (issues 8 and 16)",
        "",
        targets(rows),
        "",
    ]
    if failed:
        parts += ["## Figures that failed to run", ""] + [f"- {p}" for p in failed] + [""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
