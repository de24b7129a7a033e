"""The benchmark table: one row per figure, printed as text and as markdown."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


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


def format_text(rows: Sequence[Row]) -> str:
    table = [_HEADERS, *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(_HEADERS))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip()
             for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


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
    """Nearest-rank percentile (p99 of 100 samples is the 99th smallest)."""
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
