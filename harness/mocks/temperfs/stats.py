"""The counters tests read from the mock TemperFS."""

from __future__ import annotations

from dataclasses import dataclass

from harness.mocks.shared.stats import MockStats


@dataclass
class TemperFSStats(MockStats):
    """``workspaces``, ``files`` and ``requests`` are measured from the records when the
    snapshot is taken; ``faults_injected`` is counted."""

    workspaces: int = 0
    files: int = 0
    requests: int = 0
    faults_injected: int = 0
