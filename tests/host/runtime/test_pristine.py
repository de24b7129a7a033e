"""Every invocation starts from the pristine memory image (issue 16).

The probe's `marker` mode reports what a module-level global and a module-level buffer
held on entry, then writes a marker into both. A fresh instance must never see a previous
call's marker, whatever the allocator: wasmtime's default one (a new copy-on-write
mapping per instance), the pooling allocator with a single slot (so every call reuses the
same slot, its memory kept resident and reset in place) and the process pool. The control
(`probe_repeat`) shows that the probe does see its own marker within one instance, so a
reused instance or an unreset memory would be caught.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from host.runtime.loader import LoadedComponent, Pooling, load_component
from host.runtime.pool import ProcessPoolRuntime, WorkerSpec
from host.storage.memory import MemoryBackend
from provisioner.model import Outcome
from tests.conftest import API_KEY
from tests.guests.build import build_probe_component
from tests.system.hardening_support import make_probe_host, probe_invocation

NOTHING_SEEN = {"global": None, "buffer": None}
# One slot: every instance reuses it. Everything resident: the slot's memory is reset in
# place, never handed back to the kernel (the reuse path most likely to leak).
ONE_RESIDENT_SLOT = Pooling(
    instance_slots=1, max_memory_bytes=128 << 20, keep_resident_bytes=128 << 20
)


@pytest.fixture(scope="module")
def probe_path() -> Path:
    return build_probe_component()


TWO_RESIDENT_SLOTS = Pooling(
    instance_slots=2, max_memory_bytes=128 << 20, keep_resident_bytes=128 << 20
)


@pytest.fixture(scope="module", params=["on-demand", "pooling, one resident slot"])
def loaded_probe(request: pytest.FixtureRequest, probe_path: Path) -> LoadedComponent:
    # The default compile cache (as the hardening tests load the probe): compiled once.
    pooling = None if request.param == "on-demand" else ONE_RESIDENT_SLOT
    return load_component(probe_path, pooling=pooling)


def _seen(outcome: Outcome) -> list[dict[str, Any]]:
    assert outcome.action == "ProbeDone", outcome
    seen: list[dict[str, Any]] = outcome.params["seen"]
    return seen


def test_the_probe_sees_its_own_marker_within_one_instance(
    loaded_probe: LoadedComponent,
) -> None:
    host = make_probe_host(loaded_probe)
    try:
        seen = _seen(host.call("marker", probe_marker="same-call", probe_repeat="2"))
    finally:
        host.close()
    assert seen == [NOTHING_SEEN, {"global": "same-call", "buffer": "same-call"}]


def test_no_invocation_sees_the_previous_ones_marker(loaded_probe: LoadedComponent) -> None:
    host = make_probe_host(loaded_probe)
    try:
        for index in range(6):
            seen = _seen(host.call("marker", probe_marker=f"marker-{index}"))
            assert seen == [NOTHING_SEEN], f"call {index} saw {seen}"
    finally:
        host.close()


def test_concurrent_invocations_never_see_each_others_markers(probe_path: Path) -> None:
    # Two slots shared by four threads: slots are reused while other calls run.
    loaded = load_component(probe_path, pooling=TWO_RESIDENT_SLOTS)
    host = make_probe_host(loaded)
    problems: list[str] = []

    def caller(thread: int) -> None:
        for index in range(5):
            outcome = host.runtime.invoke(
                probe_invocation("marker", probe_marker=f"t{thread}-{index}")
            )
            if outcome.action != "ProbeDone" or outcome.params["seen"] != [NOTHING_SEEN]:
                problems.append(f"thread {thread} call {index}: {outcome}")

    try:
        # The pool's map re-raises what a caller raised, where bare threads would only
        # print it.
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(caller, range(4)))
    finally:
        host.close()
    assert problems == []


@pytest.fixture
def probe_pool(probe_path: Path, tmp_path: Path) -> Iterator[ProcessPoolRuntime]:
    spec = WorkerSpec(
        e2b_url="http://127.0.0.1:9",
        api_key=API_KEY,
        storage_url=f"sqlite:///{tmp_path / 'state.db'}",
        component=probe_path,
        allow_private_network=True,
        pooling=ONE_RESIDENT_SLOT,
    )
    with ProcessPoolRuntime(spec, workers=1, threads_per_worker=1) as pool:
        yield pool


def test_the_process_pool_starts_every_invocation_pristine(probe_pool: ProcessPoolRuntime) -> None:
    control = _seen(
        probe_pool.invoke(probe_invocation("marker", probe_marker="c", probe_repeat="2"))
    )
    assert control[1] == {"global": "c", "buffer": "c"}
    for index in range(4):
        seen = _seen(probe_pool.invoke(probe_invocation("marker", probe_marker=f"p{index}")))
        assert seen == [NOTHING_SEEN], f"call {index} saw {seen}"


def test_the_pool_needs_storage_shared_by_url(probe_path: Path) -> None:
    spec = WorkerSpec("http://127.0.0.1:9", API_KEY, storage_url="memory://")
    with pytest.raises(ValueError, match="shared by URL"):
        ProcessPoolRuntime(spec, workers=1)


def test_a_memory_budget_larger_than_the_pools_memories_is_refused(probe_path: Path) -> None:
    from host.runtime.component_runtime import Budgets

    loaded = load_component(probe_path, pooling=ONE_RESIDENT_SLOT)
    with pytest.raises(ValueError, match="memory budget"):
        make_probe_host(loaded, storage=MemoryBackend(), budgets=Budgets(memory_bytes=256 << 20))
