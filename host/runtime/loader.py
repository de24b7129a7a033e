"""Loading the component: compile once, then reload the compiled artefact in milliseconds.

The cache key is the wasm's SHA-256, the wasmtime version and the engine settings that
change generated code (fuel, epochs), so a stale or foreign artefact is never loaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import wasmtime
from wasmtime import component as wc

from host.runtime.paths import cache_dir as default_cache_dir
from host.runtime.paths import default_component


def make_engine() -> wasmtime.Engine:
    config = wasmtime.Config()
    config.consume_fuel = True
    config.epoch_interruption = True
    return wasmtime.Engine(config)


_ENGINE_FINGERPRINT = "fuel=1;epoch=1"


@dataclass(frozen=True)
class LoadedComponent:
    engine: wasmtime.Engine
    component: wc.Component
    path: Path
    sha256: str
    from_cache: bool
    load_seconds: float


def load_component(
    path: Path | None = None,
    *,
    engine: wasmtime.Engine | None = None,
    cache_dir: Path | None = None,
    use_cache: bool = True,
) -> LoadedComponent:
    path = Path(path or default_component())
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run ./build.sh first")
    engine = engine or make_engine()
    started = time.perf_counter()
    wasm = path.read_bytes()
    digest = hashlib.sha256(wasm).hexdigest()
    version = importlib.metadata.version("wasmtime")
    key = hashlib.sha256(f"{digest}:{version}:{_ENGINE_FINGERPRINT}".encode()).hexdigest()[:32]
    cached = (cache_dir or default_cache_dir()) / f"{key}.cwasm"
    if use_cache and cached.is_file():
        try:
            component = wc.Component.deserialize_file(engine, str(cached))
            return LoadedComponent(
                engine, component, path, digest, True, time.perf_counter() - started
            )
        except wasmtime.WasmtimeError:
            cached.unlink(missing_ok=True)  # corrupt or incompatible: compile afresh
    component = wc.Component(engine, wasm)
    if use_cache:
        _store_atomically(cached, component.serialize())
    return LoadedComponent(engine, component, path, digest, False, time.perf_counter() - started)


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
