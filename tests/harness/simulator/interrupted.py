"""Ctrl-C in the middle of an in-process `simulate` run: the run is interrupted once its
first session queues, and every thread it started must have been joined when it raises."""

from __future__ import annotations

import _thread
import sys
import threading
from collections.abc import Callable

import pytest

from harness.simulator.live import LiveLog
from harness.simulator.model import SessionEvent
from harness.simulator.scenario import Scenario
from harness.simulator.simulate import run_mode
from host.runtime.loader import LoadedComponent
from host.serve.pace import PaceSettings


def interrupt_when_first_queued(
    loaded: LoadedComponent,
    *,
    announce: Callable[[str], None] | None = None,
    pace: PaceSettings | None = None,
) -> None:
    """Runs the provisioner mode, interrupts it (as Ctrl-C would) at the first session that
    queues, and asserts it raised KeyboardInterrupt with no thread of its own left running.
    Needs the `ctrl_c_raises_keyboard_interrupt` fixture."""
    fired: list[str] = []

    class InterruptWhenQueued(LiveLog):
        def event(self, event: SessionEvent) -> None:
            queued = event.kind == "transition" and event.detail.get("action") == "SandboxQueued"
            if queued and not fired:
                fired.append("interrupted")
                _thread.interrupt_main()

    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(KeyboardInterrupt):
        run_mode(
            Scenario(),
            "provisioner",
            loaded=loaded,
            live=InterruptWhenQueued(sys.stderr),
            announce=announce,
            pace=pace,
        )
    assert fired, "the interrupt never fired"
    leftover = [t.name for t in threading.enumerate() if t.ident not in before]
    assert leftover == []
