"""The benchmark table's arithmetic and verdicts (benchmarks/table.py): a wrong rank or a
lost "NOT met" would misreport a target in RESULTS.md."""

from __future__ import annotations

from benchmarks.table import Row, format_markdown, format_targets, percentile


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
