"""The Redis backends' Lua scripts, shipped as package data and read once per process."""

from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def script(name: str) -> str:
    """The text of `<name>.lua` in this package."""
    return resources.files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8")
