"""`serve`'s pace flags: the hold window, the bound on held requests, and push wake-ups
(docs/pace.md). The Temper API URL is the runtime's `--temper-api-url`."""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from collections.abc import Callable

from host.cli.options import add_value_option
from host.serve.pace import PaceSettings
from host.serve.pacing import OffsetClock, ServePace
from host.serve.wakeups import DEFAULT_WAKE_ACTION, WakeTarget, WakeupSender, WakeupStore
from host.storage.base import StorageBackend

TEMPER_TOKEN_ENV = "SANDBOX_PROVISIONER_TEMPER_TOKEN"
_DEFAULTS = PaceSettings()


def add_pace_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hold-ms",
        type=int,
        default=_DEFAULTS.hold_ms,
        metavar="MS",
        help="hold a queued invocation up to this long and ask the component again at its "
        f"turn (default {_DEFAULTS.hold_ms}; 0: off; an integration config's hold_ms wins; "
        "always below the trigger's timeout_secs)",
    )
    add_value_option(
        parser,
        "--max-held",
        int,
        _DEFAULTS.max_held,
        "invocations held at once; past it they are answered at once",
        "N",
    )
    parser.add_argument(
        "--push",
        action="store_true",
        help="wake a queued entity at its turn through Temper's API (needs --temper-api-url "
        f"and a Temper credential: ${TEMPER_TOKEN_ENV})",
    )
    parser.add_argument(
        "--wake-action",
        default=DEFAULT_WAKE_ACTION,
        metavar="ACTION",
        help=f"the spec's action a wake-up dispatches (default {DEFAULT_WAKE_ACTION})",
    )
    parser.add_argument(
        "--entity-set",
        action="append",
        default=[],
        metavar="TYPE=SET",
        help="the entity set of an entity type in Temper's API (repeatable; default: the "
        "type's name plus 's', as Temper's CSDL names it)",
    )


def parse_entity_sets(pairs: list[str]) -> dict[str, str]:
    sets: dict[str, str] = {}
    for pair in pairs:
        entity_type, sep, entity_set = pair.partition("=")
        if not sep or not entity_type.strip() or not entity_set.strip():
            raise ValueError(f"--entity-set wants TYPE=SET, got {pair!r}")
        sets[entity_type.strip()] = entity_set.strip()
    return sets


def env_credential(tenant: str) -> str | None:
    """The single-tenant set-up: one Temper credential for every tenant."""
    return os.environ.get(TEMPER_TOKEN_ENV) or None


def pace_from_args(
    args: argparse.Namespace,
    storage: StorageBackend,
    *,
    workers: int,
    credential: Callable[[str], str | None] = env_credential,
) -> ServePace:
    if args.hold_ms < 0 or args.max_held < 0:
        raise ValueError("--hold-ms and --max-held must be 0 or more")
    settings = PaceSettings(hold_ms=args.hold_ms, max_held=args.max_held, push=args.push)
    pace = ServePace(settings, OffsetClock(storage.now_ms), wake_count=workers)
    if args.push:
        if not args.temper_api_url:
            raise ValueError("--push needs --temper-api-url")
        target = WakeTarget(
            args.temper_api_url,
            credential,
            wake_action=args.wake_action,
            entity_sets=parse_entity_sets(args.entity_set),
        )
        pace.wakeups = WakeupStore(storage)
        claimer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        pace.sender = WakeupSender(pace.wakeups, target, claimer=claimer)
    return pace


__all__ = ["TEMPER_TOKEN_ENV", "add_pace_arguments", "env_credential", "pace_from_args"]
