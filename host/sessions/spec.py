"""Temper IOA specs (`*.ioa.toml`) in the newest syntax: the subset the session executor runs.

The reader mirrors Temper's own (`crates/temper-spec/src/automaton/toml_parser/mod.rs` and the
types in `crates/temper-spec/src/automaton/types.rs`, `types/action.rs`, `types/state.rs`,
`types/trigger.rs` of `nerdsane/temper`): every section and key is checked the way
`serde(deny_unknown_fields)` checks it, retired spellings get Temper's hint, and a key Temper
accepts but this executor does not run is refused with its own message, so a spec never runs
here with a part silently ignored. Only `[[invariant]]` and `[[liveness]]` are read and then
left aside: they are verification-only and change nothing at run time.

What the executor runs: `[automaton]`, `[[state]]`, `[[action]]` with `from`/`to`/`params`,
effect statements (`"turns += 1"`, `"flag = true"`, `"field = params.x"`) and
`[[action.triggers]]` of `kind = "wasm"`, `[[state_timeout]]` and `[admission]`.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

TEMPER = "nerdsane/temper"


class SpecError(ValueError):
    """A spec this executor cannot run; the message names the entry and the key."""


# -- the data model ------------------------------------------------------------------------


@dataclass(frozen=True)
class StateVar:
    name: str
    type: str  # string, bool, counter, int, list
    initial: Any


@dataclass(frozen=True)
class Effect:
    """One effect statement: `var op value`, op one of `=`, `+=`, `-=`; value a literal
    (`int`, `bool`, `str`) or a reference (`params.x`, or a state variable's name)."""

    var: str
    op: str
    literal: Any = None
    param: str | None = None
    field_ref: str | None = None
    text: str = ""


@dataclass(frozen=True)
class Trigger:
    """An `[[action.triggers]]` block of kind `wasm`."""

    name: str
    module: str
    on_success: str | None = None
    on_failure: str | None = None
    config: tuple[tuple[str, str], ...] = ()
    # `[[action.triggers.failure_routes]]`: failure category -> callback action (ADR-0187).
    failure_routes: tuple[tuple[str, str], ...] = ()

    def config_value(self, key: str) -> str | None:
        return dict(self.config).get(key)


@dataclass(frozen=True)
class Action:
    name: str
    kind: str = "internal"
    sources: tuple[str, ...] = ()  # `from`
    to: str | None = None
    params: tuple[str, ...] = ()
    effects: tuple[Effect, ...] = ()
    triggers: tuple[Trigger, ...] = ()
    hint: str | None = None
    param_types: tuple[str, ...] = ()  # per param: its declared type, "string" by default

    def enabled_in(self, state: str) -> bool:
        """Temper: an input (or composite) action with no `from` fires from every state
        (`types/action.rs`, `ActionKind::enabled_everywhere`)."""
        if not self.sources:
            return self.kind in ("input", "composite")
        return state in self.sources

    def target(self, state: str) -> str:
        return self.to if self.to is not None else state


@dataclass(frozen=True)
class Arg:
    """A `[[state_timeout]] args` value: a literal, or a state variable (`Id`: the entity)."""

    literal: Any = None
    var: str | None = None


@dataclass(frozen=True)
class StateTimeout:
    state: str
    after_seconds: int
    on_timeout: str
    max_occurrences: int = 1
    reset_on: tuple[str, ...] = ()
    args: tuple[tuple[str, Arg], ...] = ()


@dataclass(frozen=True)
class Admission:
    max_concurrent_creates: int | None = None
    max_concurrent_actions: tuple[tuple[str, int], ...] = ()
    queue_depth: int | None = None
    queue_timeout_seconds: int | None = None

    def cap_for(self, action: str) -> int | None:
        if action == "Create":
            return self.max_concurrent_creates
        return dict(self.max_concurrent_actions).get(action)

    @property
    def queue_timeout_s(self) -> float:
        # DEFAULT_QUEUE_TIMEOUT_SECS in crates/temper-server/src/state/admission.rs.
        return float(30 if self.queue_timeout_seconds is None else self.queue_timeout_seconds)


@dataclass(frozen=True)
class Spec:
    name: str
    states: tuple[str, ...]
    initial: str
    state_vars: tuple[StateVar, ...] = ()
    actions: tuple[Action, ...] = ()
    timeouts: tuple[StateTimeout, ...] = ()
    admission: Admission | None = None
    allow_indefinite_states: tuple[str, ...] = ()
    terminal: tuple[str, ...] = ()
    source: str = "<spec>"
    _by_name: dict[str, Action] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name.update({action.name: action for action in self.actions})

    def action(self, name: str) -> Action | None:
        return self._by_name.get(name)

    def timeouts_of(self, state: str) -> list[StateTimeout]:
        return [timeout for timeout in self.timeouts if timeout.state == state]

    def triggers(self) -> Iterable[tuple[Action, Trigger]]:
        for action in self.actions:
            for trigger in action.triggers:
                yield action, trigger

    def initial_fields(self) -> dict[str, Any]:
        return {var.name: _copy(var.initial) for var in self.state_vars}


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


# -- reading -------------------------------------------------------------------------------

# The sections Temper's reader accepts (`SECTIONS` in toml_parser/mod.rs).
TEMPER_SECTIONS = (
    "automaton",
    "state",
    "action",
    "invariant",
    "liveness",
    "webhook",
    "context_entity",
    "field_invariant",
    "state_timeout",
    "key",
    "vector",
    "admission",
)
# Read here and set aside: verification-only, no run-time effect.
VERIFICATION_ONLY = ("invariant", "liveness")
RUN = ("automaton", "state", "action", "state_timeout", "admission")

AUTOMATON_KEYS = (
    "name",
    "states",
    "initial",
    "allow_indefinite_states",
    "strict_action_params",
    "terminal",
)
STATE_KEYS = (
    "name",
    "type",
    "initial",
    "overflow_inline_max_bytes",
    "overflow_ttl_seconds",
    "query_indexed",
)
STATE_RUN_KEYS = ("name", "type", "initial")
VAR_TYPES = ("string", "bool", "counter", "int", "list")
# A typed failure route's callback declares exactly this one parameter
# (`validate_callback_signature`, crates/temper-spec/src/automaton/failure_routes.rs).
FAILURE_PARAM = ("failure", "failure_v1")
FAILURE_CATEGORIES = ("transient", "integrity", "authorization", "budget", "ambiguous",
                      "permanent")
FAILURE_ROUTE_KEYS = ("category", "action", "to_state")
ACTION_KEYS = ("name", "kind", "from", "to", "guard", "effect", "params", "constraints", "hint",
               "record_parent_event", "triggers", "cedar_gate", "sub_writes")
ACTION_RUN_KEYS = ("name", "kind", "from", "to", "effect", "params", "hint", "triggers")
ACTION_KINDS = ("input", "internal", "output", "composite")
TRIGGER_KEYS = ("name", "kind", "principal", "guard", "liveness", "drop_ok", "llm",
                "target_entity", "target_action", "args", "resolve_target", "module",
                "on_success", "on_failure", "config", "adapter", "url", "method", "headers",
                "body_template", "hook", "failure_routes")
TRIGGER_KINDS = ("entity", "wasm", "adapter", "webhook", "hook")
# What each key's kind is (`ActionTrigger::foreign_keys` in types/trigger.rs).
TRIGGER_KEY_KINDS: dict[str, tuple[str, ...]] = {
    "principal": ("entity",), "guard": ("entity",), "liveness": ("entity",),
    "drop_ok": ("entity",), "llm": ("wasm", "adapter"), "target_entity": ("entity",),
    "target_action": ("entity",), "args": ("entity",), "resolve_target": ("entity",),
    "module": ("wasm",), "on_success": ("wasm", "adapter", "webhook"),
    "on_failure": ("wasm", "adapter", "webhook"), "config": ("wasm", "adapter", "webhook"),
    "failure_routes": ("wasm", "adapter", "webhook"),
    "adapter": ("adapter",), "url": ("webhook",), "method": ("webhook",),
    "headers": ("webhook",), "body_template": ("webhook",), "hook": ("hook",),
}
TRIGGER_RETIRED = {
    "to_state": "write the status into the guard, such as guard = \"status == 'Ready'\"",
    "params": "write the values in `args`, string literals in single quotes",
    "params_from": 'write the field names in `args`: args = { doc_id = "Id" }',
    "adapter_type": "write `adapter`",
}
TIMEOUT_KEYS = ("state", "after_seconds", "on_timeout", "max_occurrences", "reset_on", "args")
TIMEOUT_RETIRED = {"params": "write `args`, with string literals in single quotes"}
ADMISSION_KEYS = (
    "max_concurrent_creates",
    "max_concurrent_actions",
    "queue_depth",
    "queue_timeout_seconds",
)
MIGRATE_HINT = "convert the spec with `temper migrate-predicates`"


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SpecError(f"{path}: {error.strerror or error}") from error
    return parse_spec(text, source=str(path))


def packaged_spec(name: str) -> Spec:
    """A spec shipped with the package (`host/sessions/specs/NAME`), found without the
    checkout: `temper_agent.ioa.toml`, `curation_job.ioa.toml`,
    `temper_agent_upstream.ioa.toml`, `llm_gated_agent.ioa.toml`."""
    resource = resources.files("host.sessions").joinpath("specs", name)
    if not resource.is_file():
        raise SpecError(f"no packaged spec named {name!r}")
    return parse_spec(resource.read_text(encoding="utf-8"), source=f"host/sessions/specs/{name}")


def parse_spec(text: str, *, source: str = "<spec>") -> Spec:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"{source}: not TOML: {error}") from error
    return _read(doc, source)


