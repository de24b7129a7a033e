"""What a scripted `sandbox_provisioner` module answers in the session tests (the
executor's virtual-time rules and the real-time driver): the outcomes it gives and the
operation an invocation asks it for."""

from __future__ import annotations

from typing import Any

from provisioner.model import SANDBOX_QUEUED, SANDBOX_READY, SANDBOX_RELEASED, Invocation, Outcome


def operation(invocation: Invocation) -> str:
    """The operation the trigger's integration config names (`provision` when none)."""
    return dict(invocation.config).get("operation", "provision")


def ready(sandbox_id: str, **params: Any) -> Outcome:
    return Outcome(SANDBOX_READY, {"sandbox_id": sandbox_id, **params})


def queued(**params: Any) -> Outcome:
    return Outcome(SANDBOX_QUEUED, params)


def queued_for_a_slot(
    *, position: int, queue_length: int, retry_after_ms: int, eta_ms: int
) -> Outcome:
    """A queued answer for a waiter that has just come, behind all four create slots in use."""
    return queued(
        position=position,
        queue_length=queue_length,
        in_use=4,
        limit=4,
        reason="create_slots",
        retry_after_ms=retry_after_ms,
        eta_ms=eta_ms,
        waited_ms=0,
    )


def queued_for_a_minute() -> Outcome:
    """A queued answer whose next ask is a minute away: nothing in a short test polls."""
    return queued_for_a_slot(position=1, queue_length=1, retry_after_ms=60_000, eta_ms=60_000)


def released(invocation: Invocation, sandbox_id: str, *, released: bool = True) -> Outcome:
    """The release's answer, named as the component names it: the trigger's
    `released_action` (a spec's Failing -> Failed answer), else SandboxReleased."""
    action = dict(invocation.config).get("released_action") or SANDBOX_RELEASED
    return Outcome(action, {"released": released, "sandbox_id": sandbox_id})
