"""The admission controller: a façade over the sandbox gate's decisions, one fresh instance
per invocation, all state in storage. Anything unexpected fails closed: the waiter is told
to come back (reason `storage`) and nothing is granted."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from provisioner.config import AdmissionConfig
from provisioner.gates.cas import storage_queued
from provisioner.gates.document import DEFAULT_SANDBOX_TIMEOUT_MS, GATE_KEY, GateState
from provisioner.gates.ledger import read_document
from provisioner.gates.results import REASON_STORAGE, CreateResult, Grant, Queued, Rejected, Waiter
from provisioner.gates.sandbox import SandboxLedger
from provisioner.gates.view import sandbox_snapshot
from provisioner.model import fields_of
from provisioner.ports import LogLevel, Ports, StorageError

_T = TypeVar("_T")


class AdmissionController:
    def __init__(self, ports: Ports, config: AdmissionConfig) -> None:
        self._ports = ports
        self._config = config
        self._gate = SandboxLedger(ports, config)
        # Waiters other than the caller promised a permit: the host may wake them.
        self.wake_ups = self._gate.wake_ups

    def admit(
        self, waiter: Waiter, sandbox_timeout_ms: int = DEFAULT_SANDBOX_TIMEOUT_MS
    ) -> Grant | Queued | Rejected:
        """Grant one create now, or say where the waiter stands (idempotent per waiter).
        A create never settled counts against capacity for `sandbox_timeout_ms`."""
        return self._guard(waiter, "admit", partial(self._gate.admit, waiter, sandbox_timeout_ms))

    def settle(
        self, waiter: Waiter, grant: Grant, result: CreateResult
    ) -> Grant | Queued | Rejected | None:
        """Record what the granted create came back with: None once Created. Queued with
        reason `storage`: not recorded, settle again with the same arguments."""
        extra = {"e2b_answer": type(result).__name__, "attempt": grant.attempt}
        return self._guard(
            waiter, "settle", partial(self._gate.settle, waiter, grant, result), extra
        )

    def release(self, waiter: Waiter) -> bool:
        """Free what the waiter holds or waits for: True when it held or waited. Raises
        when the gate could not be written: the caller must keep what lets it release
        again (the entity record), or the permit stays held until its lease expires."""
        try:
            held = self._gate.release(waiter)
        except Exception as error:
            self._log(LogLevel.WARN, f"admission release failed: {error!r}")
            raise
        self._emit(waiter, "release", held)
        return held

    def status(self, tenant: str) -> dict[str, Any]:
        try:
            now = self._ports.clock.now_ms()
            state, _ = read_document(self._ports, GATE_KEY, GateState)
            self._gate.catch_up(state, now)
            return sandbox_snapshot(state, self._config, now, tenant)
        except Exception as error:
            return {"error": REASON_STORAGE, "message": str(error)}

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
        except Exception as error:  # a bug must not grant either: fail closed
            if not isinstance(error, StorageError):
                self._log(LogLevel.ERROR, f"admission {what} failed: {error!r}")
            detail = f"{what}: {error!r}"
            self._log(LogLevel.WARN, f"admission for {waiter.entity} fails closed: {detail}")
            result = storage_queued(self._ports, self._config)
        self._emit(waiter, what, result, extra)
        return result

    def _log(self, level: LogLevel, message: str) -> None:
        with contextlib.suppress(Exception):
            self._ports.telemetry.log(level, message)

    def _emit(
        self, waiter: Waiter, what: str, result: object, extra: dict[str, Any] | None = None
    ) -> None:
        event: dict[str, Any] = {"tenant": waiter.tenant, "entity": waiter.entity, "step": what}
        event.update(extra or {})
        if isinstance(result, Grant):
            event.update(event="admission_granted", **fields_of(result))
            del event["expires_at_ms"]
        elif isinstance(result, Queued):
            event.update(event="admission_queued", **result.params())
        elif isinstance(result, Rejected):
            failure = result.failure
            event.update(event="admission_rejected", code=failure.code, message=failure.message)
        elif isinstance(result, bool):
            event.update(event="admission_released", held=result)
        else:
            event.update(event="admission_settled")
        self._ports.progress(event)
