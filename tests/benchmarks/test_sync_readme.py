"""The README carries the benchmark results verbatim between its markers."""

from __future__ import annotations

import pytest

from benchmarks.sync_readme import BEGIN, END, readme_with_results

RESULTS = "# Benchmark results\n\nintro\n\n## Machine\n\n- cpus: 2\n\n## Table\n\n| a |\n"


def test_the_block_between_the_markers_is_replaced_and_nothing_else() -> None:
    readme = f"# Project\n\n{BEGIN}\nold table\n{END}\n\n## Development\n"
    updated = readme_with_results(readme, RESULTS)
    assert "old table" not in updated
    assert "#### Machine\n\n- cpus: 2\n\n#### Table\n\n| a |" in updated
    assert updated.startswith("# Project\n\n") and updated.endswith(f"{END}\n\n## Development\n")
    assert "intro" not in updated


def test_a_readme_without_markers_is_refused() -> None:
    with pytest.raises(ValueError):
        readme_with_results("# Project\n", RESULTS)
