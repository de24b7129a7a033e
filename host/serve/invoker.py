"""What `serve` invokes the component through: the runtime in this process, or the
process pool (host/runtime/pool.py) for every core (`--processes N`).

Either way the service gets the same three things: `invoke`, the storage (readiness and
the gates view read it in this process) and `observe` for the E2B exchange metrics (the
pool's workers send their exchanges back with each outcome).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from host.cli.options import open_runtime_from
from host.runtime.assembly import default_storage_url
from host.services.http_gateway import Exchange
from host.storage import storage_from_uri
from host.storage.base import StorageBackend
from provisioner.model import Invocation, Outcome


@dataclass(frozen=True)
class ServeInvoker:
    invoke: Callable[[Invocation], Outcome]
    storage: StorageBackend
    observe: Callable[[Callable[[Exchange], None]], None]
    processes: int  # 1: in this process


@contextmanager
def open_invoker_from(
    args: argparse.Namespace, *, processes: int, calls: int
) -> Iterator[ServeInvoker]:
    """The options of `host.cli.options.add_runtime_options`, on `processes` processes;
    `calls` invocations at once in all (spread over the worker processes)."""
    if processes <= 1:
        with open_runtime_from(args) as runtime:
            yield ServeInvoker(
                runtime.invoke, runtime.services.storage, runtime.services.http.observe, 1
            )
        return
    from host.runtime.pool import ProcessPoolRuntime, WorkerSpec

    storage_url = args.storage or default_storage_url()
    spec = WorkerSpec(
        e2b_url=args.e2b_url,
        api_key=os.environ.get(args.api_key_env, ""),
        storage_url=storage_url,
        account=args.account,
        component=args.component,
        allow_private_network=args.allow_private_network,
        temperfs_url=args.temper_api_url,
        report_exchanges=True,
    )
    threads = max(1, math.ceil(calls / processes))
    storage = storage_from_uri(storage_url)
    try:
        with ProcessPoolRuntime(spec, workers=processes, threads_per_worker=threads) as pool:
            yield ServeInvoker(pool.invoke, storage, pool.observe, processes)
    finally:
        storage.close()


__all__ = ["ServeInvoker", "open_invoker_from"]
