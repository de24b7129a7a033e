"""What each patch of host/runtime/wasmtime_compat.py buys (docs/wasmtime-compat.md).

- races (fix 1): four threads provisioning through one in-process runtime, with
  wasmtime-py's own variant lowering and with the patch: calls answered SandboxFailed
  (`value not valid for this variant`) out of all calls;
- err (fix 2): a storage error lowered into `get`'s `result<option<entry>, storage-error>`
  untagged (as wasmtime-py picks a case) and wrapped in `WitErr`;
- bytes (fix 3): lowering and lifting one `list<u8>`, per byte (wasmtime-py) and in bulk;
- calls (fixes 3 and 4): process CPU per held and per create call, in a fresh process per
  set-up (none, fix 3 only, fix 4 only, both), in alternating rounds.

Run alone: .venv/bin/python -m benchmarks.wasmtime_compat [--rounds 5] [--calls 90]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SETUPS = ("none", "bytes", "types", "both")


def _install(setup: str) -> None:
    """Fixes 1 and 2, then the speed fixes `setup` names (install() has one switch for both)."""
    from wasmtime.component import _func, _linker, _types

    from host.runtime import wasmtime_compat as wc

    wc.install(fast_conversions=False)
    if setup in ("bytes", "both"):
        wc._original_list_to_c = _types.ListType.convert_to_c
        wc._original_list_from_c = _types.ListType.convert_from_c
        _types.ListType.convert_to_c = wc._list_to_c  # type: ignore[method-assign]
        _types.ListType.convert_from_c = wc._list_from_c  # type: ignore[method-assign]
    if setup in ("types", "both"):
        for class_name, name in wc._MEMO_PROPERTIES:
            cls = getattr(_types, class_name)
            setattr(cls, name, wc._memoized_property(vars(cls)[name], name))
        for class_name, name in wc._MEMO_METHODS:
            cls = getattr(_types, class_name)
            setattr(cls, name, wc._memoized_method(vars(cls)[name], name))
        _linker.func_impl = wc._HOST_FUNC_IMPL
        _func.Func.__call__ = wc._export_call  # type: ignore[method-assign]
        wc._fast_installed = True


@contextmanager
def _runtime(e2b_url: str) -> Iterator[tuple[dict[str, Any], Any]]:
    from benchmarks.throughput import _invoker

    with tempfile.TemporaryDirectory() as scratch:
        task: dict[str, Any] = {
            "kind": "latency", "fast": False, "pooled": True, "mode": "inprocess",
            "background_close": True, "e2b_url": e2b_url,
            "storage_url": f"sqlite:///{scratch}/state.db", "account": "bench",
            "component": None, "tag": "compat",
        }  # fmt: skip
        with _invoker(task) as invoker:
            yield task, invoker.invoke


def _calls_child(setup: str, e2b_url: str, calls: int) -> dict[str, float]:
    from benchmarks.throughput import _call, _expect

    _install(setup)
    with _runtime(e2b_url) as (task, invoke):
        held = _call(task, "held")
        for _ in range(10):
            _expect(invoke(held), "SandboxReady")
        held_cpu = []
        for _ in range(calls):
            started = time.process_time()
            invoke(held)
            held_cpu.append(time.process_time() - started)
        create_cpu = []
        for index in range(calls // 3):
            started = time.process_time()
            _expect(invoke(_call(task, f"c{index}")), "SandboxReady")
            create_cpu.append(time.process_time() - started)
            _expect(invoke(_call(task, f"c{index}", operation="release")), "SandboxReleased")
    return {"held": statistics.median(held_cpu), "create": statistics.median(create_cpu)}


def _races_child(setup: str, e2b_url: str, calls: int) -> dict[str, float]:
    from wasmtime.component import _types

    from benchmarks.throughput import _call

    own_lowering = _types.VariantLikeType._lower
    _install("both")
    if setup == "wasmtime-py":
        _types.VariantLikeType._lower = own_lowering  # type: ignore[method-assign]
    failed = 0
    lock = threading.Lock()
    with _runtime(e2b_url) as (task, invoke):

        def caller(index: int) -> None:
            nonlocal failed
            for call in range(calls):
                outcome = invoke(_call(task, f"r{index}-{call % 5}"))
                if outcome.action not in ("SandboxReady", "SandboxQueued"):
                    with lock:
                        failed += 1

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return {"failed": failed, "calls": 4 * calls}


def _child(kind: str, setup: str, e2b_url: str, calls: int) -> dict[str, float]:
    return (_calls_child if kind == "calls" else _races_child)(setup, e2b_url, calls)


def _spawn(kind: str, setup: str, e2b_url: str, calls: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), SANDBOX_PROVISIONER_FAST_CONVERSIONS="0")
    args = [sys.executable, "-m", "benchmarks.wasmtime_compat", "--child", kind, setup, e2b_url]
    done = subprocess.run(
        [*args, str(calls)], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _probe_types() -> tuple[Any, Any, Any]:
    """The probe's `list<u8>` (compare-and-swap's value), `get`'s result type, a store."""
    import wasmtime
    from wasmtime.component import _types

    from host.runtime.loader import load_component
    from tests.guests.build import build_probe_component

    probe = load_component(build_probe_component())
    imports = probe.component.type.imports(probe.engine)
    storage = imports["temper:sandbox-provisioner/storage@0.1.0"].ty
    assert isinstance(storage, _types.ComponentInstanceType)
    cas, get = (storage.exports(probe.engine)[name].ty for name in ("compare-and-swap", "get"))
    assert isinstance(cas, _types.FuncType) and isinstance(get, _types.FuncType)
    return dict(cas.params)["value"], get.result, wasmtime.Store(probe.engine)


