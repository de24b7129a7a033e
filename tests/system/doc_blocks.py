"""The shell blocks of the project's Markdown that are marked runnable (a ```sh runnable
fence): what the docs tests execute."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import ROOT

RUNNABLE = re.compile(r"^```sh runnable\n(.*?)^```", re.S | re.M)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def runnable_blocks(path: Path) -> list[str]:
    return [match.group(1) for match in RUNNABLE.finditer(path.read_text())]