def _read(doc: dict[str, Any], source: str) -> Spec:
    fail = _Failer(source)
    if "integration" in doc:
        raise fail(
            "[[integration]] is no longer supported: declare the call as an "
            "[[action.triggers]] block on the action that fires it "
            f"({MIGRATE_HINT}; Temper: toml_parser/mod.rs)"
        )
    for section in doc:
        if section not in TEMPER_SECTIONS:
            raise fail(f"unknown section '{section}' (a spec has {', '.join(TEMPER_SECTIONS)})")
        if section not in RUN and section not in VERIFICATION_ONLY:
            raise fail(f"[{section}] is valid Temper but this executor does not run it")
    meta = doc.get("automaton")
    if not isinstance(meta, dict):
        raise fail("missing [automaton]")
    _keys(fail, "[automaton]", meta, AUTOMATON_KEYS, ("name", "states", "initial"))
    if meta.get("strict_action_params"):
        raise fail("[automaton]: strict_action_params is not run by this executor")
    states = _str_list(fail, "[automaton] states", meta["states"])
    name = _str(fail, "[automaton] name", meta["name"])
    initial = _str(fail, "[automaton] initial", meta["initial"])
    state_vars = tuple(_state_var(fail, entry) for entry in _entries(fail, doc, "state"))
    actions = tuple(_action(fail, entry) for entry in _entries(fail, doc, "action"))
    timeouts = tuple(
        _timeout(fail, entry, index)
        for index, entry in enumerate(_entries(fail, doc, "state_timeout"))
    )
    admission = _admission(fail, doc["admission"]) if "admission" in doc else None
    spec = Spec(
        name=name,
        states=tuple(states),
        initial=initial,
        state_vars=state_vars,
        actions=actions,
        timeouts=timeouts,
        admission=admission,
        allow_indefinite_states=tuple(
            _str_list(
                fail, "[automaton] allow_indefinite_states", meta.get("allow_indefinite_states", [])
            )
        ),
        terminal=tuple(_str_list(fail, "[automaton] terminal", meta.get("terminal", []))),
        source=source,
    )
    _validate(fail, spec)
    return spec


