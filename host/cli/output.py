"""Small printing helpers shared by the command-line entry points."""

from __future__ import annotations

import json

from provisioner.model import Outcome


def outcome_line(outcome: Outcome) -> str:
    if outcome.error is not None:
        return f"{outcome.action} {outcome.error.code}: {outcome.error.message}"
    return f"{outcome.action} {json.dumps(outcome.params, sort_keys=True)}"


def print_outcome(label: str, outcome: Outcome) -> None:
    print(f"{label:>16}: {outcome_line(outcome)}")
