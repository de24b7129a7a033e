"""The admission controller: one fresh instance per invocation, all state in storage.

A façade over the decisions, each in its own module on the shared `ledger.SandboxLedger`:
`admit` (grant or queue), `settle` (record a create's answer), `release` (free what a
waiter holds) and `status` (a snapshot of every gate). Every decision reads the account
gate document, decides, and writes it back with one compare-and-swap, retried from a fresh
read on conflict (`cas.until_settled`). Limits are checked inside that one document, so no
interleaving of invocations can exceed one. Anything unexpected fails closed: the waiter is
told to come back (reason `storage`) and nothing is granted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

from provisioner.config import AdmissionConfig
from provisioner.gates.admit import Admission
from provisioner.gates.cas import storage_queued
from provisioner.gates.document import DEFAULT_SANDBOX_TIMEOUT_MS
from provisioner.gates.ledger import load_gate
from provisioner.gates.release import SandboxRelease
from provisioner.gates.results import REASON_STORAGE, CreateResult, Grant, Queued, Rejected, Waiter
from provisioner.gates.sandbox import WakeUp
from provisioner.gates.settle import SandboxSettlement
from provisioner.gates.view import sandbox_snapshot
from provisioner.ports import LogLevel, Ports, StorageError

_T = TypeVar("_T")


class AdmissionController:
    def __init__(self, ports: Ports, config: AdmissionConfig) -> None:
        self._ports = ports
        self._config = config
        # Waiters other than the caller that this controller's decisions promised a
        # permit to: the host may wake them (`sandbox.WakeUp`).
        self.wake_ups: list[WakeUp] = []

    # ------------------------------------------------------------------ public API

    def admit(
        self, waiter: Waiter, sandbox_timeout_ms: int = DEFAULT_SANDBOX_TIMEOUT_MS
    ) -> Grant | Queued | Rejected:
        """Grant one create now, or say where the waiter stands.

        Idempotent per waiter: asking again keeps the waiter's place. A waiter whose own
        create is still in flight (its grant's lease is live) gets Queued with reason
        `create_slots` and position 0 rather than a second grant, so no entity ever has
        two creates in flight. Storage trouble answers Queued with reason `storage`.
        `sandbox_timeout_ms` is the E2B timeout the create asks for: a create never
        settled counts against capacity until its sandbox would have timed out."""
        admission = Admission(self._ports, self._config, sandbox_timeout_ms)
        try:
            return self._guard(waiter, "admit", lambda: admission.decide(waiter))
        finally:
            self.wake_ups.extend(admission.wake_ups)

    def settle(
        self, waiter: Waiter, grant: Grant, result: CreateResult
    ) -> Grant | Queued | Rejected | None:
        """Record what the granted create came back with; frees its create slot.

        Created -> None (the waiter now holds a capacity lease for the sandbox's timeout).
        RateLimited / Unavailable -> Queued("backoff") at the front, or Rejected
        ("retry_budget_exhausted") after `max_create_attempts`. CapacityExhausted ->
        Queued("capacity"). CreateFailed -> Rejected(its failure). Queued("storage") means
        the result could not be recorded: settle again with the same arguments."""
        settlement = SandboxSettlement(self._ports, self._config)
        try:
            return self._guard(
                waiter,
                "settle",
                lambda: settlement.decide(waiter, grant, result),
                {"e2b_answer": type(result).__name__, "attempt": grant.attempt},
            )
        finally:
            self.wake_ups.extend(settlement.wake_ups)

    def release(self, waiter: Waiter) -> bool:
        """Free everything the waiter holds or waits for; True when something was held."""
        release = SandboxRelease(self._ports, self._config)
        try:
            held = release.decide(waiter)
        except Exception as error:  # fail closed: held leases expire on their own
            self._log(LogLevel.WARN, f"admission release failed: {error!r}")
            held = False
        self.wake_ups.extend(release.wake_ups)
        self._emit(waiter, "release", held)
        return held

    def status(self, tenant: str) -> dict[str, Any]:
        """A JSON-serialisable snapshot of every gate for the tenant and the account."""
        try:
            now = self._ports.clock.now_ms()
            state, _ = load_gate(self._ports, self._config, now)
            return sandbox_snapshot(state, self._config, now, tenant)
        except Exception as error:
            return {"error": REASON_STORAGE, "message": str(error)}

    # ------------------------------------------------------------------ plumbing

    def _guard(
        self,
        waiter: Waiter,
        what: str,
        decide: Callable[[], _T],
        extra: dict[str, Any] | None = None,
    ) -> _T | Queued:
        result: _T | Queued
        try:
            result = decide()
        except StorageError as error:
            result = self._storage_queued(waiter, f"{what}: {error!r}")
        except Exception as error:  # a bug must not grant: fail closed
            self._log(LogLevel.ERROR, f"admission {what} failed: {error!r}")
            result = self._storage_queued(waiter, f"{what}: {error!r}")
        self._emit(waiter, what, result, extra)
        return result

    def _storage_queued(self, waiter: Waiter, detail: str) -> Queued:
        self._log(LogLevel.WARN, f"admission for {waiter.entity} fails closed: {detail}")
        return storage_queued(self._ports, self._config)

    def _log(self, level: LogLevel, message: str) -> None:
        with contextlib.suppress(Exception):
            self._ports.telemetry.log(level, message)

    def _emit(
        self, waiter: Waiter, what: str, result: object, extra: dict[str, Any] | None = None
    ) -> None:
        event: dict[str, Any] = {"tenant": waiter.tenant, "entity": waiter.entity, "step": what}
        event.update(extra or {})
        if isinstance(result, Grant):
            event.update(
                event="admission_granted",
                lease_id=result.lease_id,
                attempt=result.attempt,
                queued_ms=result.queued_ms,
            )
        elif isinstance(result, Queued):
            event.update(event="admission_queued", **result.params())
        elif isinstance(result, Rejected):
            event.update(
                event="admission_rejected",
                code=result.failure.code,
                message=result.failure.message,
            )
        elif isinstance(result, bool):
            event.update(event="admission_released", held=result)
        else:
            event.update(event="admission_settled")
        with contextlib.suppress(Exception):
            self._ports.telemetry.progress(event)
