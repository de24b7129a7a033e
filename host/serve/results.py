"""A provisioner outcome as a Temper terminal result: the service answers what the shim
hands to Temper verbatim, so it uses the one mapping every host output uses
(`host/runtime/temper_context.py`, `outcome_to_json`; docs/contract.md)."""

from __future__ import annotations

from typing import Any

from host.runtime.temper_context import outcome_to_json, stable_code
from provisioner.model import Outcome

__all__ = ["stable_code", "temper_result"]


def temper_result(outcome: Outcome) -> dict[str, Any]:
    return outcome_to_json(outcome)
