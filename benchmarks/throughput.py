"""Figure 6: invocations per second on all cores, and how many queued sessions that keeps
alive (issue 16).

Two host set-ups, side by side in alternating rounds, each measured in a fresh process
(so the wasmtime-py fixes can be switched and one set-up's memory never helps the other):

- baseline: today's code path before issue 16: one process, wasmtime's default
  allocator, wasmtime-py's own `list<u8>` and type handling
  (`SANDBOX_PROVISIONER_FAST_CONVERSIONS=0`), each store closed before the call answers
  (`close_in_background=False`), one `ComponentRuntime` shared by one thread per core;
- pool: `host.runtime.pool.ProcessPoolRuntime`: one worker process per core, each with
  its own runtime on the pooling allocator (memory kept resident) and the conversion
  fixes, callers on two threads per worker.

Both use the same SQLite file kind, the same mock E2B (zero latency) and the same
component. Figures:
- held invocations/s: `provision` of an entity that holds its sandbox, for a fixed time;
- held p50 and full-create p50: one caller, one call at a time (through the pool, and the
  pool's in-process runtime alone for reference);
- queued polls/s: `provision` of entities waiting behind a full account (100 waiters),
  the call a queued session makes on every poll;
- the ceiling: a queued session polls every P seconds (the example spec's
  `after_seconds = 5`, examples/curation_job.toml; 15 s for a slower spec) and dies when
  no answer comes for L = 1800 s (the spec's liveness timer). A host serving R polls/s
  keeps S = R x P sessions polled on schedule; beyond that the poll loop (re-armed after
  each answer) stretches every session's interval to S / R, so sessions stay alive while
  S < R x L (an upper bound: the queue's own decision cost grows with S, figure 3).
- three hosts on Redis: S_3 = 3 x R_redis x P when each host has its own cores and Redis
  keeps up; confirmed by running three pools at once on one Redis for a few seconds (on
  this machine they share its cores, so the measured total is what 2 cores serve).

Run alone: .venv/bin/python -m benchmarks.throughput [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.table import Row, ms, times

THROUGHPUT_TARGET = 3.0
HELD_TARGET = 0.75
CREATE_TARGET = 0.7
POLL_INTERVALS_S = (5, 15)
LIVENESS_S = 1800
WAITERS = 100
HOSTS = 3
ROOT = Path(__file__).resolve().parent.parent
QUEUED = (
    ("create_rate_per_s", "1000"),
    ("create_burst", "1000"),
    ("create_slots", "1000"),
    ("max_sandboxes", "1"),
)


# -- in the measuring process ------------------------------------------------------------


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (from /proc/PID/stat)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


@dataclass
class Invoker:
    invoke: Callable[[Any], Any]
    pids: list[int]  # every process whose CPU the calls use


@contextmanager
def _invoker(task: dict[str, Any]) -> Iterator[Invoker]:
    from benchmarks.support import API_KEY, QuietTelemetry
    from host.runtime.loader import Pooling, load_component

    component = Path(task["component"]) if task.get("component") else None
    pooling: Pooling | None = None
    if task["pooled"]:
        resident = task.get("keep_resident_bytes")
        pooling = Pooling() if resident is None else Pooling(keep_resident_bytes=resident)
    with ExitStack() as stack:
        if task["mode"] == "pool":
            from host.runtime.pool import ProcessPoolRuntime, WorkerSpec

            spec = WorkerSpec(
                e2b_url=task["e2b_url"],
                api_key=API_KEY,
                storage_url=task["storage_url"],
                account=task["account"],
                component=component,
                allow_private_network=True,
                pooling=pooling,
                fast_conversions=task["fast"],
                telemetry_factory=QuietTelemetry,
            )
            pool = stack.enter_context(
                ProcessPoolRuntime(
                    spec, workers=task["workers"], threads_per_worker=task["threads_per_worker"]
                )
            )
            yield Invoker(pool.invoke, [os.getpid(), *pool.worker_pids()])
            return
        from host.runtime.component_runtime import ComponentRuntime, HostServices
        from host.services.http_gateway import HttpGateway
        from host.storage import storage_from_uri

        storage = storage_from_uri(task["storage_url"])
        stack.callback(storage.close)
        gateway = HttpGateway(task["e2b_url"], API_KEY, allow_private_network=True)
        stack.callback(gateway.close)
        services = HostServices(storage, gateway, QuietTelemetry(), account=task["account"])
        runtime = ComponentRuntime(
            load_component(component, pooling=pooling),
            services,
            close_in_background=task["background_close"],
        )
        stack.callback(runtime.close)
        yield Invoker(runtime.invoke, [os.getpid()])


def _call(
    task: dict[str, Any], entity: str, *, operation: str = "provision", queued: bool = False
) -> Any:
    from benchmarks.support import WIDE_OPEN, invocation

    # Entity records are the tenant's: a tenant per account keeps tasks sharing a store
    # (the Redis ones) from finding each other's sandboxes.
    return invocation(
        task["e2b_url"],
        entity,
        operation=operation,
        tenant=task["account"],
        config=QUEUED if queued else WIDE_OPEN,
    )


def _expect(outcome: Any, action: str) -> None:
    if outcome.action != action:
        raise RuntimeError(f"expected {action}, got {outcome}")


def _rate(task: dict[str, Any], invoker: Invoker) -> dict[str, Any]:
    invoke = invoker.invoke
    tag = task["tag"]
    queued = task["op"] == "queued"
    if queued:
        # Hosts sharing an account race to provision the one blocker: wait until it holds.
        for _ in range(200):
            if invoke(_call(task, "blocker", queued=True)).action == "SandboxReady":
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("the blocker never got its sandbox")
        entities = [f"{tag}-w{i}" for i in range(WAITERS)]
        for entity in entities:
            _expect(invoke(_call(task, entity, queued=True)), "SandboxQueued")
        expect = "SandboxQueued"
    else:
        entities = [f"{tag}-held"]
        _expect(invoke(_call(task, entities[0])), "SandboxReady")
        expect = "SandboxReady"
    calls = [_call(task, entity, queued=queued) for entity in entities]
    if task.get("start_at"):
        time.sleep(max(0.0, task["start_at"] - time.time()))
    counts = [0] * task["callers"]
    problems: list[str] = []
    cpu_started = _cpu_seconds(invoker.pids)
    parent_cpu_started = _cpu_seconds(invoker.pids[:1])
    started = time.perf_counter()
    stop = started + task["seconds"]

    def caller(index: int) -> None:
        position = index
        while time.perf_counter() < stop:
            outcome = invoke(calls[position % len(calls)])
            position += task["callers"]
            if outcome.action != expect:
                problems.append(repr(outcome))
                return
            counts[index] += 1

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(task["callers"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    cpu = _cpu_seconds(invoker.pids) - cpu_started
    parent_cpu = _cpu_seconds(invoker.pids[:1]) - parent_cpu_started
    if problems:
        raise RuntimeError(problems[0])
    completed = sum(counts)
    return {
        "rate": completed / elapsed,
        "calls": completed,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "parent_cpu_seconds": parent_cpu,
    }


def _latency(task: dict[str, Any], invoker: Invoker) -> dict[str, Any]:
    invoke = invoker.invoke
    tag = task["tag"]
    held_call = _call(task, f"{tag}-held")
    _expect(invoke(held_call), "SandboxReady")
    for _ in range(5):  # warm-up
        invoke(held_call)
    held: list[float] = []
    for _ in range(task["calls"]):
        started = time.perf_counter()
        outcome = invoke(held_call)
        held.append(time.perf_counter() - started)
        _expect(outcome, "SandboxReady")
    create: list[float] = []
    for index in range(task["creates"]):
        entity = f"{tag}-c{index}"
        started = time.perf_counter()
        outcome = invoke(_call(task, entity))
        create.append(time.perf_counter() - started)
        _expect(outcome, "SandboxReady")
        _expect(invoke(_call(task, entity, operation="release")), "SandboxReleased")
    return {"held": held, "create": create}


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    with _invoker(task) as invoker:
        return _rate(task, invoker) if task["kind"] == "rate" else _latency(task, invoker)


# -- in the benchmark process ------------------------------------------------------------


def _spawn(task: dict[str, Any]) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["SANDBOX_PROVISIONER_FAST_CONVERSIONS"] = "1" if task["fast"] else "0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.throughput", "--task", json.dumps(task)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _collect(process: subprocess.Popen[str]) -> dict[str, Any]:
    stdout, stderr = process.communicate(timeout=600)
    if process.returncode != 0:
        raise RuntimeError(f"throughput task failed:\n{stderr[-2000:]}")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


def _run(task: dict[str, Any]) -> dict[str, Any]:
    return _collect(_spawn(task))


@dataclass(frozen=True)
class Setup:
    name: str
    fast: bool
    pooled: bool
    mode: str  # "inprocess" or "pool"
    background_close: bool = True


BASELINE = Setup("baseline", fast=False, pooled=False, mode="inprocess", background_close=False)
POOL = Setup("pool", fast=True, pooled=True, mode="pool")
POOLED_RUNTIME = Setup("pooled runtime", fast=True, pooled=True, mode="inprocess")


@dataclass
class ThroughputFigures:
    cores: int
    held_rate: dict[str, list[float]]
    # Invocations per CPU-second of every process involved: capacity the load moves less.
    held_per_cpu_s: dict[str, list[float]]
    # CPU ms per held call of the measuring (caller) process alone: the pool's IPC share.
    parent_cpu_ms_per_call: dict[str, list[float]]
    held_p50: dict[str, float]
    create_p50: dict[str, float]
    queued_rate: float
    redis_rate: float | None
    redis_fleet_rate: float | None
    load_before: str
    load_after: str


class Runner:
    def __init__(self, e2b_url: str, state_dir: Path, component: Path | None) -> None:
        self.e2b_url = e2b_url
        self.state_dir = state_dir
        self.component = component
        self.cores = os.cpu_count() or 1
        self._serial = 0

    def task(self, setup: Setup, kind: str, **extra: Any) -> dict[str, Any]:
        self._serial += 1
        task: dict[str, Any] = {
            "kind": kind,
            "fast": setup.fast,
            "pooled": setup.pooled,
            "mode": setup.mode,
            "background_close": setup.background_close,
            "e2b_url": self.e2b_url,
            "storage_url": f"sqlite:///{self.state_dir / f'{self._serial}.db'}",
            "account": f"bench-{self._serial}",
            "component": str(self.component) if self.component else None,
            "tag": f"{setup.name.replace(' ', '-')}-{self._serial}",
            "workers": self.cores,
            "threads_per_worker": 2,
            "callers": self.cores if setup.mode == "inprocess" else 2 * self.cores,
        }
        task.update(extra)
        return task


def _load_average() -> str:
    from benchmarks.machine import load_average

    return load_average()


def measure(component: Path | None = None, quick: bool = False) -> ThroughputFigures:
    from benchmarks.support import mock_e2b
    from harness.multihost.redis_server import RedisServer, find_redis_server
    from host.runtime.loader import Pooling, load_component

    # Compile into the cache here, once: workers compiling at once would time their start.
    load_component(component)
    load_component(component, pooling=Pooling())
    rounds = 2 if quick else 3
    seconds = 2.0 if quick else 4.0
    calls, creates = (40, 10) if quick else (120, 30)
    load_before = _load_average()
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as scratch, mock_e2b() as mock:
        runner = Runner(mock.url, Path(scratch), component)
        held_rate: dict[str, list[float]] = {BASELINE.name: [], POOL.name: []}
        per_cpu: dict[str, list[float]] = {BASELINE.name: [], POOL.name: []}
        parent_ms: dict[str, list[float]] = {BASELINE.name: [], POOL.name: []}
        held: dict[str, list[float]] = {s.name: [] for s in (BASELINE, POOL, POOLED_RUNTIME)}
        create: dict[str, list[float]] = {s.name: [] for s in (BASELINE, POOL, POOLED_RUNTIME)}
        for _ in range(rounds):
            for setup in (BASELINE, POOL):
                result = _run(runner.task(setup, "rate", op="held", seconds=seconds))
                held_rate[setup.name].append(result["rate"])
                per_cpu[setup.name].append(result["calls"] / max(1e-9, result["cpu_seconds"]))
                parent_ms[setup.name].append(
                    1000 * result["parent_cpu_seconds"] / max(1, result["calls"])
                )
            for setup in (BASELINE, POOL, POOLED_RUNTIME):
                lat = _run(
                    runner.task(setup, "latency", calls=calls // rounds, creates=creates // rounds)
                )
                held[setup.name] += lat["held"]
                create[setup.name] += lat["create"]
        queued = _run(runner.task(POOL, "rate", op="queued", seconds=seconds))["rate"]
        redis_rate: float | None = None
        fleet_rate: float | None = None
        if find_redis_server():
            server = RedisServer(persistent=False)
            server.start()
            try:

                def queued_on_redis(account: str, **extra: Any) -> dict[str, Any]:
                    return runner.task(
                        POOL,
                        "rate",
                        op="queued",
                        seconds=seconds,
                        storage_url=server.url,
                        account=account,
                        **extra,
                    )

                redis_rate = _run(queued_on_redis("solo"))["rate"]
                start_at = time.time() + 20  # after every host has started and set up
                fleet = [_spawn(queued_on_redis("fleet", start_at=start_at)) for _ in range(HOSTS)]
                fleet_rate = sum(_collect(process)["rate"] for process in fleet)
            finally:
                server.close()
    return ThroughputFigures(
        cores=os.cpu_count() or 1,
        held_rate=held_rate,
        held_per_cpu_s=per_cpu,
        parent_cpu_ms_per_call=parent_ms,
        held_p50={name: statistics.median(samples) for name, samples in held.items()},
        create_p50={name: statistics.median(samples) for name, samples in create.items()},
        queued_rate=queued,
        redis_rate=redis_rate,
        redis_fleet_rate=fleet_rate,
        load_before=load_before,
        load_after=_load_average(),
    )


def rows(figures: ThroughputFigures) -> list[Row]:
    base_rate = statistics.median(figures.held_rate[BASELINE.name])
    pool_rate = statistics.median(figures.held_rate[POOL.name])
    rate_x = pool_rate / base_rate
    held, create = figures.held_p50, figures.create_p50
    held_x = held[POOL.name] / held[BASELINE.name]
    create_x = create[POOL.name] / create[BASELINE.name]
    cores = figures.cores

    def rates(name: str) -> str:
        return "/".join(f"{rate:.0f}" for rate in figures.held_rate[name])

    result = [
        Row(
            "6",
            f"held invocations/s, all {cores} cores",
            f"pool {pool_rate:.0f}/s ({cores} processes; rounds {rates(POOL.name)}); "
            f"baseline {base_rate:.0f}/s ({cores} threads; rounds {rates(BASELINE.name)})",
            times(rate_x),
            "baseline",
            f">= {THROUGHPUT_TARGET}x",
            rate_x >= THROUGHPUT_TARGET,
        ),
        Row(
            "6",
            "held invocations per CPU-second (all processes)",
            f"pool {statistics.median(figures.held_per_cpu_s[POOL.name]):.0f} (callers' "
            f"process {statistics.median(figures.parent_cpu_ms_per_call[POOL.name]):.2f} ms "
            f"a call); baseline "
            f"{statistics.median(figures.held_per_cpu_s[BASELINE.name]):.0f}",
            times(
                statistics.median(figures.held_per_cpu_s[POOL.name])
                / statistics.median(figures.held_per_cpu_s[BASELINE.name])
            ),
            "baseline",
        ),
        Row(
            "6",
            "held p50, one caller",
            f"pool {ms(held[POOL.name])}; pooled runtime alone {ms(held[POOLED_RUNTIME.name])};"
            f" baseline {ms(held[BASELINE.name])}",
            f"{times(held_x)} (runtime alone "
            f"{times(held[POOLED_RUNTIME.name] / held[BASELINE.name])})",
            "baseline",
            f"<= {HELD_TARGET}x",
            held_x <= HELD_TARGET,
        ),
        Row(
            "6",
            "full-create p50, one caller (mock, 0 ms)",
            f"pool {ms(create[POOL.name])}; pooled runtime alone "
            f"{ms(create[POOLED_RUNTIME.name])}; baseline {ms(create[BASELINE.name])}",
            f"{times(create_x)} (runtime alone "
            f"{times(create[POOLED_RUNTIME.name] / create[BASELINE.name])})",
            "baseline",
            f"<= {CREATE_TARGET}x",
            create_x <= CREATE_TARGET,
        ),
        Row(
            "6",
            f"queued polls/s, {WAITERS} waiters (pool, SQLite)",
            f"{figures.queued_rate:.0f}/s",
            times(figures.queued_rate / pool_rate),
            "pool, held",
        ),
    ]
    rate = figures.queued_rate
    on_schedule = ", ".join(f"{rate * p:,.0f} at P = {p} s" for p in POLL_INTERVALS_S)
    result.append(
        Row(
            "6",
            "queued sessions one host keeps alive",
            f"polled on schedule (R x P): {on_schedule}; alive at most (R x {LIVENESS_S} s "
            f"liveness): {rate * LIVENESS_S:,.0f}",
            "",
            f"R = {rate:.0f} queued polls/s",
        )
    )
    if figures.redis_rate is not None and figures.redis_fleet_rate is not None:
        solo = figures.redis_rate
        fleet = figures.redis_fleet_rate
        p = POLL_INTERVALS_S[0]
        result.append(
            Row(
                "6",
                f"{HOSTS} hosts on Redis, queued sessions polled on schedule",
                f"{HOSTS} x R_redis x P = {HOSTS} x {solo:.0f}/s x {p} s = "
                f"{HOSTS * solo * p:,.0f} (own cores each); measured: {HOSTS} pools at once "
                f"on one Redis served {fleet:.0f} polls/s in all on these {cores} cores",
                times(fleet / solo),
                "one pool on Redis",
            )
        )
    result.append(
        Row("6", "load average during figure 6", f"{figures.load_before} -> {figures.load_after}")
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--component", type=Path, default=None)
    parser.add_argument("--task", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.task is not None:
        print(json.dumps(run_task(json.loads(args.task))))
        return
    from benchmarks.table import format_text

    print(format_text(rows(measure(args.component, args.quick))))


if __name__ == "__main__":
    main()
