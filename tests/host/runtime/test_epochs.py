"""The epoch ticker counts wall time, not wake-ups (in virtual time: a fake clock and a
wait that oversleeps)."""

from __future__ import annotations

from typing import Any, cast

from host.runtime.epochs import run_ticks

TICK_S = 0.010


class CountingEngine:
    def __init__(self) -> None:
        self.epoch = 0

    def increment_epoch(self) -> None:
        self.epoch += 1


class OversleepingWait:
    """Each wait takes `late_s` longer than asked; the `wakeups`-th returns True (stop)."""

    def __init__(self, late_s: float, wakeups: int) -> None:
        self.now = 100.0
        self.late_s = late_s
        self.wakeups = wakeups
        self.asked: list[float] = []

    def clock(self) -> float:
        return self.now

    def wait(self, timeout: float) -> bool:
        self.asked.append(timeout)
        self.now += timeout + self.late_s
        return len(self.asked) >= self.wakeups


def ticked(late_s: float, wakeups: int) -> tuple[int, OversleepingWait]:
    engine, sleeper = CountingEngine(), OversleepingWait(late_s, wakeups)
    run_ticks(cast(Any, engine), TICK_S, sleeper.wait, sleeper.clock)
    return engine.epoch, sleeper


def test_late_wakeups_still_advance_one_epoch_per_tick_of_elapsed_time() -> None:
    # Every wake-up 25 ms late: woken at 35 ms, 65 ms, ... 3005 ms, and stopped at 3035.
    # One increment per wake-up (the old ticker) would count 100 ticks in those 3 s.
    epoch, sleeper = ticked(late_s=0.025, wakeups=101)
    assert abs(sleeper.now - 100.0 - 3.035) < 1e-6
    assert epoch == 300


def test_on_time_wakeups_advance_one_epoch_each_and_ask_for_the_next_tick() -> None:
    epoch, sleeper = ticked(late_s=0.0, wakeups=501)
    assert epoch == 500
    assert all(abs(asked - TICK_S) < 1e-9 for asked in sleeper.asked)


def test_a_late_wakeup_shortens_the_next_wait_to_the_next_tick_boundary() -> None:
    _, sleeper = ticked(late_s=0.004, wakeups=3)
    # Woken at 14 ms: 1 tick counted, the next boundary is at 20 ms, 6 ms away.
    assert abs(sleeper.asked[1] - 0.006) < 1e-9
