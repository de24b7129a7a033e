"""The outcomes the session tests' scripted `sandbox_provisioner` modules answer with, in
the shapes the component gives them (`provisioner/operations.py`)."""

from __future__ import annotations

from typing import Any

from provisioner.model import SANDBOX_QUEUED, SANDBOX_READY, SANDBOX_RELEASED, Outcome


def ready(sandbox_id: str, **params: Any) -> Outcome:
    return Outcome(SANDBOX_READY, {"sandbox_id": sandbox_id, **params})


def queued(**params: Any) -> Outcome:
    return Outcome(SANDBOX_QUEUED, params)


def released(sandbox_id: str, *, released: bool = True) -> Outcome:
    return Outcome(SANDBOX_RELEASED, {"released": released, "sandbox_id": sandbox_id})
