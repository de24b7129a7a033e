"""Reading an account's gates from host storage: the one place the host calls the guest's
public inspection API (`provisioner.admission.inspect.inspect_gates`).

The inspection reads the gate document and the waiters' keys through the guest's
`StorageReader` port in the account scope; here that port reads a host backend bound
to the account's namespace (the same namespace the runtime gives the component), so an
operator's look can never change what it looks at.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any

from host.services.namespaces import account_namespace
from host.storage.base import StorageBackend
from provisioner.admission import AdmissionConfig
from provisioner.admission.inspect import GateView, WaiterView, inspect_gates
from provisioner.ports import Entry, Scope

__all__ = ["GateView", "WaiterView", "admission_config", "read_gates", "view_to_json"]


class ReadOnlyAccountStorage:
    """The guest's StorageReader port over one account's namespace: it has no way to write."""

    def __init__(self, backend: StorageBackend, account: str) -> None:
        self._backend = backend
        self._namespace = account_namespace(account)

    def get(self, scope: Scope, key: str) -> Entry | None:
        if scope is not Scope.ACCOUNT:
            raise PermissionError("the gate inspection reads the account scope only")
        return self._backend.get(self._namespace, key)


def admission_config(settings: Mapping[str, str]) -> AdmissionConfig:
    """The admission settings from integration-config keys (`create_slots`, ...): the
    limits and ETAs an inspection reports depend on them. Raises ProvisionerError
    (`invalid_config`) for a bad value."""
    return AdmissionConfig.from_config(settings)


def read_gates(
    backend: StorageBackend, account: str, config: AdmissionConfig | None = None
) -> GateView:
    """The account's gates as of the storage's clock (the clock leases are written in)."""
    return inspect_gates(ReadOnlyAccountStorage(backend, account), backend.now_ms(), config)


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):  # by name: an enum's value may be its stored encoding
        return value.name.lower()
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if hasattr(value, "__dataclass_fields__"):
        return {name: _plain(getattr(value, name)) for name in value.__dataclass_fields__}
    return value


def view_to_json(view: GateView) -> dict[str, Any]:
    """A JSON-serialisable form of the whole view, field for field."""
    doc: dict[str, Any] = _plain(view)
    doc["permits_held"] = view.permits_held
    return doc
