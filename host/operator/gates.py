"""Reading an account's gates: the component's `operation = inspect`, never the stored
documents themselves, so the host does not depend on how the guest encodes its state.

The operator runs the guest's entry point in this process over a read-only view of the
storage (a write is refused as a storage failure), so an operator's look can never change
what it looks at; `serve` asks its own component (`/metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from host.runtime.native import run_offline
from host.storage.base import StorageBackend, StorageUnavailable
from host.storage.forwarding import ForwardingBackend
from provisioner.model import GATES_INSPECTED, Failure, Invocation, Outcome

__all__ = [
    "GateDoc",
    "GateReadFailed",
    "ReadOnlyBackend",
    "inspect_invocation",
    "read_gates",
    "read_gates_offline",
]

# The gates' view, as `provisioner/gates/view.py` writes it.
GateDoc = dict[str, Any]


class GateReadFailed(Exception):
    """The inspection was answered with a failure (storage unavailable, a bad setting)."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(f"{failure.code}: {failure.message}")
        self.failure = failure


class ReadOnlyBackend(ForwardingBackend):
    """A storage backend that reads through and refuses every write."""

    def before(self, operation: str, key: str) -> None:
        if operation != "get":
            raise StorageUnavailable("read-only: the gate inspection writes nothing")


def inspect_invocation(settings: Mapping[str, str]) -> Invocation:
    """`operation = inspect` with the integration's settings (limits and ETAs depend on
    them)."""
    config = {**settings, "operation": "inspect"}
    return Invocation(
        tenant="operator",
        entity_type="Account",
        entity_id="gates",
        trigger_action="Inspect",
        trigger_params="{}",
        entity_state="{}",
        config=tuple(sorted(config.items())),
        session_id=None,
        trace_id="inspect",
    )


def read_gates(invoke: Callable[[Invocation], Outcome], settings: Mapping[str, str]) -> GateDoc:
    """The account's gates as the component sees them; GateReadFailed if it could not."""
    outcome = invoke(inspect_invocation(settings))
    if outcome.action != GATES_INSPECTED or outcome.error is not None:
        raise GateReadFailed(
            outcome.error or Failure("unexpected_outcome", outcome.action, retryable=False)
        )
    return outcome.params


def read_gates_offline(
    backend: StorageBackend, account: str, settings: Mapping[str, str]
) -> GateDoc:
    """`read_gates` through the guest's entry point in this process, over `backend` made
    read-only."""
    read_only = ReadOnlyBackend(backend)
    return read_gates(
        lambda invocation: run_offline(invocation, read_only, account=account), settings
    )
