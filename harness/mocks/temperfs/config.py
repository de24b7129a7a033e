"""What the mock TemperFS does: the seed of its generated ids, and the faults it injects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.mocks.e2b.config import FaultRule, coerce_faults
from harness.mocks.shared.config import MockConfig

# The route name the fault grammar (harness.mocks.e2b.config) gives TemperFS's requests.
ROUTE = "tdata"


@dataclass(frozen=True)
class TemperFSConfig(MockConfig):
    seed: int = 0
    # Status faults on /tdata, in the E2B mock's grammar (`503:n=1:route=tdata`); rules,
    # JSON objects and command-line strings are accepted and turned into rules.
    faults: tuple[FaultRule, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "faults", coerce_faults(self.faults))
        for rule in self.faults:
            # A hang, reset or garbled body needs the E2B mock's connection handling.
            if rule.kind != "status":
                raise ValueError(f"the mock TemperFS injects status faults only, not {rule.kind}")
            if rule.route not in (ROUTE, "any"):
                raise ValueError(
                    f"a TemperFS fault's route is {ROUTE!r} or 'any', not {rule.route!r}"
                )

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        data["faults"] = [rule.to_json() for rule in self.faults]
        return data
