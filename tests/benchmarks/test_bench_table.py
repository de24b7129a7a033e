"""The benchmark table's arithmetic and verdicts (benchmarks/table.py): a wrong rank or a
lost "NOT met" would misreport a target in RESULTS.md."""

from __future__ import annotations

import io

from benchmarks.table import (
    Row,
    format_markdown,
    format_targets,
    format_text,
    percentile,
    print_rows,
)


def test_percentile_is_nearest_rank() -> None:
    # Catches an off-by-one that reports p99 of 100 samples as the maximum.
    samples = [float(n) for n in range(100, 0, -1)]
    assert percentile(samples, 0.99) == 99.0
    assert percentile(samples, 0.5) == 50.0
    assert percentile([3.0], 0.99) == 3.0


def test_targets_list_each_verdict_with_its_figure() -> None:
    # Catches a missed target being listed as met, or a row without a target listed.
    rows = [
        Row("1", "held", "3 ms", "1.6x", "floor", "<= 1.5x floor", False),
        Row("2", "makespan", "11 s", "1.01x", "ideal", "<= 1.1x ideal", True),
        Row("3", "info only", "42"),
    ]
    lines = format_targets(rows).splitlines()
    assert lines == [
        "- NOT met: <= 1.5x floor — held: 1.6x",
        "- met: <= 1.1x ideal — makespan: 1.01x",
    ]


def test_markdown_cells_cannot_split_the_table() -> None:
    # Catches a "|" in a figure that would add a column to RESULTS.md.
    table = format_markdown([Row("5", "a | b", "1")])
    assert table.splitlines()[-1].count(" | ") == 5


def test_text_table_keeps_every_cell_verbatim_on_one_line() -> None:
    # Catches rich reading a "[...]" in a figure as markup (it would vanish), and a long row
    # wrapped onto two lines in a log file.
    long_what = "a figure whose description is much wider than any terminal " * 4
    rows = [
        Row("1", "[probe] guest", "3 ms", "1.6x", "floor", "<= 1.5x floor", False),
        Row("2", long_what.strip(), "42"),
    ]
    lines = format_text(rows).splitlines()
    assert lines[0].split() == ["fig", "what", "value", "ratio", "against", "target"]
    assert len(lines) == 2 + len(rows)  # headers, rule, one line per row
    assert "[probe] guest" in lines[2] and lines[2].endswith("<= 1.5x floor (NOT met)")
    assert long_what.strip() in lines[3]


def test_printing_to_a_file_writes_the_plain_table() -> None:
    # Catches colour codes or a terminal-width layout written into a pipe or a file.
    rows = [Row("5", "component size", "17.69 MiB", "1.77x", "10 MiB cap", "<= 10 MiB", False)]
    out = io.StringIO()
    print_rows(rows, out)
    assert out.getvalue() == format_text(rows) + "\n"
    assert "\x1b" not in out.getvalue()
