"""Live progress: one line per session event worth showing, as it happens."""

from __future__ import annotations

import threading
from typing import TextIO

from harness.simulator.model import SessionEvent


def event_line(event: SessionEvent) -> str | None:
    """The line for `event`, or None for the ones not worth a line (invocations, answers)."""
    d = event.detail
    kind = event.kind
    if kind == "submitted":
        what = "submitted"
    elif kind == "transition":
        action, params = d.get("action"), d.get("params") or {}
        if action == "SandboxQueued":
            what = (
                f"queued #{params.get('position')}/{params.get('queue_length')} "
                f"({params.get('reason')}: {params.get('in_use')}/{params.get('limit')} "
                f"in use) -> {d.get('after')}"
            )
        elif action == "SandboxReady":
            what = f"sandbox {params.get('sandbox_id')} ready -> {d.get('after')}"
        elif d.get("source") == "input" and d.get("before") == d.get("after"):
            return None  # the agent's own heartbeats: shown as turns
        elif action in ("PollSandbox",):
            return None
        else:
            what = f"{action} ({d.get('source')}): {d.get('before')} -> {d.get('after')}"
            message = params.get("error_message") or params.get("message")
            if message:
                what += f": {message}"
    elif kind == "turn":
        what = f"turn {d.get('turn')}/{d.get('of')}"
    elif kind == "rejected":
        what = f"{d.get('action')} rejected ({d.get('source')}): {d.get('error')}"
    elif kind == "unhandled_failure":
        what = f"{d.get('trigger')} failed with no on_failure: {d.get('error')}"
    else:
        return None
    return f"{event.at_s:7.2f}s  {event.job.label:<18} {event.job.tenant:<9} {what}"


class LiveLog:
    """Prints events to `out`; safe to share across threads."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()

    def event(self, event: SessionEvent) -> None:
        line = event_line(event)
        if line is None:
            return
        with self._lock:
            print(line, file=self._out, flush=True)
