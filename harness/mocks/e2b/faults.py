"""Which fault, if any, a request meets: by schedule over the route's request numbers, or
by probability from a seeded stream, so a run is reproducible from its seed."""

from __future__ import annotations

import random
from collections.abc import Sequence

from harness.mocks.e2b.config import FaultRule


class FaultPicker:
    """Picks the first matching rule. Not thread-safe: the caller serialises ``pick``."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(f"faults:{seed}")

    def pick(
        self, rules: Sequence[FaultRule], route: str, ordinal: int, after_create: bool
    ) -> FaultRule | None:
        for rule in rules:
            if rule.after_create != after_create:
                continue
            if rule.route not in (route, "any"):
                continue
            if not rule.is_scheduled_for(ordinal):
                continue
            if rule.probability is not None and self._rng.random() >= rule.probability:
                continue
            return rule
        return None
