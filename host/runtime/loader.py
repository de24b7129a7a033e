"""Loading the component: compile once, then reload the compiled artefact in milliseconds.

The cache key is the wasm's SHA-256, the wasmtime version and the engine settings that
change generated code or the artefact's compatibility (fuel, epochs, the allocator), so a
stale or foreign artefact is never loaded.

Two allocators:
- on demand (wasmtime's default): every instance maps its linear memory afresh as a
  copy-on-write view of the memory image; the pages a call touches fault in, and with
  several threads in one address space those faults and the unmapping at store drop cost
  cross-CPU TLB shootdowns.
- pooling (`Pooling`): instances take a preallocated slot; a slot's memory is kept
  resident up to `keep_resident_bytes` and reset in place (wasmtime restores the image
  and zeroes the rest when the slot is freed), so a call faults almost nothing. At most
  `instance_slots` instances exist at once: `ComponentRuntime` waits for a free slot.
  Every instance still starts from the pristine image (tests/host/runtime/test_pristine.py).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime
from wasmtime import component as wc

from host.runtime.paths import cache_dir as default_cache_dir
from host.runtime.paths import default_component


@dataclass(frozen=True)
class Pooling:
    """wasmtime's pooling allocator, sized for this project's componentize-py guests.

    `max_memory_bytes` bounds one linear memory (the runtime's memory budget must fit);
    the per-component counts cover the core instances, memories and tables a
    componentize-py component instantiates, with room to spare."""

    instance_slots: int = 64
    max_memory_bytes: int = 256 * 1024 * 1024
    # Above the guest's ~12 MiB accessible heap a call faults nothing and a larger value
    # costs nothing, so 16 MiB keeps room for the heap to grow; below it the pages past
    # the value fault in again (docs/host-performance.md has the measurements).
    keep_resident_bytes: int = 16 * 1024 * 1024
    core_instances_per_component: int = 64
    memories_per_component: int = 4
    tables_per_component: int = 16
    table_elements: int = 20_000
    instance_metadata_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.instance_slots < 1:
            raise ValueError("a pool needs at least one instance slot")
        if self.keep_resident_bytes > self.max_memory_bytes:
            raise ValueError("keep_resident_bytes is larger than max_memory_bytes")

    def fingerprint(self) -> str:
        return (
            f"pool={self.instance_slots},{self.max_memory_bytes},{self.keep_resident_bytes},"
            f"{self.core_instances_per_component},{self.memories_per_component},"
            f"{self.tables_per_component},{self.table_elements},{self.instance_metadata_bytes}"
        )

    def apply(self, config: wasmtime.Config) -> None:
        ffi = _pooling_ffi()
        slots = self.instance_slots
        pool = ffi.wasmtime_pooling_allocation_config_new()
        try:
            ffi.wasmtime_pooling_allocation_config_total_component_instances_set(pool, slots)
            ffi.wasmtime_pooling_allocation_config_total_core_instances_set(
                pool, slots * self.core_instances_per_component
            )
            ffi.wasmtime_pooling_allocation_config_max_core_instances_per_component_set(
                pool, self.core_instances_per_component
            )
            ffi.wasmtime_pooling_allocation_config_total_memories_set(
                pool, slots * self.memories_per_component
            )
            ffi.wasmtime_pooling_allocation_config_max_memories_per_component_set(
                pool, self.memories_per_component
            )
            ffi.wasmtime_pooling_allocation_config_total_tables_set(
                pool, slots * self.tables_per_component
            )
            ffi.wasmtime_pooling_allocation_config_max_tables_per_component_set(
                pool, self.tables_per_component
            )
            ffi.wasmtime_pooling_allocation_config_total_stacks_set(pool, slots)
            ffi.wasmtime_pooling_allocation_config_max_memory_size_set(pool, self.max_memory_bytes)
            ffi.wasmtime_pooling_allocation_config_table_elements_set(pool, self.table_elements)
            ffi.wasmtime_pooling_allocation_config_max_component_instance_size_set(
                pool, self.instance_metadata_bytes
            )
            ffi.wasmtime_pooling_allocation_config_max_core_instance_size_set(
                pool, self.instance_metadata_bytes
            )
            ffi.wasmtime_pooling_allocation_config_linear_memory_keep_resident_set(
                pool, self.keep_resident_bytes
            )
            ffi.wasmtime_pooling_allocation_config_table_keep_resident_set(pool, 1 << 20)
            # The config copies the pool settings: the pool config is ours to free.
            ffi.wasmtime_pooling_allocation_strategy_set(config.ptr(), pool)
        finally:
            ffi.wasmtime_pooling_allocation_config_delete(pool)


_POOLING_CALLS = (
    "wasmtime_pooling_allocation_config_new",
    "wasmtime_pooling_allocation_config_delete",
    "wasmtime_pooling_allocation_config_total_component_instances_set",
    "wasmtime_pooling_allocation_config_total_core_instances_set",
    "wasmtime_pooling_allocation_config_max_core_instances_per_component_set",
    "wasmtime_pooling_allocation_config_total_memories_set",
    "wasmtime_pooling_allocation_config_max_memories_per_component_set",
    "wasmtime_pooling_allocation_config_total_tables_set",
    "wasmtime_pooling_allocation_config_max_tables_per_component_set",
    "wasmtime_pooling_allocation_config_total_stacks_set",
    "wasmtime_pooling_allocation_config_max_memory_size_set",
    "wasmtime_pooling_allocation_config_table_elements_set",
    "wasmtime_pooling_allocation_config_max_component_instance_size_set",
    "wasmtime_pooling_allocation_config_max_core_instance_size_set",
    "wasmtime_pooling_allocation_config_linear_memory_keep_resident_set",
    "wasmtime_pooling_allocation_config_table_keep_resident_set",
    "wasmtime_pooling_allocation_strategy_set",
)


def _pooling_ffi() -> Any:
    """wasmtime-py's ctypes bindings of the C API's pooling allocator (50.0.1 exposes them
    in `wasmtime._ffi` but not on `Config`); refuses a wasmtime-py without them."""
    from wasmtime import _ffi

    missing = [name for name in _POOLING_CALLS if not callable(getattr(_ffi, name, None))]
    if missing:
        raise RuntimeError(
            f"this wasmtime-py has no pooling allocator binding ({missing[0]}): "
            "review host/runtime/loader.py"
        )
    return _ffi


def make_engine(pooling: Pooling | None = None) -> wasmtime.Engine:
    config = wasmtime.Config()
    config.consume_fuel = True
    config.epoch_interruption = True
    if pooling is not None:
        pooling.apply(config)
    return wasmtime.Engine(config)


def _engine_fingerprint(pooling: Pooling | None) -> str:
    return "fuel=1;epoch=1" + ("" if pooling is None else ";" + pooling.fingerprint())


@dataclass(frozen=True)
class LoadedComponent:
    engine: wasmtime.Engine
    component: wc.Component
    path: Path
    sha256: str
    from_cache: bool
    load_seconds: float
    pooling: Pooling | None = None


def load_component(
    path: Path | None = None,
    *,
    engine: wasmtime.Engine | None = None,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    pooling: Pooling | None = None,
) -> LoadedComponent:
    """`pooling` builds the engine with the pooling allocator (ignored with `engine`:
    an engine given here is described by `pooling`, which must match how it was made)."""
    # Absolute, so a worker process started elsewhere can load the same file.
    path = Path(path or default_component()).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run ./build.sh first")
    engine = engine or make_engine(pooling)
    started = time.perf_counter()
    wasm = path.read_bytes()
    digest = hashlib.sha256(wasm).hexdigest()
    version = importlib.metadata.version("wasmtime")
    fingerprint = _engine_fingerprint(pooling)
    key = hashlib.sha256(f"{digest}:{version}:{fingerprint}".encode()).hexdigest()[:32]
    cached = (cache_dir or default_cache_dir()) / f"{key}.cwasm"
    if use_cache and cached.is_file():
        try:
            component = wc.Component.deserialize_file(engine, str(cached))
            return LoadedComponent(
                engine, component, path, digest, True, time.perf_counter() - started, pooling
            )
        except wasmtime.WasmtimeError:
            cached.unlink(missing_ok=True)  # corrupt or incompatible: compile afresh
    component = wc.Component(engine, wasm)
    if use_cache:
        _store_atomically(cached, component.serialize())
    return LoadedComponent(
        engine, component, path, digest, False, time.perf_counter() - started, pooling
    )


def _store_atomically(target: Path, data: bytes | bytearray) -> None:
    """Write-then-rename, so a concurrent host never reads half an artefact."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".cwasm")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)
    except OSError:
        pass  # a cache that cannot be written only costs the next start a compile
