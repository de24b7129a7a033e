"""Copy benchmarks/RESULTS.md into the README between its bench markers.

    python -m benchmarks.sync_readme

Run it after `python -m benchmarks --markdown benchmarks/RESULTS.md`, so the README
carries the latest table and the machine it came from.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"


def readme_with_results(readme: str, results: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"the README has no {BEGIN} ... {END} block")
    if "## Machine" not in results:
        raise ValueError("RESULTS.md has no '## Machine' section")
    body = results[results.index("## Machine") :].rstrip()
    # One level down: the README's own section is the parent.
    body = "\n".join("##" + line if line.startswith("## ") else line for line in body.split("\n"))
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{body}\n{END}{tail}"


def main() -> int:
    readme = ROOT / "README.md"
    results = ROOT / "benchmarks" / "RESULTS.md"
    try:
        updated = readme_with_results(readme.read_text(), results.read_text())
    except (OSError, ValueError) as error:
        print(f"sync_readme: {error}", file=sys.stderr)
        return 2
    readme.write_text(updated)
    print(f"README.md now carries {results.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
