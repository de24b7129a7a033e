"""One dataclass for what a mock counts and for the snapshots tests read.

A mock's state keeps one instance as its live tally (changed only under the state's lock)
and hands out copies of it. Fields that are measured rather than counted (how many
sandboxes run now, say) stay at their defaults in the tally and are filled in each copy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self


class MockStats:
    """Base of a mock's stats ``@dataclass``."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def snapshot(self, **measured: Any) -> Self:
        """A copy of the tally as it is now, with the ``measured`` fields; its dicts are
        copies too, so later counting does not show through. Call it under the lock that
        guards the tally: every field then comes from the same moment."""
        copies = {
            f.name: dict(value)
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), dict)
        }
        return dataclasses.replace(self, **{**copies, **measured})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
