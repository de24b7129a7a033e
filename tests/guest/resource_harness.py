"""Runs the guest's resource operations natively on shared memory storage, a virtual
clock and seeded randomness (test support for the resource-gate tests; no tests here)."""

from __future__ import annotations

import json
from typing import Any

from host.runtime.native import native_ports
from host.sessions.detsim import ACCOUNT
from host.sessions.fake_e2b import START_MS
from host.sessions.simulated_ports import EventLog, SeededRandom, VirtualClock
from host.storage.memory import MemoryBackend
from provisioner.app import run
from provisioner.model import Invocation, Outcome
from provisioner.ports import HttpRequest, HttpResponse, Ports


class NoHttp:
    def send(self, request: HttpRequest) -> HttpResponse:
        raise AssertionError("resource gates never call HTTP themselves")


class ResourceHarness:
    def __init__(self, config: dict[str, str], *, seed: int = 0) -> None:
        self.config = config
        self.clock = VirtualClock(START_MS)
        self.backend = MemoryBackend(self.clock.now_ms)
        self.random = SeededRandom(seed)
        self.telemetry = EventLog()

    def ports(self, tenant: str) -> Ports:
        return native_ports(
            self.backend,
            tenant=tenant,
            account=ACCOUNT,
            http=NoHttp(),
            clock=self.clock,
            random=self.random,
            telemetry=self.telemetry,
        )

    def call(
        self,
        operation: str,
        tenant: str,
        entity: str,
        params: dict[str, Any] | None = None,
        **config: str,
    ) -> Outcome:
        merged = {**self.config, "operation": operation, **config}
        invocation = Invocation(
            tenant=tenant,
            entity_type="Agent",
            entity_id=entity,
            trigger_action="Gate",
            trigger_params=json.dumps(params or {}),
            entity_state="{}",
            config=tuple(merged.items()),
            session_id=None,
            trace_id="t",
        )
        return run(invocation, self.ports(tenant))

    def acquire(self, tenant: str, entity: str, **params: Any) -> Outcome:
        return self.call("acquire", tenant, entity, params)

    def settle(self, tenant: str, entity: str, **params: Any) -> Outcome:
        return self.call("settle", tenant, entity, params)

    def release(self, tenant: str, entity: str) -> Outcome:
        return self.call("release", tenant, entity)

    def status(self, tenant: str = "tenant-a") -> dict[str, Any]:
        params: dict[str, Any] = self.call("status", tenant, "status-probe").params
        return params

    def advance(self, ms: int) -> None:
        self.clock.advance(ms)
