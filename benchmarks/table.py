"""The benchmark table: one row per figure, printed with rich and written as markdown.

rich lays out the text table (a terminal gets colours and its own width; a pipe or a file
gets plain text, never wrapped); rich writes no markdown tables, so RESULTS.md's comes
from the few lines of `format_markdown`.
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text


@dataclass(frozen=True)
class Row:
    """One figure. `ratio` is what the figure is about (measured against `baseline`);
    `met` is set only for the figures issue 8 gives a target."""

    figure: str
    what: str
    value: str
    ratio: str = ""
    baseline: str = ""
    target: str = ""
    met: bool | None = None


@dataclass(frozen=True)
class Target:
    """A target's verdict, for the closing list."""

    name: str
    figure: str
    met: bool


def verdict(met: bool | None) -> str:
    if met is None:
        return ""
    return "met" if met else "NOT met"


_HEADERS = ("fig", "what", "value", "ratio", "against", "target")


def _cells(row: Row) -> tuple[str, ...]:
    target = f"{row.target} ({verdict(row.met)})" if row.target else ""
    return (row.figure, row.what, row.value, row.ratio, row.baseline, target)


def _table(rows: Sequence[Row]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for header in _HEADERS:
        table.add_column(header, overflow="fold")
    for row in rows:
        # Text, not str: a "[" in a figure is data, not rich markup.
        cells = [Text(cell) for cell in _cells(row)]
        if row.met is not None:
            cells[-1].stylize("green" if row.met else "bold red")
        table.add_row(*cells)
    return table


# Wide enough that a pipe or a file never gets a wrapped row.
_UNWRAPPED = 10_000


def print_rows(rows: Sequence[Row], file: TextIO | None = None) -> None:
    """The table on `file` (stdout): coloured and fitted to a terminal, plain text elsewhere."""
    out = file if file is not None else sys.stdout
    if not out.isatty():
        print(format_text(rows), file=out, flush=True)
        return
    Console(file=out, highlight=False).print(_table(rows))


def format_text(rows: Sequence[Row]) -> str:
    """The table as plain text, one line per row."""
    console = Console(file=io.StringIO(), width=_UNWRAPPED, color_system=None, highlight=False)
    with console.capture() as captured:
        console.print(_table(rows))
    return "\n".join(line.rstrip() for line in captured.get().splitlines())


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|")


def format_markdown(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(_HEADERS) + " |", "|" + "---|" * len(_HEADERS)]
    lines += ["| " + " | ".join(_escape(cell) for cell in _cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def targets(rows: Sequence[Row]) -> list[Target]:
    return [
        Target(row.target, f"{row.what}: {row.ratio or row.value}", row.met)
        for row in rows
        if row.met is not None
    ]


def format_targets(rows: Sequence[Row]) -> str:
    found = targets(rows)
    if not found:
        return "no target measured in this run"
    return "\n".join(f"- {verdict(t.met)}: {t.name} — {t.figure}" for t in found)


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (p99 of 100 samples is the 99th smallest).

    Written out because the standard library has no nearest-rank method:
    `statistics.quantiles` only interpolates (its "exclusive" and "inclusive" methods), and
    `numpy.percentile(..., method="inverted_cdf")`, which is nearest-rank, would bring numpy
    in for five lines."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = min(len(ordered), max(1, math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 0.01:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds * 1000:.2f} ms"


def times(ratio: float, digits: int = 2) -> str:
    return f"{ratio:.{digits}f}x"
