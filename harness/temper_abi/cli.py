"""`sandbox-provisioner temper-invoke`: run a core module (such as dist/temper_shim.wasm)
under this project's Temper-ABI host the way Temper's engine runs a WASM trigger, and print
the result Temper would decode.

The context is a `WasmInvocationContext` JSON file (or `-` for stdin); `--spec FILE
--action NAME` takes the integration config from that action's wasm trigger instead, as
Temper would, and `--secret NAME=VALUE` / `--secret-env NAME=VAR` stand in for the tenant's
vault (`{secret:NAME}` templates). Exit 0 when the module produced a result (a success or a
failure Temper decodes, such as a typed failure), 1 when Temper would raise an engine error
instead (a trap, an exhausted budget, a result it cannot decode), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from harness.simulator.spec import Spec, SpecError, load_spec
from harness.temper_abi.context import resolve_secret_templates
from harness.temper_abi.dispatch import Trigger, dispatch_for
from harness.temper_abi.host import TemperAbiModule
from host.cli.options import ExitCode, fail

COMMAND = "sandbox-provisioner temper-invoke"
DEFAULT_MODULE = Path("dist/temper_shim.wasm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "context",
        nargs="?",
        default=None,
        help="WasmInvocationContext JSON file, or - for stdin (default: none, built from "
        "--spec, --action, --tenant and --entity-id)",
    )
    parser.add_argument(
        "--module",
        type=Path,
        default=DEFAULT_MODULE,
        help=f"the core module to run (default {DEFAULT_MODULE})",
    )
    parser.add_argument("--spec", type=Path, default=None, help="an .ioa.toml spec")
    parser.add_argument(
        "--action",
        default=None,
        help="with --spec: the action whose wasm trigger's config is used (its first one, "
        "or --trigger)",
    )
    parser.add_argument("--trigger", default=None, help="with --spec: the trigger's name")
    parser.add_argument("--tenant", default=None, help="the context's tenant (default: default)")
    parser.add_argument("--entity-id", default=None, help="the context's entity_id")
    parser.add_argument(
        "--field",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an entity state field in the context's entity_state.fields (repeatable)",
    )
    parser.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a tenant secret for {secret:NAME} templates (repeatable)",
    )
    parser.add_argument(
        "--secret-env",
        action="append",
        default=[],
        metavar="NAME=VAR",
        help="a tenant secret read from environment variable VAR (repeatable)",
    )


class UsageError(ValueError):
    pass


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"{flag} wants NAME=VALUE, got {item!r}")
        pairs[name] = value
    return pairs


def secrets_from(args: argparse.Namespace) -> dict[str, str]:
    secrets = _pairs(args.secret, "--secret")
    for name, var in _pairs(args.secret_env, "--secret-env").items():
        if var not in os.environ:
            raise UsageError(f"--secret-env {name}={var}: ${var} is not set")
        secrets[name] = os.environ[var]
    return secrets


def spec_trigger(spec: Spec, action_name: str, trigger_name: str | None) -> tuple[Any, Any]:
    action = spec.action(action_name)
    if action is None:
        raise UsageError(f"{spec.source} has no action {action_name!r}")
    for trigger in action.triggers:
        if trigger_name is None or trigger.name == trigger_name:
            return action, trigger
    raise UsageError(f"action {action_name!r} has no wasm trigger {trigger_name or ''}".rstrip())


def build_context(args: argparse.Namespace) -> tuple[dict[str, Any], Trigger | None]:
    context: dict[str, Any] = {}
    if args.context is not None:
        try:
            text = sys.stdin.read() if args.context == "-" else Path(args.context).read_text()
            loaded = json.loads(text)
        except OSError as error:
            raise UsageError(f"cannot read {args.context}: {error.strerror}") from None
        except ValueError as error:
            raise UsageError(f"{args.context} is not JSON: {error}") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"{args.context} is not a JSON object")
        context = loaded
    trigger = None
    if args.spec is not None:
        if args.action is None:
            raise UsageError("--spec needs --action")
        try:
            spec = load_spec(args.spec)
        except (OSError, SpecError) as error:
            raise UsageError(str(error)) from None
        action, found = spec_trigger(spec, args.action, args.trigger)
        context["integration_config"] = dict(found.config)
        context.setdefault("trigger_action", action.name)
        context.setdefault("entity_type", spec.name)
        context.setdefault("wasm_module", found.module)
        trigger = Trigger(
            found.name, found.on_success, found.on_failure, dict(found.failure_routes) or None
        )
    elif args.action is not None:
        raise UsageError("--action needs --spec")
    if args.tenant is not None:
        context["tenant"] = args.tenant
    context.setdefault("tenant", "default")
    if args.entity_id is not None:
        context["entity_id"] = args.entity_id
    if "entity_id" not in context:
        raise UsageError("the context names no entity_id: pass --entity-id")
    context.setdefault("trigger_params", {})
    context.setdefault("entity_state", {})
    fields = _pairs(args.field, "--field")
    if fields:
        state = context["entity_state"] if isinstance(context["entity_state"], dict) else {}
        state.setdefault("status", context.get("trigger_action", ""))
        state["fields"] = {**(state.get("fields") or {}), **fields}
        context["entity_state"] = state
    config = context.get("integration_config") or {}
    if not isinstance(config, dict) or not all(isinstance(v, str) for v in config.values()):
        raise UsageError("integration_config must map strings to strings")
    context["integration_config"] = resolve_secret_templates(config, secrets_from(args))
    return context, trigger


def run(args: argparse.Namespace) -> int:
    try:
        context, trigger = build_context(args)
        module = TemperAbiModule.load(args.module)
    except (UsageError, ValueError) as error:
        return fail(str(error), COMMAND)
    except OSError as error:
        return fail(f"cannot read {args.module}: {error.strerror}", COMMAND)
    with module:
        try:
            outcome = module.invoke(context)
        except ValueError as error:  # not a WasmInvocationContext
            return fail(str(error), COMMAND)
    for level, message in outcome.logs:
        print(f"{COMMAND}: module log [{level}] {message}", file=sys.stderr)
    if outcome.result is None:
        print(
            f"{COMMAND}: Temper would raise {outcome.error_kind}: {outcome.error}", file=sys.stderr
        )
        return ExitCode.FAILED
    print(json.dumps(json.loads(outcome.result_json or "null"), indent=2, sort_keys=True))
    if trigger is not None:
        routed = dispatch_for(trigger, outcome.result)
        said = routed.action if routed.action is not None else f"nothing ({routed.error})"
        print(f"{COMMAND}: Temper dispatches {said}", file=sys.stderr)
    return ExitCode.OK


__all__ = ["add_arguments", "run"]
