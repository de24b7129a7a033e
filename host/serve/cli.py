"""`sandbox-provisioner serve`: the provisioner as a long-running HTTP service.

Loads (compiles) the component once, opens the storage, and serves `app.py` with uvicorn.
SIGTERM: readiness turns 503, the listener closes, invocations in flight finish (within
the invocation deadline plus a margin), and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
import uvicorn.server

from host.cli.options import ExitCode, add_runtime_options, fail
from host.operator.gates import read_gates
from host.serve.app import ServeState, create_app
from host.serve.bounds import HEADER_TIMEOUT_S, HeaderDeadlineProtocol
from host.serve.invoker import open_invoker_from
from host.serve.metrics import ServeMetrics
from host.serve.pace_options import add_pace_arguments, env_credential, pace_from_args
from host.serve.pool import InvocationPool
from host.serve.readiness import E2BAddressCheck, probe_storage_write
from host.serve.tenants import TenantAccess, TenantsFileError

TOKEN_ENV = "SANDBOX_PROVISIONER_TOKEN"
DEFAULT_LISTEN = "127.0.0.1:8470"
# Temper's invocation deadline (WasmResourceLimits, 120 s) plus time to answer.
DRAIN_SECONDS = 125


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address to listen on (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=4,
        help="invocation workers: component calls at once (default 4)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="invocation processes: 1 (the default) runs the component in this process; "
        "N > 1 runs it in N worker processes (host/runtime/pool.py), one per core for the "
        "most invocations a second; needs storage shared by URL (sqlite:///, redis://)",
    )
    parser.add_argument(
        "--retry-after",
        type=int,
        default=1,
        metavar="SECONDS",
        help="Retry-After of a 503 when every worker is busy (default 1)",
    )
    parser.add_argument(
        "--tenants",
        type=Path,
        default=None,
        metavar="FILE",
        help="the clients (token digests and the tenants each may act for) and the per-tenant "
        f"Temper credentials, TOML (docs/tenancy.md); reloaded on SIGHUP. ${TOKEN_ENV}, when "
        "set, is one more client that acts for every tenant",
    )
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=HEADER_TIMEOUT_S,
        metavar="SECONDS",
        help="a request's head must arrive within SECONDS of its connection opening (or of "
        f"the previous answer), and then its body within SECONDS (default {HEADER_TIMEOUT_S:g})",
    )
    add_pace_arguments(parser)
    add_runtime_options(parser)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen wants HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


class DrainingServer(uvicorn.Server):
    """uvicorn re-raises a captured SIGTERM after its graceful shutdown, which would end
    the process with status 143; a drain that finished is a clean exit, so SIGTERM is
    handled here (SIGINT keeps uvicorn's behaviour)."""

    def __init__(self, config: uvicorn.Config, state: ServeState) -> None:
        super().__init__(config)
        self.state = state

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        for server in getattr(self, "servers", []):
            for bound in server.sockets:
                host, port = bound.getsockname()[:2]
                self.state.log({"event": "listening", "host": host, "port": port})

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn asks the connections open when its shutdown begins to close, then waits
        # for every connection to go. One the event loop accepted just before the listener
        # closed is set up a loop turn later, misses that request, and stays kept alive
        # while its client polls: the drain then lasts the whole graceful limit. So ask
        # every later connection too, until the end.
        asked = set(self.server_state.connections)
        closer = asyncio.create_task(close_late_connections(self.server_state, asked))
        try:
            await super().shutdown(sockets=sockets)
        finally:
            closer.cancel()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.draining = True
        if self.state.pace is not None:
            self.state.pace.holds.drain()
        if sig == signal.SIGTERM:
            self.should_exit = True
            return
        super().handle_exit(sig, frame)


async def close_late_connections(
    server_state: uvicorn.server.ServerState, asked: set[Any], interval_s: float = 0.05
) -> None:
    """Ask each connection that is not in `asked` to shut down (an idle one closes, a busy
    one closes after its response), every `interval_s`, until cancelled."""
    while True:
        for connection in list(server_state.connections):
            if connection not in asked:
                asked.add(connection)
                connection.shutdown()
        await asyncio.sleep(interval_s)


def _fail(message: str) -> int:
    return fail(message, "sandbox-provisioner serve")


def temper_credential(access: TenantAccess) -> Callable[[str], str | None]:
    """A tenant's Temper credential: its `[[temper]]` entry in the tenants file, else the
    one-tenant set-up's environment credential."""
    return lambda tenant: access.temper_credential(tenant) or env_credential(tenant)


def bind_listener(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything else starts, so that a port in use is
    a clear message and exit 1 rather than uvicorn's own error and exit 3 (which `simulate`
    uses for an overloaded host)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError:
        listener.close()
        raise
    return listener


def run_serve(args: argparse.Namespace) -> int:
    token = os.environ.get(TOKEN_ENV, "")
    if not token and args.tenants is None:
        return _fail(f"set the service's bearer token in ${TOKEN_ENV}, or give --tenants FILE")
    if args.read_timeout <= 0:
        return _fail("--read-timeout must be positive")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        access = TenantAccess(args.tenants, operator_token=token or None)
    except TenantsFileError as error:
        return _fail(str(error))
    try:
        host, port = parse_listen(args.listen)
        pool = InvocationPool(args.workers)
    except ValueError as error:
        return _fail(str(error))
    if not os.environ.get(args.api_key_env):
        # Not a refusal: a spec may still bring its own e2b_api_key in the trigger config.
        print(
            f"sandbox-provisioner serve: warning: ${args.api_key_env} is empty, so only "
            "invocations whose config brings an e2b_api_key can provision",
            file=sys.stderr,
        )
    if args.processes < 1:
        return _fail("--processes must be at least 1")
    try:
        e2b_check = E2BAddressCheck(args.e2b_url, args.allow_private_network)
    except ValueError as error:
        return _fail(f"--e2b-url: {error}")
    # A configuration that can never provision does not start (and so never says ready).
    refused = e2b_check.refusal()
    if refused is not None:
        return _fail(refused)
    try:
        listener = bind_listener(host, port)
    except OSError as error:
        print(
            f"sandbox-provisioner serve: cannot listen on {args.listen}: {error.strerror} "
            "(another process holds the port? choose another with --listen)",
            file=sys.stderr,
        )
        return ExitCode.FAILED
    try:
        with open_invoker_from(args, processes=args.processes, calls=args.workers) as invoker:
            storage = invoker.storage
            state = ServeState(
                token=token,
                pool=pool,
                invoke=invoker.invoke,
                e2b_url=args.e2b_url,
                storage_probe=lambda: probe_storage_write(storage),
                retry_after_s=max(0, args.retry_after),
                access=access,
                body_timeout_s=args.read_timeout,
                e2b_refusal=e2b_check.refusal,
            )
            state.pace = pace_from_args(
                args, storage, workers=args.workers, credential=temper_credential(access)
            )
            access.log_to(state.log)
            if args.tenants is not None:
                signal.signal(signal.SIGHUP, lambda _sig, _frame: access.reload())
            state.metrics = ServeMetrics(
                read_gates=lambda: read_gates(invoker.invoke, state.settings),
                workers_busy=lambda: pool.busy,
                held_requests=lambda: state.pace.holds.count if state.pace else 0,
            )
            state.pace.observe_hold = state.metrics.observe_hold
            state.pace.observe_wakeup = state.metrics.observe_wakeup
            if state.pace.sender is not None:
                state.pace.sender.observe = state.metrics.observe_wakeup
            invoker.observe(state.metrics.observe_exchange)
            config = uvicorn.Config(
                create_app(state),
                host=host,
                port=port,
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=DRAIN_SECONDS,
                lifespan="on",  # the wake-up sender (host/serve/pacing.py)
                http=HeaderDeadlineProtocol.with_timeout(args.read_timeout),
            )
            DrainingServer(config, state).run(sockets=[listener])
            pool.shutdown()
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        return _fail(str(error))
    finally:
        listener.close()
    return ExitCode.OK
