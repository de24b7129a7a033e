"""The timers a session loop has armed, soonest first: what both loops (the virtual one in
`detsim.py`, the real-time one in `driver.py`) keep, whichever clock they fire them by."""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable


class Timer:
    """One armed callback; `cancel` keeps it from firing (the executor's `TimerHandle`)."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class TimerHeap:
    """Timers by due time, ties in the order they were armed; a cancelled one is dropped
    when it reaches the front."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()

    def arm(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(when, callback)
        heapq.heappush(self._heap, (when, next(self._seq), timer))
        return timer

    def next_due(self) -> float | None:
        """When the soonest timer not cancelled is due; None when none is armed."""
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> Timer | None:
        """The soonest timer not cancelled, taken off, if it is due by `now`."""
        due = self.next_due()
        if due is None or due > now:
            return None
        return heapq.heappop(self._heap)[2]

    def pop_next(self) -> Timer | None:
        """The soonest timer not cancelled, taken off, however far ahead it is due."""
        return self.pop_due(math.inf)
