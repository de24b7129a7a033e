"""`sandbox-provisioner status`: an account's gates and every waiter, for an operator.

Reads the gates through the component's inspection (`gates.py`), never writes: a SQLite file
that does not exist, `memory://`, or an account with no state at all is refused (exit 1)
rather than created or shown empty. Prints one snapshot as rich tables, `--json` for
machines, or `--watch`: a live view (`rich.live.Live`) on a terminal, else one timestamped
snapshot per `--interval` seconds, until interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from host.cli.options import ExitCode, add_account_option, add_storage_option
from host.operator.gates import GateDoc, GateReadFailed, read_gates_offline
from host.runtime.assembly import default_storage_url
from host.services.namespaces import account_namespace
from host.storage import storage_from_uri
from host.storage.base import StorageBackend, StorageError
from host.storage.sqlite import SqliteBackend

EXIT_OK = ExitCode.OK
EXIT_UNAVAILABLE = ExitCode.FAILED
EXIT_USAGE = ExitCode.USAGE


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    add_storage_option(parser)
    add_account_option(parser)
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an admission setting of the integration config (create_slots=4, ...): limits "
        "and ETAs depend on them (repeatable; defaults otherwise)",
    )
    parser.add_argument("--json", action="store_true", help="print one snapshot as JSON")
    parser.add_argument("--watch", action="store_true", help="a live view until interrupted")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="--watch refresh, seconds (default 1)"
    )


def _seconds(ms: int | None) -> str:
    if ms is None:
        return "-"
    return f"{ms / 1000:.1f}s"


def gates_table(view: GateDoc, account: str) -> Table:
    table = Table(title=f"account {account!r} gates", title_justify="left")
    table.add_column("gate")
    table.add_column("in use", justify="right")
    table.add_column("limit", justify="right")
    table.add_column("detail")
    slots = view["create_slots"]
    holders = ", ".join(f"{lease['tenant']}/{lease['entity']}" for lease in slots["leases"])
    table.add_row("create slots", str(slots["in_use"]), str(slots["limit"]), holders or "-")
    rate = view["rate"]
    table.add_row(
        "rate",
        "-",
        f"{rate['burst']} @ {rate['per_s']:g}/s",
        f"{rate['available']} available, next in {_seconds(rate['next_in_ms'])}",
    )
    capacity = view["capacity"]
    effective = capacity["effective_limit"]
    shrunk = f" (shrunk from {capacity['limit']})" if effective != capacity["limit"] else ""
    table.add_row(
        "capacity",
        str(capacity["in_use"]),
        f"{effective}{shrunk}",
        f"{capacity['running']} running",
    )
    backoff = view["backoff"]
    table.add_row(
        "backoff",
        "-",
        "-",
        f"cooling {_seconds(backoff['cooling_ms'])}, {backoff['failures']} failures"
        if backoff["cooling_ms"] > 0
        else f"none ({backoff['failures']} failures)",
    )
    budget = view["retry_budget"]
    table.add_row("retry budget", f"{budget['tokens']:.2f}", f"{budget['limit']:g}", "tokens")
    return table


def waiters_table(view: GateDoc) -> Table:
    waiters = view["waiters"]
    table = Table(title=f"{len(waiters)} waiting", title_justify="left")
    for column in ("#", "tenant", "entity", "reason", "waited", "ETA", "stage"):
        table.add_column(column, justify="right" if column in ("#", "waited", "ETA") else "left")
    for waiter in waiters:
        entity = waiter["entity"] if waiter["entity"] is not None else "(gone)"
        stage = waiter["stage"] + ("" if waiter["alive"] else ", not polling")
        table.add_row(
            str(waiter["position"]),
            waiter["tenant"],
            entity,
            waiter["reason"],
            _seconds(waiter["waited_ms"]),
            _seconds(waiter["eta_ms"]),
            stage,
        )
    return table


def render(view: GateDoc, account: str) -> RenderableType:
    return Group(gates_table(view, account), waiters_table(view))


def _unavailable(error: Exception) -> RenderableType:
    return Text(f"storage unavailable: {error}", style="bold red")


def run_status(args: argparse.Namespace, console: Console | None = None) -> int:
    console = console or Console()
    try:
        settings = dict(_setting(item) for item in args.config)
    except ValueError as error:
        print(f"sandbox-provisioner status: {error}", file=sys.stderr)
        return EXIT_USAGE
    uri = args.storage or default_storage_url()
    try:
        missing = _missing_storage(uri)
        if missing is not None:
            print(f"sandbox-provisioner status: {missing}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        backend = storage_from_uri(uri)
    except ValueError as error:
        print(f"sandbox-provisioner status: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        try:
            empty = not backend.keys(account_namespace(args.account))
        except StorageError as error:
            print(f"sandbox-provisioner status: storage unavailable: {error}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        if empty:
            print(
                f"sandbox-provisioner status: account {args.account!r} has no state in {uri} "
                "(no invocation has used it: check --account, default 'default')",
                file=sys.stderr,
            )
            return EXIT_UNAVAILABLE
        try:
            view = read_gates_offline(backend, args.account, settings)
        except GateReadFailed as error:
            print(f"sandbox-provisioner status: {error}", file=sys.stderr)
            return EXIT_UNAVAILABLE if error.failure.retryable else EXIT_USAGE
        if args.watch and not args.json:
            return _watch(backend, args.account, settings, args.interval, console)
        if args.json:
            console.print_json(json.dumps(view))
        else:
            console.print(render(view, args.account))
        return EXIT_OK
    finally:
        backend.close()


def _missing_storage(uri: str) -> str | None:
    """Why `uri` names no storage status could read, without creating anything; None when
    it may exist (a Redis URL is asked when read)."""
    if uri.startswith("memory:"):
        return "memory:// storage lives inside one process: give serve's --storage URL"
    if uri.startswith("sqlite:"):
        path = Path(SqliteBackend.path_of(uri))
        if not path.is_file():
            return (
                f"no storage at {path}: status never creates one; give the --storage URL "
                "that serve uses"
            )
    return None


def _setting(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--config wants KEY=VALUE, got {item!r}")
    return key.strip(), value.strip()


def _watch(
    backend: StorageBackend,
    account: str,
    settings: dict[str, str],
    interval: float,
    console: Console,
) -> int:
    def frame() -> RenderableType:
        try:
            return render(read_gates_offline(backend, account, settings), account)
        except GateReadFailed as error:  # keep watching: the backend recovers by itself
            return _unavailable(error)

    try:
        if not console.is_terminal:
            # No terminal (a pipe, a log file): a live view would print nothing until the
            # end, so print one timestamped snapshot per interval instead.
            while True:
                stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
                console.print(Text(f"--- {stamp}", style="bold"))
                console.print(frame())
                console.file.flush()
                time.sleep(max(0.1, interval))
        with Live(frame(), console=console, refresh_per_second=4, transient=False) as live:
            while True:
                time.sleep(max(0.1, interval))
                live.update(frame())
    except KeyboardInterrupt:
        return EXIT_OK
