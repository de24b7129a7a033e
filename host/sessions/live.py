"""Live progress: one line per session event, as it happens."""

from __future__ import annotations

import threading
from typing import TextIO

from host.sessions.model import SessionEvent


def event_line(event: SessionEvent) -> str:
    d = event.detail
    kind = event.kind
    if kind == "queued":
        what = (
            f"queued #{d.get('position')}/{d.get('queue_length')} ({d.get('reason')}: "
            f"{d.get('in_use')}/{d.get('limit')} in use), back in "
            f"{(d.get('retry_after_ms') or 0) / 1000:.1f}s"
        )
    elif kind == "ready":
        what = f"sandbox {d.get('sandbox_id')} ready after {(d.get('waited_ms') or 0) / 1000:.1f}s"
    elif kind == "turn":
        what = f"turn {d.get('turn')}/{d.get('of')}"
    elif kind == "completed":
        what = "released, Completed" + (
            f" (release failed: {d['release_error']})" if d.get("release_error") else ""
        )
    elif kind == "failed":
        what = f"Failed: {d.get('reason')}" + (" (while queued)" if d.get("queued") else "")
    elif kind == "ignored":
        what = f"{d.get('action')} ({d.get('error')}): no transition, waiting silently"
    elif kind == "retry":
        what = f"retrying after {d.get('code')}: {d.get('message')}"
    elif kind == "late_sandbox":
        what = f"a late sandbox {d.get('sandbox_id')} arrived; releasing it"
    elif kind == "cleaned":
        what = "released after failure" + (f" ({d['error']})" if d.get("error") else "")
    else:
        what = kind
    return f"{event.at_s:7.2f}s  {event.job.label:<18} {event.job.tenant:<9} {what}"


class LiveLog:
    """Prints events to `out`; safe to share across threads."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()

    def event(self, event: SessionEvent) -> None:
        line = event_line(event)
        with self._lock:
            print(line, file=self._out, flush=True)
