"""Figure 1: what one `run` through the component costs, against the floor and natively.

Side by side, in rounds (so drift on a shared machine hits every series alike):

- floor: the probe guest (tests/guests/probe) with `probe_mode=noop`, built with the
  same componentize-py against the same WIT and run by the same host: a fresh Store,
  instantiate, one call that returns at once;
- held: `provision` of an entity that already holds its sandbox (instantiate, call,
  the storage reads that find it; no HTTP), through the component and natively;
- create: `provision` of a new entity against the mock E2B with zero latency (admission
  decision, the POST, the settle), through the component and natively; each is
  released again outside the timing so the gates stay empty.

Each call is timed by the wall clock and by the calling thread's CPU time (wasmtime runs
the guest on the calling thread): on a shared machine the CPU-time ratio is the steadier
one, the wall-clock one is what a caller waits.

Cold start: compiling the component (an empty cache) against loading the cached
artefact.

Run alone: .venv/bin/python -m benchmarks.invocation [--calls 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import wasmtime

from benchmarks.support import Hosts, invocation, load_cached, mock_e2b, open_hosts
from benchmarks.table import Row, ms, percentile, times
from host.runtime.component_runtime import ComponentRuntime, HostServices
from host.runtime.loader import LoadedComponent, load_component
from provisioner.model import SANDBOX_READY, SANDBOX_RELEASED, Invocation, Outcome
from tests.guests.build import build_probe_component

FLOOR_TARGET = 1.5


@dataclass(frozen=True)
class Series:
    name: str
    seconds: list[float]
    cpu_seconds: list[float]

    @property
    def p50(self) -> float:
        return statistics.median(self.seconds)

    @property
    def p99(self) -> float:
        return percentile(self.seconds, 0.99)

    @property
    def cpu_p50(self) -> float:
        return statistics.median(self.cpu_seconds)


@dataclass(frozen=True)
class InvocationFigures:
    series: dict[str, Series]
    compile_s: float
    cached_load_s: float
    # Fuel (roughly, wasm instructions) one call burns: floor, held, create.
    fuel: dict[str, int]


class FuelMeter(ComponentRuntime):
    """A runtime that remembers the fuel its last call on this thread used: a count of
    the guest's work that the machine's load does not move."""

    def __init__(self, loaded: LoadedComponent, services: HostServices) -> None:
        super().__init__(loaded, services)
        self._fuel_left = threading.local()

    def _after_call(self, store: wasmtime.Store) -> None:
        self._fuel_left.value = store.get_fuel()

    def fuel_used(self, call: Invocation) -> int:
        outcome = self.invoke(call)
        if not outcome.success:
            raise RuntimeError(f"fuel probe failed: {outcome}")
        left: int = self._fuel_left.value
        return self.budgets.fuel - left


def measure_fuel(
    loaded: LoadedComponent, probe: LoadedComponent, services: HostServices, url: str
) -> dict[str, int]:
    component, floor = FuelMeter(loaded, services), FuelMeter(probe, services)
    try:
        return {
            "floor": floor.fuel_used(invocation(url, "probe", config=(("probe_mode", "noop"),))),
            "held": component.fuel_used(invocation(url, "held")),
            "create": component.fuel_used(invocation(url, "fuel-create")),
        }
    finally:
        component.close()
        floor.close()


Sample = tuple[float, float]  # wall seconds, thread CPU seconds


def _timed(call: Callable[[], Outcome], expect: str) -> Sample:
    cpu_started = time.thread_time()
    started = time.perf_counter()
    outcome = call()
    elapsed = time.perf_counter() - started
    cpu = time.thread_time() - cpu_started
    if outcome.action != expect:
        raise RuntimeError(f"expected {expect}, got {outcome}")
    return elapsed, cpu


def measure_calls(
    loaded: LoadedComponent, probe: LoadedComponent, calls: int, warmup: int = 5
) -> tuple[dict[str, Series], dict[str, int]]:
    samples: dict[str, list[Sample]] = {
        name: [] for name in ("floor", "held", "held_native", "create", "create_native")
    }
    with mock_e2b() as mock:
        url = mock.url
        hosts = open_hosts(loaded, url, probe=probe)
        try:
            assert hosts.probe is not None
            probe_host = hosts.probe
            noop = invocation(url, "probe", config=(("probe_mode", "noop"),))
            held = invocation(url, "held")
            _timed(lambda: hosts.component.invoke(held), SANDBOX_READY)
            creates_before = mock.stats().creates_attempted
            for index in range(warmup + calls):
                round_samples = {
                    "floor": _timed(lambda: probe_host.invoke(noop), "ProbeDone"),
                    "held": _timed(lambda: hosts.component.invoke(held), SANDBOX_READY),
                    "held_native": _timed(lambda: hosts.native.invoke(held), SANDBOX_READY),
                    "create": _create(hosts, url, f"c-{index}", native=False),
                    "create_native": _create(hosts, url, f"n-{index}", native=True),
                }
                if index >= warmup:
                    for name, sample in round_samples.items():
                        samples[name].append(sample)
            # Two creates per round and nothing else: the held path never reached E2B.
            made = mock.stats().creates_attempted - creates_before
            if made != 2 * (warmup + calls):
                raise RuntimeError(f"expected {2 * (warmup + calls)} creates, E2B saw {made}")
            fuel = measure_fuel(loaded, probe, hosts.services, url)
        finally:
            hosts.close()
    series = {
        name: Series(name, [wall for wall, _ in taken], [cpu for _, cpu in taken])
        for name, taken in samples.items()
    }
    return series, fuel


def _create(hosts: Hosts, url: str, entity: str, *, native: bool) -> Sample:
    runtime = hosts.native if native else hosts.component
    sample = _timed(lambda: runtime.invoke(invocation(url, entity)), SANDBOX_READY)
    released = runtime.invoke(invocation(url, entity, operation="release"))
    if released.action != SANDBOX_RELEASED:
        raise RuntimeError(f"release failed: {released}")
    return sample


def measure_cold_start(path: Path | None) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache:
        cold = load_component(path, cache_dir=Path(cache))
        warm = load_component(path, cache_dir=Path(cache))
    assert not cold.from_cache and warm.from_cache
    return cold.load_seconds, warm.load_seconds


def measure(
    loaded: LoadedComponent, calls: int, *, component_path: Path | None = None
) -> InvocationFigures:
    probe = load_cached(build_probe_component())
    if not loaded.from_cache:
        loaded = load_cached(loaded.path)
    series, fuel = measure_calls(loaded, probe, calls)
    compile_s, cached_s = measure_cold_start(component_path)
    return InvocationFigures(series, compile_s, cached_s, fuel)


def rows(figures: InvocationFigures) -> list[Row]:
    s = figures.series
    floor = s["floor"]

    def p(series: Series) -> str:
        return f"p50 {ms(series.p50)}, p99 {ms(series.p99)}; CPU p50 {ms(series.cpu_p50)}"

    def vs(series: Series, base: Series) -> str:
        return (
            f"{times(series.p50 / base.p50, 3)} p50, {times(series.p99 / base.p99)} p99, "
            f"{times(series.cpu_p50 / base.cpu_p50)} CPU"
        )

    held, create = s["held"], s["create"]
    return [
        Row("1", "empty component call (floor: probe noop)", p(floor), "1.00x", "itself"),
        Row(
            "1",
            "provision, sandbox already held (no E2B)",
            p(held),
            vs(held, floor),
            "floor",
            f"<= {FLOOR_TARGET}x floor (p50)",
            held.p50 / floor.p50 <= FLOOR_TARGET,
        ),
        Row(
            "1",
            "provision, full create (mock, 0 ms latency)",
            p(create),
            vs(create, floor),
            "floor",
        ),
        *(
            Row(
                "1",
                f"same logic natively: {label}",
                p(s[f"{kind}_native"]),
                vs(s[f"{kind}_native"], s[kind]),
                f"component, {kind}",
            )
            for kind, label in (("held", "held"), ("create", "full create"))
        ),
        Row(
            "1",
            "fuel per call (guest work; load-independent)",
            f"floor {figures.fuel['floor']:,}, held {figures.fuel['held']:,}, "
            f"create {figures.fuel['create']:,}",
            f"held {times(figures.fuel['held'] / figures.fuel['floor'])}, "
            f"create {times(figures.fuel['create'] / figures.fuel['floor'])}",
            "floor",
        ),
        Row(
            "1",
            "cold start: compile vs cached load",
            f"{ms(figures.compile_s)} vs {ms(figures.cached_load_s)}",
            times(figures.compile_s / figures.cached_load_s),
            "cached load",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    from benchmarks.table import format_text

    print(format_text(rows(measure(load_cached(), args.calls))))


if __name__ == "__main__":
    main()