class _Failer:
    def __init__(self, source: str) -> None:
        self.source = source

    def __call__(self, message: str) -> SpecError:
        return SpecError(f"{self.source}: {message}")


def _keys(
    fail: _Failer,
    scope: str,
    table: Mapping[str, Any],
    known: Iterable[str],
    required: Iterable[str] = (),
    run: Iterable[str] | None = None,
    retired: Mapping[str, str] | None = None,
) -> None:
    known = tuple(known)
    for key in table:
        if retired and key in retired:
            raise fail(f"{scope}: `{key}` is no longer a key; {retired[key]}")
        if key not in known:
            raise fail(
                f"{scope}: unknown key `{key}` (Temper rejects it: deny_unknown_fields; "
                f"expected one of {', '.join(known)})"
            )
        if run is not None and key not in run:
            raise fail(f"{scope}: `{key}` is valid Temper but this executor does not run it")
    for key in required:
        if key not in table:
            raise fail(f"{scope}: missing `{key}`")


def _entries(fail: _Failer, doc: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise fail(f"'{key}' must be written as [[{key}]]")
    return value


def _str(fail: _Failer, scope: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise fail(f"{scope}: expected a non-empty string, found {value!r}")
    return value


def _str_list(fail: _Failer, scope: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise fail(f"{scope}: expected a list of strings, found {value!r}")
    return list(value)


def _uint(fail: _Failer, scope: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise fail(f"{scope}: expected a non-negative integer, found {value!r}")
    return value


def _state_var(fail: _Failer, entry: dict[str, Any]) -> StateVar:
    scope = f"state '{entry.get('name', '?')}'"
    _keys(fail, scope, entry, STATE_KEYS, ("name", "type", "initial"), run=STATE_RUN_KEYS)
    name = _str(fail, scope + " name", entry["name"])
    var_type = entry["type"]
    if var_type not in VAR_TYPES:
        raise fail(f"{scope}: type must be one of {', '.join(VAR_TYPES)}, found {var_type!r}")
    initial = entry["initial"]
    # Initial::read in types/state.rs: the starting value in the declared type.
    ok = {
        "string": isinstance(initial, str),
        "bool": isinstance(initial, bool),
        "counter": isinstance(initial, int) and not isinstance(initial, bool) and initial >= 0,
        "int": isinstance(initial, int) and not isinstance(initial, bool),
        "list": isinstance(initial, list) and all(isinstance(i, str) for i in initial),
    }[var_type]
    if not ok:
        example = {"string": '""', "bool": "false", "counter": "0", "int": "0", "list": "[]"}[
            var_type
        ]
        raise fail(
            f"{scope}: initial: a {var_type} starts at a value such as "
            f"`initial = {example}`, found {initial!r}"
        )
    return StateVar(name, var_type, initial)


_EFFECT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(\+=|-=|=)\s*(.+?)\s*$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _effect(fail: _Failer, scope: str, value: Any) -> Effect:
    if isinstance(value, dict):
        raise fail(
            f"{scope}: effect tables ({{ type = ... }}) are the old syntax; write a "
            f'statement such as "turns += 1" ({MIGRATE_HINT})'
        )
    if not isinstance(value, str):
        raise fail(f"{scope}: an effect is a statement string, found {value!r}")
    match = _EFFECT.match(value)
    if match is None:
        raise fail(
            f"{scope}: effect {value!r} is not a statement this executor runs "
            "(`var = value`, `var += n`, `var -= n`)"
        )
    var, op, rhs = match.groups()
    literal = _literal(rhs)
    if literal is not _NOT_LITERAL:
        return Effect(var, op, literal=literal, text=value)
    if rhs.startswith("params.") and _IDENT.match(rhs[7:]):
        return Effect(var, op, param=rhs[7:], text=value)
    if _IDENT.match(rhs):
        return Effect(var, op, field_ref=rhs, text=value)
    raise fail(f"{scope}: effect {value!r}: cannot read {rhs!r}")


_NOT_LITERAL = object()


def _literal(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    if text == "null":
        return None
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1]
    return _NOT_LITERAL


def _action(fail: _Failer, entry: dict[str, Any]) -> Action:
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise fail("action: every [[action]] needs a non-empty `name`")
    scope = f"action '{name}'"
    _keys(fail, scope, entry, ACTION_KEYS, ("name",), run=ACTION_RUN_KEYS)
    kind = entry.get("kind", "internal")
    if kind not in ACTION_KINDS:
        raise fail(f"{scope}: kind must be one of {', '.join(ACTION_KINDS)}, found {kind!r}")
    sources = _str_list(fail, scope + " from", entry.get("from", []))
    to = entry.get("to")
    if to is not None:
        to = _str(fail, scope + " to", to)
    params = []
    param_types = []
    for param in entry.get("params", []):
        if isinstance(param, str):
            params.append(param)
            param_types.append("string")
        elif isinstance(param, dict):
            _keys(fail, scope + " param", param, ("name", "type", "source"), ("name",),
                  run=("name", "type"))
            if param.get("type", "string") not in (*VAR_TYPES, FAILURE_PARAM[1]):
                raise fail(f"{scope}: param type must be one of {', '.join(VAR_TYPES)}")
            params.append(_str(fail, scope + " param name", param["name"]))
            param_types.append(str(param.get("type", "string")))
        else:
            raise fail(
                f"{scope}: a parameter is a name or {{ name = ..., type = ... }}, found {param!r}"
            )
    if len(set(params)) != len(params):
        raise fail(f"{scope}: a parameter is declared twice")
    effects_raw = entry.get("effect", [])
    if not isinstance(effects_raw, list):
        raise fail(f"{scope}: effect must be a list of statements")
    effects = tuple(_effect(fail, f"{scope} effect", e) for e in effects_raw)
    triggers_raw = entry.get("triggers", [])
    if not isinstance(triggers_raw, list):
        raise fail(f"{scope}: 'triggers' must be written as [[action.triggers]]")
    triggers = tuple(_trigger(fail, scope, t) for t in triggers_raw)
    hint = entry.get("hint")
    return Action(name, kind, tuple(sources), to, tuple(params), effects, triggers,
                  hint if isinstance(hint, str) else None, tuple(param_types))


def _trigger(fail: _Failer, action_scope: str, entry: Any) -> Trigger:
    if not isinstance(entry, dict):
        raise fail(f"{action_scope}: 'triggers' must be written as [[action.triggers]]")
    scope = f"{action_scope} trigger '{entry.get('name', '?')}'"
    _keys(fail, scope, entry, TRIGGER_KEYS, ("name", "kind"), retired=TRIGGER_RETIRED)
    kind = entry["kind"]
    if kind not in TRIGGER_KINDS:
        raise fail(f"{scope}: kind must be one of {', '.join(TRIGGER_KINDS)}, found {kind!r}")
    foreign = [
        key for key in entry if key in TRIGGER_KEY_KINDS and kind not in TRIGGER_KEY_KINDS[key]
    ]
    if foreign:
        raise fail(f"{scope}: {', '.join(foreign)} do not belong to kind = {kind!r}")
    if kind != "wasm":
        raise fail(f"{scope}: kind = {kind!r} is valid Temper but this executor runs only wasm")
    if entry.get("llm"):
        raise fail(f"{scope}: llm is not run by this executor")
    module = _str(fail, scope + " module", entry.get("module"))
    config = entry.get("config", {})
    if not isinstance(config, dict) or not all(isinstance(v, str) for v in config.values()):
        raise fail(f"{scope}: config is a table of strings (Temper: BTreeMap<String, String>)")
    on_success = entry.get("on_success")
    on_failure = entry.get("on_failure")
    routes = _failure_routes(fail, scope, entry.get("failure_routes", []))
    if routes and on_failure is not None:
        raise fail(f"{scope}: cannot mix typed failure_routes with legacy on_failure "
                   "(Temper: crates/temper-spec/src/automaton/failure_routes.rs)")
    return Trigger(
        name=_str(fail, scope + " name", entry["name"]),
        module=module,
        on_success=None if on_success is None else _str(fail, scope + " on_success", on_success),
        on_failure=None if on_failure is None else _str(fail, scope + " on_failure", on_failure),
        config=tuple(sorted(config.items())),
        failure_routes=routes,
    )


def _failure_routes(fail: _Failer, scope: str, raw: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list):
        raise fail(f"{scope}: write failure routes as [[action.triggers.failure_routes]]")
    routes: dict[str, str] = {}
    for entry in raw:
        if not isinstance(entry, dict):
            raise fail(f"{scope}: write failure routes as [[action.triggers.failure_routes]]")
        _keys(fail, scope + " failure route", entry, FAILURE_ROUTE_KEYS, ("category",))
        category = entry["category"]
        if category not in FAILURE_CATEGORIES:
            raise fail(f"{scope}: failure category must be one of "
                       f"{', '.join(FAILURE_CATEGORIES)}, found {category!r}")
        if category in routes:
            raise fail(f"{scope}: failure category {category!r} is routed more than once")
        if "to_state" in entry:
            raise fail(f"{scope}: this executor reads a route's `action`, not `to_state`")
        routes[category] = _str(fail, f"{scope} failure route {category} action",
                                entry.get("action"))
    return tuple(routes.items())


def _timeout(fail: _Failer, entry: dict[str, Any], index: int) -> StateTimeout:
    scope = f"state_timeout #{index + 1} ('{entry.get('state', '?')}')"
    _keys(
        fail,
        scope,
        entry,
        TIMEOUT_KEYS,
        ("state", "after_seconds", "on_timeout"),
        retired=TIMEOUT_RETIRED,
    )
    args: list[tuple[str, Arg]] = []
    raw_args = entry.get("args", {})
    if not isinstance(raw_args, dict):
        raise fail(f"{scope}: args is a table")
    for key, value in sorted(raw_args.items()):
        if isinstance(value, bool | int):
            args.append((key, Arg(literal=value)))
        elif isinstance(value, str):
            literal = _literal(value)
            if literal is not _NOT_LITERAL:
                args.append((key, Arg(literal=literal)))
            elif _IDENT.match(value):
                args.append((key, Arg(var=value)))
            else:
                raise fail(
                    f"{scope}: args.{key}: a literal ('text', an integer, true, false, "
                    f"null) or a state variable, found {value!r}"
                )
        else:
            raise fail(f"{scope}: args.{key}: unsupported value {value!r}")
    max_occurrences = _uint(fail, scope + " max_occurrences", entry.get("max_occurrences", 1))
    return StateTimeout(
        state=_str(fail, scope + " state", entry["state"]),
        after_seconds=_uint(fail, scope + " after_seconds", entry["after_seconds"]),
        on_timeout=_str(fail, scope + " on_timeout", entry["on_timeout"]),
        max_occurrences=max_occurrences,
        reset_on=tuple(_str_list(fail, scope + " reset_on", entry.get("reset_on", []))),
        args=tuple(args),
    )


def _admission(fail: _Failer, table: Any) -> Admission:
    if not isinstance(table, dict):
        raise fail("'admission' must be written as [admission]")
    _keys(fail, "[admission]", table, ADMISSION_KEYS)
    caps = table.get("max_concurrent_actions", {})
    if not isinstance(caps, dict):
        raise fail("[admission] max_concurrent_actions is a table of action = N")
    creates = table.get("max_concurrent_creates")
    depth = table.get("queue_depth")
    timeout = table.get("queue_timeout_seconds")
    return Admission(
        max_concurrent_creates=None
        if creates is None
        else _uint(fail, "[admission] max_concurrent_creates", creates),
        max_concurrent_actions=tuple(
            sorted(
                (k, _uint(fail, f"[admission] max_concurrent_actions.{k}", v))
                for k, v in caps.items()
            )
        ),
        queue_depth=None if depth is None else _uint(fail, "[admission] queue_depth", depth),
        queue_timeout_seconds=None
        if timeout is None
        else _uint(fail, "[admission] queue_timeout_seconds", timeout),
    )


def _validate_routes(fail: _Failer, spec: Spec, action: Action, trigger: Trigger) -> None:
    """Temper's checks of a typed route (`crates/temper-spec/src/automaton/failure_routes.rs`):
    the callback exists, is not the source action, is enabled in the state the source action
    commits to, and declares exactly `params = [{ name = "failure", type = "failure_v1" }]`."""
    scope = f"action '{action.name}' trigger '{trigger.name}'"
    for category, name in trigger.failure_routes:
        callback = spec.action(name)
        if callback is None:
            raise fail(f"{scope}: failure route {category!r}: {name!r} is not a declared action")
        if name == action.name:
            raise fail(f"{scope}: failure route {category!r} cannot replay source action")
        if action.to is None or action.to not in callback.sources:
            raise fail(f"{scope}: failure route {category!r} targets {name!r}, which is not "
                       f"enabled in the committed state {action.to!r}")
        if callback.params != (FAILURE_PARAM[0],) or callback.param_types != (FAILURE_PARAM[1],):
            raise fail(f"{scope}: failure route {category!r} targets {name!r}, which must "
                       'declare exactly params = [{ name = "failure", type = "failure_v1" }]')


def _validate(fail: _Failer, spec: Spec) -> None:
    states = set(spec.states)
    if len(states) != len(spec.states):
        raise fail("[automaton] states: a state is listed twice")
    if spec.initial not in states:
        raise fail(f"[automaton] initial {spec.initial!r} is not a declared state")
    for name in (*spec.allow_indefinite_states, *spec.terminal):
        if name not in states:
            raise fail(f"[automaton]: {name!r} is not a declared state")
    names = [action.name for action in spec.actions]
    if len(set(names)) != len(names):
        raise fail("an action name is declared twice")
    variables = {var.name for var in spec.state_vars}
    for action in spec.actions:
        for state in (*action.sources, *([action.to] if action.to else [])):
            if state not in states:
                raise fail(f"action '{action.name}': {state!r} is not a declared state")
        for effect in action.effects:
            if effect.var not in variables:
                raise fail(
                    f"action '{action.name}' effect {effect.text!r}: "
                    f"'{effect.var}' is not a declared [[state]]"
                )
            if effect.param is not None and effect.param not in action.params:
                raise fail(
                    f"action '{action.name}' effect {effect.text!r}: params."
                    f"{effect.param} is not a declared parameter of the action"
                )
        for trigger in action.triggers:
            for target in (trigger.on_success, trigger.on_failure):
                if target is not None and spec.action(target) is None:
                    raise fail(f"action '{action.name}' trigger '{trigger.name}': "
                               f"{target!r} is not a declared action")
            _validate_routes(fail, spec, action, trigger)
    for timeout in spec.timeouts:
        scope = f"state_timeout on '{timeout.state}'"
        if timeout.state not in states:
            raise fail(f"{scope}: not a declared state")
        if spec.action(timeout.on_timeout) is None:
            raise fail(f"{scope}: on_timeout {timeout.on_timeout!r} is not a declared action")
        for name in timeout.reset_on:
            if spec.action(name) is None:
                raise fail(f"{scope}: reset_on {name!r} is not a declared action")
        for key, arg in timeout.args:
            if arg.var is not None and arg.var not in (*variables, "Id", "id"):
                raise fail(f"{scope}: args.{key} reads {arg.var!r}, not a declared [[state]]")
    if spec.admission is not None:
        for name, _cap in spec.admission.max_concurrent_actions:
            if spec.action(name) is None:
                raise fail(f"[admission]: {name!r} is not a declared action")
