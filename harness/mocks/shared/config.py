"""What every mock's config is: a frozen dataclass whose copies refuse unknown fields, read
from JSON (POST /_mock/config, the CLI's --config) and from named presets (a plan, a tier)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Self


class MockConfig:
    """Base of a mock's ``@dataclass(frozen=True)`` config; its ``__post_init__`` checks
    the values (ValueError or TypeError), so every copy made here is checked too."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``; a name that is not a config field is a ValueError."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls().replace(**dict(data))

    @classmethod
    def from_preset(
        cls,
        kind: str,
        name: str,
        presets: Mapping[str, Mapping[str, Any]],
        changes: Mapping[str, Any],
    ) -> Self:
        """The defaults with preset ``name`` of ``presets`` (a ``kind``: "plan", "tier"),
        then ``changes``."""
        if name not in presets:
            raise ValueError(f"unknown {kind} {name!r}; expected one of {sorted(presets)}")
        return cls().replace(**{**presets[name], **changes})
