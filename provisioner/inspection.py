"""`operation = inspect`: the account's gates and every waiter, as JSON params.

The host's operator view and `/metrics` read the gates through this operation, so the
stored documents stay private to the guest and a host never decodes them. The answer names
every tenant's waiting entities: hosts must not let a tenant's own invocation ask for it
(`serve` refuses the operation from outside)."""

from __future__ import annotations

from enum import Enum
from typing import Any

from provisioner.config import read_config
from provisioner.gates.sandbox_view import GateView, inspect_gates
from provisioner.invocation import Request
from provisioner.model import GATES_INSPECTED, Outcome
from provisioner.ports import Ports


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):  # by name: an enum's value may be its stored encoding
        return value.name.lower()
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if hasattr(value, "__dataclass_fields__"):
        return {name: _plain(getattr(value, name)) for name in value.__dataclass_fields__}
    return value


def view_to_json(view: GateView) -> dict[str, Any]:
    """The whole view, field for field, and the permits it holds."""
    doc: dict[str, Any] = _plain(view)
    doc["permits_held"] = view.permits_held
    return doc


def inspect(request: Request, ports: Ports) -> Outcome:
    config = read_config(request.config).admission
    view = inspect_gates(ports.storage, ports.clock.now_ms(), config)
    return Outcome(GATES_INSPECTED, view_to_json(view))
