"""`serve` in front of the component for a session run in real time, as a deployment has it.

Each integration invocation runs the Temper shim (`dist/temper_shim.wasm`) in the
Temper-ABI host (`harness/temper_abi`): the shim POSTs the invocation context to a real
`serve` (`host/serve/app.py`'s Starlette app on 127.0.0.1, uvicorn through the mocks'
`LoopbackServer`), and its terminal result is decoded as Temper decodes it
(`decode_terminal_result`). `serve` runs the component in this process with its held
answers and, with push, sends its wake-ups to the run's own Temper API endpoint
(`driver.api_url`, `harness/simulator/temper_api.py`) with each tenant's credential.
docs/simulate-pace.md describes the wiring.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from harness.mocks.shared.server import LoopbackServer
from harness.temper_abi import AbiInvocation, TemperAbiModule
from host.runtime.component_runtime import ComponentRuntime
from host.runtime.paths import default_shim
from host.serve.app import ServeState, create_app
from host.serve.hold import HeldRequest, Holds
from host.serve.pace import PaceSettings
from host.serve.pacing import OffsetClock, ServePace
from host.serve.pool import InvocationPool
from host.serve.wakeups import DEFAULT_WAKE_ACTION, WakeTarget, WakeupSender, WakeupStore
from provisioner.model import SANDBOX_FAILED, Failure, Invocation, Outcome


def shim_context(invocation: Invocation, module: str) -> dict[str, Any]:
    """The invocation as Temper's `WasmInvocationContext` (`harness/temper_abi/context.py`)."""
    return {
        "tenant": invocation.tenant,
        "entity_type": invocation.entity_type,
        "entity_id": invocation.entity_id,
        "trigger_action": invocation.trigger_action,
        "wasm_module": module,
        "trigger_params": json.loads(invocation.trigger_params or "{}"),
        "entity_state": json.loads(invocation.entity_state or "{}"),
        "integration_config": dict(invocation.config),
        "trace_id": invocation.trace_id,
    }


def outcome_of(report: AbiInvocation) -> Outcome:
    """The shim's answer as a provisioner outcome: a success with its action and params (a
    SandboxFailed keeps its failure), or a failed invocation with the typed code."""
    result = report.result
    if result is None:
        return Outcome(
            "", {}, False, Failure(report.error_kind or "engine", report.error or "", True)
        )
    if result.success:
        params = result.callback_params if isinstance(result.callback_params, dict) else {}
        error = None
        if result.callback_action == SANDBOX_FAILED:
            error = Failure(
                str(params.get("code")), str(params.get("message")), bool(params.get("retryable"))
            )
        return Outcome(result.callback_action, params, True, error)
    typed = result.typed_failure or {}
    return Outcome(
        "",
        {},
        False,
        Failure(
            str(typed.get("code") or "UnknownFailure"),
            str(typed.get("diagnostic") or result.error or ""),
            typed.get("category") == "transient",
        ),
    )


class _CountedHolds(Holds):
    """`serve`'s holds, with the most held at once kept for the run's report."""

    def __init__(self, max_held: int) -> None:
        super().__init__(max_held)
        self.peak = 0

    def enter(self, position: int, entity: tuple[str, str] | None = None) -> HeldRequest | None:
        held = super().enter(position, entity)
        if held is not None:
            self.peak = max(self.peak, self.count)
        return held


