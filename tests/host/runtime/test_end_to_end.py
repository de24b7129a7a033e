"""The guest end to end against the mock E2B: through the built component (wasmtime and
the host's imports) and, for the behaviour both share, natively with the same services."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from host.operator.gates import read_gates
from host.runtime.component_runtime import Budgets, ComponentRuntime, HostServices
from host.runtime.loader import LoadedComponent, load_component
from host.runtime.native import NativeRuntime
from host.services.http_gateway import Exchange, HttpGateway
from host.storage.memory import MemoryBackend
from provisioner.model import Invocation, Outcome
from provisioner.ports import Entry, HttpRequest, HttpResponse
from tests.conftest import API_KEY
from tests.doubles import RecordingTelemetrySink


def invocation(
    url: str,
    entity_id: str = "job-1",
    operation: str = "provision",
    tenant: str = "acme",
    **config: str,
) -> Invocation:
    return Invocation(
        tenant=tenant,
        entity_type="CurationJob",
        entity_id=entity_id,
        trigger_action="Provision",
        trigger_params="{}",
        entity_state="{}",
        config=(("operation", operation), ("e2b_api_url", url), *config.items()),
        session_id="s-1",
        trace_id="t-1",
    )


class SpyGateway(HttpGateway):
    """Records what the guest asked for and what it got back (through the gateway's own
    observer hook, so what is recorded is what every other observer sees)."""

    def __init__(self, base_url: str, api_key: str) -> None:
        super().__init__(base_url, api_key, allow_private_network=True)
        self.requests: list[HttpRequest] = []
        self.responses: list[HttpResponse] = []
        self.observe(self._record)

    def _record(self, exchange: Exchange) -> None:
        self.requests.append(exchange.request)
        if exchange.response is not None:
            self.responses.append(exchange.response)


@dataclass
class Host:
    runtime: ComponentRuntime | NativeRuntime
    storage: MemoryBackend
    gateway: SpyGateway
    telemetry: RecordingTelemetrySink
    url: str

    def run(self, entity_id: str = "job-1", operation: str = "provision", **config: str) -> Outcome:
        return self.runtime.invoke(invocation(self.url, entity_id, operation, **config))


def make_host(
    loaded: LoadedComponent | None,
    url: str,
    storage: Any = None,
    budgets: Budgets | None = None,
) -> Host:
    """A component host, or a native one when `loaded` is None."""
    backend = storage if storage is not None else MemoryBackend()
    gateway = SpyGateway(url, API_KEY)
    telemetry = RecordingTelemetrySink()
    services = HostServices(backend, gateway, telemetry)
    runtime: ComponentRuntime | NativeRuntime = (
        NativeRuntime(services) if loaded is None else ComponentRuntime(loaded, services, budgets)
    )
    return Host(runtime, backend, gateway, telemetry, url)


@pytest.fixture(params=["component", "native"])
def host(request: pytest.FixtureRequest, mock_e2b: Any) -> Iterator[Host]:
    loaded = request.getfixturevalue("loaded_component") if request.param == "component" else None
    built = make_host(loaded, mock_e2b.url)
    yield built
    built.runtime.close()
    built.gateway.close()


def test_the_component_imports_exactly_the_projects_interfaces(
    loaded_component: LoadedComponent,
) -> None:
    imports = set(loaded_component.component.type.imports(loaded_component.engine))
    expected = {
        f"temper:sandbox-provisioner/{name}@0.2.0"
        for name in ("storage", "http", "clock", "randomness", "telemetry")
    }
    assert imports == expected
    exports = set(loaded_component.component.type.exports(loaded_component.engine))
    # componentize-py adds an `exports` instance of its own beside the world's export.
    assert "temper:sandbox-provisioner/provisioner@0.2.0" in exports
    assert not [name for name in imports | exports if name.startswith("wasi:")]


FAST = {"create_rate_per_s": "1000"}


def test_provision_is_idempotent_and_release_kills(host: Host, mock_e2b: Any) -> None:
    first = host.run(**FAST)
    assert first.action == "SandboxReady", first
    sandbox_id = first.params["sandbox_id"]
    assert [s["sandbox_id"] for s in mock_e2b.running_sandboxes()] == [sandbox_id]

    again = host.run(**FAST)
    assert again.action == "SandboxReady"
    assert again.params["sandbox_id"] == sandbox_id
    assert len(mock_e2b.running_sandboxes()) == 1

    released = host.run(operation="release", **FAST)
    assert released.action == "SandboxReleased", released
    assert released.params["sandbox_id"] == sandbox_id
    assert mock_e2b.running_sandboxes() == []

    # A new cycle gets a new sandbox (a new idempotency key), not the killed one.
    fresh = host.run(**FAST)
    assert fresh.action == "SandboxReady", fresh
    assert fresh.params["sandbox_id"] != sandbox_id


def test_the_default_creation_rate_paces_a_second_create(host: Host) -> None:
    assert host.run("job-1").action == "SandboxReady"
    paced = host.run("job-2")
    assert paced.action == "SandboxQueued", paced
    assert paced.params["reason"] == "rate"
    assert 0 < paced.params["retry_after_ms"] <= 1000
    assert paced.params["position"] == 1


def test_v2_create_carries_an_idempotency_key_and_metadata(host: Host) -> None:
    assert host.run().action == "SandboxReady"
    creates = [r for r in host.gateway.requests if r.method == "POST"]
    assert len(creates) == 1
    create = creates[0]
    assert create.url == host.url + "/v2/sandboxes"
    headers = {k.lower(): v for k, v in create.headers}
    key = headers["idempotency-key"]
    assert key.startswith("tsp-") and all(c in "abcdefghijklmnopqrstuvwxyz0123456789-" for c in key)
    assert b"temper_entity_id" in create.body and b"job-1" in create.body


def test_status_reports_the_entity_and_gates(host: Host) -> None:
    host.run()
    status = host.run(operation="status")
    assert status.action == "SandboxStatus", status
    assert status.params["entity"]["state"] == "ready"
    assert isinstance(status.params["gates"], dict)


def test_inspect_answers_the_account_gates_through_the_host_reader(host: Host) -> None:
    # Catches: an inspection that reads another scope than the account's, or a view the
    # WIT boundary cannot carry (the operator and /metrics read it through the component).
    # One create per 100 s: the second waits on the rate however slow the machine is.
    limits = {"create_slots": "1", "create_rate_per_s": "0.01"}
    assert host.run(entity_id="holder", **limits).action == "SandboxReady"
    queued = host.run(entity_id="waiter", tenant="other", **limits)
    view = read_gates(host.runtime.invoke, {**limits, "e2b_api_url": host.url})
    assert view["create_slots"]["limit"] == 1
    assert view["capacity"]["in_use"] == 1 and view["permits_held"] >= 1
    assert queued.action == "SandboxQueued", queued
    waiting = [(w["tenant"], w["entity"]) for w in view["waiters"]]
    assert waiting == [("other", "CurationJob/waiter")]


def test_a_second_load_uses_the_compile_cache(
    loaded_component: LoadedComponent, component_cache_dir: Path
) -> None:
    """The session's component was compiled into an empty cache directory (conftest.py);
    loading it again from that directory deserialises the artefact instead of compiling.
    (The cold load is the session's own: a second compile here would cost as much again.)"""
    cold = loaded_component
    warm = load_component(cold.path, cache_dir=component_cache_dir)
    assert not cold.from_cache
    assert warm.from_cache
    assert warm.sha256 == cold.sha256
    print(
        f"\ncomponent load: compile {cold.load_seconds * 1000:.0f} ms, "
        f"cached {warm.load_seconds * 1000:.1f} ms "
        f"({cold.load_seconds / warm.load_seconds:.0f}x)"
    )


# The smallest component (one empty core module): the loader's cache handling does not
# depend on what it compiles, and compiling this takes milliseconds where the provisioner
# takes 5-7 s (a minute or more on a loaded machine).
TINY_COMPONENT_WAT = (
    '(component (core module $m (func (export "f"))) (core instance (instantiate $m)))'
)


def test_a_corrupt_cache_entry_is_recompiled(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.wasm"
    tiny.write_bytes(wasmtime.wat2wasm(TINY_COMPONENT_WAT))
    cache = tmp_path / "cache"
    assert not load_component(tiny, cache_dir=cache).from_cache
    artefacts = sorted(cache.glob("*.cwasm"))
    assert len(artefacts) == 1
    assert load_component(tiny, cache_dir=cache).from_cache  # the entry is the one looked up
    corrupt = b"not a compiled component"
    artefacts[0].write_bytes(corrupt)
    again = load_component(tiny, cache_dir=cache)
    assert not again.from_cache
    # The corrupt entry was replaced by a good artefact, which the next load uses.
    assert sorted(cache.glob("*.cwasm")) == artefacts
    assert artefacts[0].read_bytes() != corrupt
    assert load_component(tiny, cache_dir=cache).from_cache


def test_a_component_given_by_a_relative_path_is_loaded_by_its_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Catches: a relative --component handed on to worker processes started in another
    # directory (`sandbox-provisioner soak --component dist/...` failed with "not found").
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "tiny.wasm").write_bytes(wasmtime.wat2wasm(TINY_COMPONENT_WAT))
    monkeypatch.chdir(tmp_path)
    loaded = load_component(Path("dist/tiny.wasm"), cache_dir=tmp_path / "cache")
    assert loaded.path == tmp_path.resolve() / "dist" / "tiny.wasm"


def test_fuel_exhaustion_fails_the_invocation_and_the_host_keeps_serving(
    loaded_component: LoadedComponent, mock_e2b: Any
) -> None:
    starved = make_host(loaded_component, mock_e2b.url, budgets=Budgets(fuel=200_000))
    outcome = starved.run()
    assert outcome.action == "SandboxFailed"
    assert outcome.error is not None and outcome.error.code == "fuel_exhausted"
    healthy = make_host(loaded_component, mock_e2b.url, storage=starved.storage)
    assert healthy.run().action == "SandboxReady"


class WrongShapeStorage(MemoryBackend):
    """Answers `get` with a value the WIT types cannot carry: the guest call traps."""

    def get(self, namespace: str, key: str) -> Entry | None:
        return Entry(value=12345, version=1)  # type: ignore[arg-type]


def test_a_host_value_the_wit_types_cannot_carry_fails_the_invocation(
    loaded_component: LoadedComponent, mock_e2b: Any
) -> None:
    """The bad value is caught while the host lowers it into the guest (wasmtime-py raises
    TypeError before the guest sees anything), so this is a host error, not a guest trap
    (a trap is the probe's `trap` mode in test_hardening_budgets.py)."""
    broken = make_host(loaded_component, mock_e2b.url, storage=WrongShapeStorage())
    outcome = broken.run()
    assert outcome.action == "SandboxFailed"
    assert outcome.error is not None and outcome.error.code == "host_error", outcome
    assert "expected bytes" in outcome.error.message, outcome
    assert mock_e2b.running_sandboxes() == []


class SlowStorage(MemoryBackend):
    def get(self, namespace: str, key: str) -> Entry | None:
        time.sleep(0.2)
        return super().get(namespace, key)


def test_the_deadline_interrupts_a_slow_invocation(
    loaded_component: LoadedComponent, mock_e2b: Any
) -> None:
    slow = make_host(
        loaded_component, mock_e2b.url, storage=SlowStorage(), budgets=Budgets(deadline_ms=50)
    )
    outcome = slow.run()
    assert outcome.error is not None and outcome.error.code == "deadline_exceeded", outcome


def test_a_tiny_memory_cap_is_reported(loaded_component: LoadedComponent, mock_e2b: Any) -> None:
    """4 MiB is below the component's initial memory image, so the instance cannot even be
    created: wasmtime refuses the memory at the limit (memory_exhausted), before any guest
    code runs (a guest stopped mid-run by its cap traps instead: see the probe's `alloc`)."""
    cramped = make_host(loaded_component, mock_e2b.url, budgets=Budgets(memory_bytes=4 << 20))
    outcome = cramped.run()
    assert outcome.action == "SandboxFailed"
    assert outcome.error is not None
    assert outcome.error.code == "memory_exhausted", outcome
    assert cramped.gateway.requests == [], "guest code ran under the cap"


def test_a_url_outside_the_allow_list_is_denied(host: Host, mock_e2b: Any) -> None:
    outcome = host.runtime.invoke(invocation("http://203.0.113.9:9", "job-evil"))
    assert outcome.action == "SandboxFailed"
    assert outcome.error is not None and outcome.error.code == "e2b_denied"
    assert mock_e2b.running_sandboxes() == []


def test_the_api_key_is_nowhere_the_guest_can_see(host: Host) -> None:
    outcomes = [host.run(), host.run(operation="status"), host.run(operation="release")]
    seen: list[str] = [repr(o) for o in outcomes]
    seen += [repr(r) for r in host.gateway.requests]
    seen += [repr(r) for r in host.gateway.responses]
    seen += [repr(entry) for entry in host.telemetry.logs + host.telemetry.events]
    for namespace in ("tenant/acme", "account/default"):
        for key in host.storage.keys(namespace):
            seen.append(repr(host.storage.get(namespace, key)))
    assert host.gateway.requests, "the guest made no request"
    assert not [text for text in seen if API_KEY in text]


def test_concurrent_invocations_through_one_runtime(host: Host, mock_e2b: Any) -> None:
    """Many threads invoking at once: without host/runtime/wasmtime_compat.py about one call in
    eight trapped on wasmtime-py's shared variant-lowering cache."""
    outcomes: dict[str, Outcome] = {}
    lock = threading.Lock()

    def provision(entity_id: str) -> None:
        for _ in range(50):
            outcome = host.run(
                entity_id, create_slots="8", create_rate_per_s="1000", max_sandboxes="64"
            )
            if outcome.action != "SandboxQueued":
                break
            time.sleep(min(outcome.params["retry_after_ms"], 200) / 1000)  # as the protocol says
        with lock:
            outcomes[entity_id] = outcome

    for round_ in range(4):
        threads = [
            threading.Thread(target=provision, args=(f"job-{round_}-{i}",)) for i in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    failures = [o.error for o in outcomes.values() if o.error is not None]
    assert not failures
    ready = {o.params["sandbox_id"] for o in outcomes.values() if o.action == "SandboxReady"}
    assert len(ready) == len(outcomes) == 32
    assert len(mock_e2b.running_sandboxes()) == 32
