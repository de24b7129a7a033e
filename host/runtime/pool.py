"""Invocations on every core: N worker processes, each with its own runtime.

Threads sharing one runtime do not scale: every call faults in copy-on-write pages of a
fresh memory image and unmaps them at store drop, and in one address space those
page-table changes cost cross-CPU TLB shootdowns; the threads also share one GIL for
wasmtime-py's Python-side conversions. Separate processes share neither, so
`ProcessPoolRuntime` runs `workers` processes (one per core by default), each opening its
own runtime with `open_runtime` over the same shared storage and E2B, and each engine using
the pooling allocator (`loader.Pooling`) so the threads inside a worker (calls waiting on
E2B, up to `threads_per_worker` at once) hardly fault at all. Within a worker the store of
a finished call is closed on a background thread (host/runtime/closing.py), so resetting
the slot's memory overlaps the next call instead of delaying the answer. The measurements
behind this are in docs/host-performance.md; `sandbox-provisioner serve --processes N`
serves through it.

The contract is unchanged: every invocation gets a fresh instance with the same budgets
in whichever worker runs it, and `invoke(invocation) -> Outcome` is the same call as
`ComponentRuntime.invoke`, safe from many threads. Storage must be shared by URL
(SQLite file, Redis): a `memory://` store would be one per process. A worker that dies
fails its in-flight calls with a retryable `host_error` and is replaced.

Telemetry: each worker builds its sink with `telemetry_factory`, an importable module-level
callable (it is pickled by reference), default `LoggingTelemetry`.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from host.runtime.loader import Pooling
from host.services.http_gateway import Exchange
from provisioner.model import Failure, Invocation, Outcome, failed

_LOG = logging.getLogger(__name__)
READY = "ready"
STARTUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class WorkerSpec:
    """What each worker process opens: the arguments of `open_runtime`, picklable."""

    e2b_url: str
    api_key: str
    storage_url: str
    account: str = "default"
    component: Path | None = None
    budgets: Any = None  # host.runtime.component_runtime.Budgets (imported in the worker)
    allow_private_network: bool = False
    pooling: Pooling | None = field(default_factory=Pooling)
    fast_conversions: bool = True
    telemetry_factory: Callable[[], Any] | None = None
    cache_dir: Path | None = None
    temperfs_url: str | None = None
    # Send each call's E2B exchanges back with its outcome, for `ProcessPoolRuntime.observe`.
    report_exchanges: bool = False


def _worker_main(spec: WorkerSpec, conn: Connection, threads: int) -> None:
    """A worker process: open a runtime, then serve (id, invocation) requests."""
    # Before host.runtime.component_runtime is imported: it installs the wasmtime fixes.
    from host.runtime import wasmtime_compat

    wasmtime_compat.install(fast_conversions=spec.fast_conversions)
    from host.runtime.assembly import open_runtime
    from host.runtime.loader import load_component

    send_lock = threading.Lock()

    def reply(message: object) -> None:
        with send_lock:
            conn.send(message)

    try:
        loaded = load_component(spec.component, cache_dir=spec.cache_dir, pooling=spec.pooling)
        telemetry = spec.telemetry_factory() if spec.telemetry_factory is not None else None
        runtime_cm = open_runtime(
            e2b_url=spec.e2b_url,
            api_key=spec.api_key,
            storage_url=spec.storage_url,
            account=spec.account,
            loaded=loaded,
            telemetry=telemetry,
            budgets=spec.budgets,
            allow_private_network=spec.allow_private_network,
            temperfs_url=spec.temperfs_url,
        )
        runtime = runtime_cm.__enter__()
    except BaseException as error:  # the parent reports it; nothing to serve
        reply(("error", f"{type(error).__name__}: {error}"))
        return
    reply((READY, os.getpid()))
    seen = threading.local()  # the exchanges of the call running on this thread
    if spec.report_exchanges:
        runtime.services.http.observe(lambda exchange: seen.exchanges.append(exchange))

    def serve(request_id: int, invocation: Invocation) -> None:
        seen.exchanges = []
        try:
            outcome = runtime.invoke(invocation)
        except Exception as error:  # invoke returns failures; this is a host bug
            outcome = failed(Failure("host_error", f"{type(error).__name__}: {error}", True))
        reply((request_id, outcome, seen.exchanges))

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="invoke") as executor:
        try:
            while True:
                message = conn.recv()
                if message is None:
                    break
                request_id, invocation = message
                executor.submit(serve, request_id, invocation)
        except (EOFError, OSError):
            pass  # the parent went away
    runtime_cm.__exit__(None, None, None)


class _Worker:
    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.send_lock = threading.Lock()
        self.pending: dict[int, Future[Outcome]] = {}
        self.alive = True
        self.receiver: threading.Thread | None = None


class ProcessPoolRuntime:
    """`invoke(invocation) -> Outcome` on `workers` processes; use as a context manager."""

    def __init__(
        self,
        spec: WorkerSpec,
        *,
        workers: int | None = None,
        threads_per_worker: int = 4,
        start_method: str = "spawn",
    ) -> None:
        if spec.storage_url.startswith("memory:"):
            raise ValueError(
                "a process pool needs storage shared by URL (sqlite:///..., redis://...): "
                "memory:// would be a separate store in every worker"
            )
        if threads_per_worker < 1:
            raise ValueError("threads_per_worker must be at least 1")
        self.spec = spec
        self.workers = workers or os.cpu_count() or 1
        self.threads_per_worker = threads_per_worker
        self._context: Any = multiprocessing.get_context(start_method)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._capacity = threading.BoundedSemaphore(self.workers * threads_per_worker)
        self._closed = False
        self._observers: list[Callable[[Exchange], None]] = []
        self._pool: list[_Worker] = []
        try:
            for _ in range(self.workers):
                self._pool.append(self._spawn())
        except BaseException:
            self.close()
            raise

    # -- workers -------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main,
            args=(self.spec, child, self.threads_per_worker),
            name="invoke-worker",
            daemon=True,
        )
        process.start()
        child.close()
        if not parent.poll(STARTUP_TIMEOUT_S):
            process.kill()
            raise RuntimeError(f"an invocation worker did not start in {STARTUP_TIMEOUT_S:.0f} s")
        try:
            status, detail = parent.recv()
        except EOFError:
            status, detail = "error", f"exited with code {process.join(5) or process.exitcode}"
        if status != READY:
            process.join(5)
            raise RuntimeError(f"an invocation worker failed to start: {detail}")
        worker = _Worker(process, parent)
        worker.receiver = threading.Thread(
            target=self._receive, args=(worker,), name="invoke-results", daemon=True
        )
        worker.receiver.start()
        return worker

    def _receive(self, worker: _Worker) -> None:
        try:
            while True:
                request_id, outcome, exchanges = worker.conn.recv()
                self._report(exchanges)
                with self._lock:
                    future = worker.pending.pop(request_id, None)
                if future is not None:
                    future.set_result(outcome)
        except (EOFError, OSError):
            pass
        self._lost(worker)

    def _lost(self, worker: _Worker) -> None:
        with self._lock:
            worker.alive = False
            orphans = list(worker.pending.values())
            worker.pending.clear()
            replace = not self._closed and worker in self._pool
        for future in orphans:
            future.set_result(
                failed(Failure("host_error", "the invocation worker process died", True))
            )
        if replace:
            try:
                fresh = self._spawn()
            except Exception:
                return  # the pool runs with one worker fewer; invoke still has the others
            with self._lock:
                if self._closed:
                    fresh.conn.send(None)
                    return
                self._pool[self._pool.index(worker)] = fresh

    def observe(self, observer: Callable[[Exchange], None]) -> None:
        """Call `observer` with every E2B exchange of the workers' calls, as
        `HttpGateway.observe` does in one process (needs `spec.report_exchanges`)."""
        if not self.spec.report_exchanges:
            raise ValueError("the workers do not report exchanges: set report_exchanges")
        self._observers.append(observer)

    def _report(self, exchanges: list[Exchange]) -> None:
        for exchange in exchanges:
            for observer in self._observers:
                try:
                    observer(exchange)
                except Exception:
                    _LOG.exception("an HTTP exchange observer failed")

    # -- invoking ------------------------------------------------------------------

    def invoke(self, invocation: Invocation) -> Outcome:
        if self._closed:
            raise RuntimeError("the process pool is closed")
        with self._capacity:
            future: Future[Outcome] = Future()
            with self._lock:
                alive = [w for w in self._pool if w.alive]
                if not alive:
                    return failed(Failure("host_error", "no invocation worker is running", True))
                worker = min(alive, key=lambda w: len(w.pending))
                request_id = next(self._ids)
                worker.pending[request_id] = future
            try:
                with worker.send_lock:
                    worker.conn.send((request_id, invocation))
            except (OSError, ValueError):
                with self._lock:
                    worker.pending.pop(request_id, None)
                return failed(Failure("host_error", "the invocation worker process died", True))
            return future.result()

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._pool if w.alive and w.process.pid is not None]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool = list(self._pool)
        for worker in pool:
            try:
                with worker.send_lock:
                    worker.conn.send(None)
            except (OSError, ValueError):
                pass
        for worker in pool:
            worker.process.join(10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(5)
            worker.conn.close()

    def __enter__(self) -> ProcessPoolRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ProcessPoolRuntime", "WorkerSpec"]