class ServedProvisioner:
    """A `serve` on 127.0.0.1 over `runtime`: `start` it, and leave its `with` to stop it.

    `workers` is serve's pool: give it at least the driver's, so no request finds every
    worker busy (a 503 the shim would turn into a failed invocation). With
    `settings.push`, `start`'s Temper API URL and `credentials` (tenant -> Temper token)
    say where and as whom wake-ups are sent; `entity_sets` maps an entity type to its
    set."""

    def __init__(
        self,
        runtime: ComponentRuntime,
        e2b_url: str,
        settings: PaceSettings,
        *,
        workers: int,
        credentials: Mapping[str, str] | None = None,
        entity_sets: Mapping[str, str] | None = None,
        wake_action: str = DEFAULT_WAKE_ACTION,
    ) -> None:
        self.token = os.urandom(16).hex()
        self.lines: list[dict[str, Any]] = []
        self.wakeups: dict[str, int] = {}
        self._lock = threading.Lock()
        self._storage = runtime.services.storage
        self._credentials = dict(credentials or {})
        self._entity_sets = dict(entity_sets or {})
        self._wake_action = wake_action
        self.pace = ServePace(settings, OffsetClock(self._storage.now_ms), wake_count=workers)
        self.holds = _CountedHolds(settings.max_held)
        self.pace.holds = self.holds
        self.pace.observe_wakeup = self._count_wakeup
        self.pool = InvocationPool(workers)
        self.state = ServeState(
            token=self.token,
            pool=self.pool,
            invoke=runtime.invoke,
            e2b_url=e2b_url,
            storage_probe=lambda: None,
            pace=self.pace,
            log=self._log,
        )
        self._server = LoopbackServer(create_app(self.state), lambda: None, name="serve")

    def _log(self, line: dict[str, Any]) -> None:
        with self._lock:
            self.lines.append(line)

    def _count_wakeup(self, result: str) -> None:
        with self._lock:
            self.wakeups[result] = self.wakeups.get(result, 0) + 1

    @property
    def url(self) -> str:
        return f"{self._server.url}/v1/invocations"

    def start(self, temper_api_url: str | None = None) -> Self:
        """Serves; with push on, wake-ups go to `temper_api_url` (Temper's API)."""
        if self.pace.settings.push:
            if temper_api_url is None:
                raise ValueError("push needs the Temper API's URL")
            target = WakeTarget(
                temper_api_url,
                self._credentials.get,
                wake_action=self._wake_action,
                entity_sets=self._entity_sets,
            )
            self.pace.wakeups = WakeupStore(self._storage)
            self.pace.sender = WakeupSender(
                self.pace.wakeups, target, claimer="simulate", observe=self._count_wakeup
            )
        self._server.start()
        return self

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pace.holds.drain()  # a request still held answers now, so the server can stop
        self._server.stop()
        self.pool.shutdown()

    def summary(self) -> dict[str, Any]:
        """What `serve` did in the run: requests, those held, component calls, wake-ups."""
        with self._lock:
            lines = [line for line in self.lines if line.get("event") == "invocation"]
            wakeups = dict(sorted(self.wakeups.items()))
        calls = sum(int(line["component_calls"]) for line in lines)
        triggers = Counter(str(line["trigger_action"]) for line in lines)
        return {
            "hold_ms": self.pace.settings.hold_ms,
            "push": self.pace.push,
            "requests": len(lines),
            "requests_by_trigger": dict(sorted(triggers.items())),
            "held_requests": sum(1 for line in lines if line["held_ms"] > 0),
            "component_calls": calls,
            "reasks": calls - len(lines),
            "max_held_at_once": self.holds.peak,
            "wake_ups": wakeups,
        }


class ServedInvoker:
    """A session's invocation as a Temper deployment makes it: the context to the shim,
    which POSTs it to `serve` with the service's token; the shim's result back as the
    outcome the executor dispatches."""

    def __init__(self, served: ServedProvisioner, module: str, shim: Path | None = None) -> None:
        shim = shim or default_shim()
        if not shim.is_file():
            raise FileNotFoundError(f"{shim} not found: run ./build.sh first")
        self.served = served
        self.module = module
        self.shim = TemperAbiModule.load(shim)

    def invoke(self, invocation: Invocation) -> Outcome:
        context = shim_context(invocation, self.module)
        config = context["integration_config"]
        config["provisioner_url"] = self.served.url
        config["provisioner_token"] = self.served.token
        return outcome_of(self.shim.invoke(context))

    def close(self) -> None:
        self.shim.close()


__all__ = [
    "ServedInvoker",
    "ServedProvisioner",
    "outcome_of",
    "shim_context",
]