def measure_err() -> str:
    from wasmtime import _ffi as ffi
    from wasmtime.component import Variant

    from host.runtime import wasmtime_compat as wc

    wc.install()
    _, get_result, store = _probe_types()
    error = Variant("unavailable", "redis down")
    answers = []
    for label, value in (("untagged", error), ("WitErr", wc.WitErr(error))):
        raw = ffi.wasmtime_component_val_t()
        try:
            get_result.convert_to_c(store, value, ctypes.pointer(raw))
            answers.append(f"{label}: lowered as {'ok' if raw.of.result.is_ok else 'err'}")
        except (TypeError, ValueError) as refused:
            answers.append(f"{label}: refused ({refused})")
    return "; ".join(answers)


def measure_bytes() -> list[str]:
    from wasmtime import _ffi as ffi

    from host.runtime import wasmtime_compat as wc

    wc.install(fast_conversions=True)
    byte_list, _, store = _probe_types()
    paths = {
        "per byte": (wc._original_list_to_c, wc._original_list_from_c),
        "bulk": (wc._list_to_c, wc._list_from_c),
    }
    lines = []
    for size in (256, 4096, 65536):
        data = random.Random(size).randbytes(size)
        cost = {}
        for name, (to_c, from_c) in paths.items():
            assert to_c is not None and from_c is not None
            repeat = max(3, 200_000 // size)
            samples = []
            for _ in range(5):
                started = time.process_time()
                for _ in range(repeat):
                    raw = ffi.wasmtime_component_val_t()
                    to_c(byte_list, store, data, ctypes.pointer(raw))
                    assert from_c(byte_list, raw) == data
                samples.append((time.process_time() - started) / repeat)
            cost[name] = statistics.median(samples)
        lines.append(
            f"{size} B: per byte {cost['per byte'] * 1e6:.0f} us, bulk "
            f"{cost['bulk'] * 1e6:.1f} us (x{cost['per byte'] / cost['bulk']:.0f})"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=90)
    parser.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        kind, setup, e2b_url, calls = args.child
        print(json.dumps(_child(kind, setup, e2b_url, int(calls))))
        return
    from benchmarks.support import mock_e2b

    print("load average at start:", os.getloadavg())
    with mock_e2b() as server:
        for setup in ("wasmtime-py", "patched"):
            race = _spawn("races", setup, server.url, 60)
            print(f"races, {setup}: {race['failed']:.0f} of {race['calls']:.0f} calls failed")
        print("err:", measure_err())
        for line in measure_bytes():
            print("bytes:", line)
        series: dict[str, list[dict[str, float]]] = {setup: [] for setup in SETUPS}
        for round_ in range(args.rounds):
            for setup in SETUPS if round_ % 2 == 0 else SETUPS[::-1]:
                series[setup].append(_spawn("calls", setup, server.url, args.calls))
    for setup in SETUPS:
        held = statistics.median(r["held"] for r in series[setup]) * 1000
        create = statistics.median(r["create"] for r in series[setup]) * 1000
        print(f"calls, {setup}: held {held:.2f} ms CPU, create {create:.2f} ms CPU (p50)")
    print("load average at end:", os.getloadavg())


if __name__ == "__main__":
    main()
