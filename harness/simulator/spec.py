"""Temper IOA specs (`*.ioa.toml`) in the newest syntax: the subset the session executor runs.

The schema mirrors Temper's reader (`crates/temper-spec/src/automaton/toml_parser/mod.rs` and
`types/{action,state,trigger}.rs` of `nerdsane/temper`): every table forbids unknown keys as
`serde(deny_unknown_fields)` does, retired spellings get Temper's hint, and a key Temper
accepts but this executor does not run is refused with its own message, so a spec never runs
here with a part silently ignored. `[[invariant]]` and `[[liveness]]` are read and left aside:
they are verification-only.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

TEMPER = "nerdsane/temper"


class SpecError(ValueError):
    """A spec this executor cannot run; the message names the entry and the key."""


Name = Annotated[str, Field(min_length=1)]
Count = Annotated[int, Strict(), Field(ge=0)]
VarType = Literal["string", "bool", "counter", "int", "list"]
FailureCategory = Literal[
    "transient", "integrity", "authorization", "budget", "ambiguous", "permanent"
]
# A typed failure route's callback declares exactly this one parameter
# (`validate_callback_signature`, crates/temper-spec/src/automaton/failure_routes.rs).
FAILURE_PARAM = ("failure", "failure_v1")
MIGRATE_HINT = "convert the spec with `temper migrate-predicates`"
# The sections Temper's reader accepts (`SECTIONS` in toml_parser/mod.rs).
TEMPER_SECTIONS = (
    "automaton", "state", "action", "invariant", "liveness", "webhook", "context_entity",
    "field_invariant", "state_timeout", "key", "vector", "admission",
)  # fmt: skip


class _Table(BaseModel):
    """A TOML table: unknown keys refused; Temper's keys this executor does not run, and
    keys Temper retired, refused with their own message before the schema sees them."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True)
    NOT_RUN: ClassVar[tuple[str, ...]] = ()
    RETIRED: ClassVar[Mapping[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_keys_not_run(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key in cls.RETIRED:
                    raise ValueError(f"`{key}` is no longer a key; {cls.RETIRED[key]}")
                if key in cls.NOT_RUN:
                    raise ValueError(f"`{key}` is valid Temper but this executor does not run it")
        return data


# -- values written as strings -------------------------------------------------------------

_EFFECT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(\+=|-=|=)\s*(.+?)\s*$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
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


class Effect(_Table):
    """One effect statement: `var op value`, op one of `=`, `+=`, `-=`; value a literal
    (`int`, `bool`, `str`) or a reference (`params.x`, or a state variable's name)."""

    var: str
    op: str
    literal: Any = None
    param: str | None = None
    field_ref: str | None = None
    text: str = ""

    @model_validator(mode="before")
    @classmethod
    def _from_statement(cls, value: Any) -> Any:
        if isinstance(value, dict):
            raise ValueError(
                "effect tables ({ type = ... }) are the old syntax; write a statement such "
                f'as "turns += 1" ({MIGRATE_HINT})'
            )
        if not isinstance(value, str):
            raise ValueError(f"an effect is a statement string, found {value!r}")
        match = _EFFECT.match(value)
        if match is None:
            raise ValueError(
                f"effect {value!r} is not a statement this executor runs "
                "(`var = value`, `var += n`, `var -= n`)"
            )
        var, op, rhs = match.groups()
        statement = {"var": var, "op": op, "text": value}
        literal = _literal(rhs)
        if literal is not _NOT_LITERAL:
            return statement | {"literal": literal}
        if rhs.startswith("params.") and _IDENT.match(rhs[7:]):
            return statement | {"param": rhs[7:]}
        if _IDENT.match(rhs):
            return statement | {"field_ref": rhs}
        raise ValueError(f"effect {value!r}: cannot read {rhs!r}")


class Arg(_Table):
    """A `[[state_timeout]] args` value: a literal, or a state variable (`Id`: the entity)."""

    literal: Any = None
    var: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_value(cls, value: Any) -> Any:
        if isinstance(value, bool | int):
            return {"literal": value}
        if isinstance(value, str):
            literal = _literal(value)
            if literal is not _NOT_LITERAL:
                return {"literal": literal}
            if _IDENT.match(value):
                return {"var": value}
        raise ValueError(
            "a literal ('text', an integer, true, false, null) or a state variable, "
            f"found {value!r}"
        )


# -- the tables ----------------------------------------------------------------------------


class Automaton(_Table):
    name: Name
    states: tuple[Name, ...]
    initial: Name
    allow_indefinite_states: tuple[Name, ...] = ()
    terminal: tuple[Name, ...] = ()
    strict_action_params: Annotated[bool, Strict()] = False

    @field_validator("strict_action_params")
    @classmethod
    def _strict_params_not_run(cls, strict: bool) -> bool:
        if strict:
            raise ValueError("true is not run by this executor")
        return strict

    @model_validator(mode="after")
    def _states_are_declared(self) -> Self:
        if len(set(self.states)) != len(self.states):
            raise ValueError("states: a state is listed twice")
        if self.initial not in self.states:
            raise ValueError(f"initial {self.initial!r} is not a declared state")
        for name in (*self.allow_indefinite_states, *self.terminal):
            if name not in self.states:
                raise ValueError(f"{name!r} is not a declared state")
        return self


_EXAMPLE_INITIAL = {"string": '""', "bool": "false", "counter": "0", "int": "0", "list": "[]"}


class StateVar(_Table):
    NOT_RUN = ("overflow_inline_max_bytes", "overflow_ttl_seconds", "query_indexed")

    name: Name
    type: VarType
    initial: Any

    @model_validator(mode="after")
    def _initial_has_the_type(self) -> Self:
        # Initial::read in types/state.rs: the starting value in the declared type.
        value = self.initial
        is_int = isinstance(value, int) and not isinstance(value, bool)
        ok = {
            "string": isinstance(value, str),
            "bool": isinstance(value, bool),
            "counter": is_int and value >= 0,
            "int": is_int,
            "list": isinstance(value, list) and all(isinstance(i, str) for i in value),
        }[self.type]
        if not ok:
            raise ValueError(
                f"initial: a {self.type} starts at a value such as "
                f"`initial = {_EXAMPLE_INITIAL[self.type]}`, found {value!r}"
            )
        return self


class Param(_Table):
    """An action parameter: a bare name (a string) or `{ name = ..., type = ... }`."""

    NOT_RUN = ("source",)

    name: Name
    type: VarType | Literal["failure_v1"] = "string"

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class FailureRoute(_Table):
    """`[[action.triggers.failure_routes]]`: failure category -> callback action (ADR-0187)."""

    RETIRED = {"to_state": "this executor reads a route's `action`, not `to_state`"}

    category: FailureCategory
    action: Name


TRIGGER_KINDS = ("entity", "wasm", "adapter", "webhook", "hook")
# What kind of trigger each key belongs to (`ActionTrigger::foreign_keys` in types/trigger.rs).
TRIGGER_KEY_KINDS: dict[str, tuple[str, ...]] = {
    "principal": ("entity",), "guard": ("entity",), "liveness": ("entity",),
    "drop_ok": ("entity",), "llm": ("wasm", "adapter"), "target_entity": ("entity",),
    "target_action": ("entity",), "args": ("entity",), "resolve_target": ("entity",),
    "module": ("wasm",), "on_success": ("wasm", "adapter", "webhook"),
    "on_failure": ("wasm", "adapter", "webhook"), "config": ("wasm", "adapter", "webhook"),
    "failure_routes": ("wasm", "adapter", "webhook"),
    "adapter": ("adapter",), "url": ("webhook",), "method": ("webhook",),
    "headers": ("webhook",), "body_template": ("webhook",), "hook": ("hook",),
}  # fmt: skip


class Trigger(_Table):
    """An `[[action.triggers]]` block of kind `wasm`."""

    RETIRED = {
        "to_state": "write the status into the guard, such as guard = \"status == 'Ready'\"",
        "params": "write the values in `args`, string literals in single quotes",
        "params_from": 'write the field names in `args`: args = { doc_id = "Id" }',
        "adapter_type": "write `adapter`",
    }

    name: Name
    kind: Literal["wasm"]
    module: Name
    on_success: Name | None = None
    on_failure: Name | None = None
    # Temper: BTreeMap<String, String>.
    config_table: dict[str, str] = Field(default_factory=dict, alias="config")
    routes: tuple[FailureRoute, ...] = Field(default=(), alias="failure_routes")

    @model_validator(mode="before")
    @classmethod
    def _only_wasm_runs(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        kind = data.get("kind")
        if kind not in TRIGGER_KINDS:
            return data  # the schema names the kinds
        foreign = [k for k in data if kind not in TRIGGER_KEY_KINDS.get(k, (kind,))]
        if foreign:
            raise ValueError(f"{', '.join(foreign)} do not belong to kind = {kind!r}")
        if kind != "wasm":
            raise ValueError(f"kind = {kind!r} is valid Temper but this executor runs only wasm")
        if data.get("llm"):
            raise ValueError("llm is not run by this executor")
        return {key: value for key, value in data.items() if key != "llm"}

    @model_validator(mode="after")
    def _routes_are_temper_routes(self) -> Self:
        categories = [route.category for route in self.routes]
        if self.routes and self.on_failure is not None:
            raise ValueError(
                "cannot mix typed failure_routes with legacy on_failure "
                "(Temper: crates/temper-spec/src/automaton/failure_routes.rs)"
            )
        if len(set(categories)) != len(categories):
            raise ValueError("a failure category is routed more than once")
        return self

    @property
    def config(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(self.config_table.items()))

    @property
    def failure_routes(self) -> tuple[tuple[str, str], ...]:
        return tuple((route.category, route.action) for route in self.routes)

    def config_value(self, key: str) -> str | None:
        return self.config_table.get(key)


class Action(_Table):
    NOT_RUN = ("guard", "constraints", "record_parent_event", "cedar_gate", "sub_writes")

    name: Name
    kind: Literal["input", "internal", "output", "composite"] = "internal"
    sources: tuple[Name, ...] = Field(default=(), alias="from")
    to: Name | None = None
    declared_params: tuple[Param, ...] = Field(default=(), alias="params")
    effects: tuple[Effect, ...] = Field(default=(), alias="effect")
    triggers: tuple[Trigger, ...] = ()
    hint: str | None = None

    @model_validator(mode="after")
    def _params_are_declared(self) -> Self:
        if len(set(self.params)) != len(self.params):
            raise ValueError("a parameter is declared twice")
        for effect in self.effects:
            if effect.param is not None and effect.param not in self.params:
                raise ValueError(
                    f"effect {effect.text!r}: params.{effect.param} is not a declared "
                    "parameter of the action"
                )
        return self

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(param.name for param in self.declared_params)

    @property
    def param_types(self) -> tuple[str, ...]:
        return tuple(param.type for param in self.declared_params)

    def enabled_in(self, state: str) -> bool:
        """Temper: an input (or composite) action with no `from` fires from every state
        (`types/action.rs`, `ActionKind::enabled_everywhere`)."""
        if not self.sources:
            return self.kind in ("input", "composite")
        return state in self.sources

    def target(self, state: str) -> str:
        return self.to if self.to is not None else state


class StateTimeout(_Table):
    RETIRED = {"params": "write `args`, with string literals in single quotes"}

    state: Name
    after_seconds: Count
    on_timeout: Name
    max_occurrences: Count = 1
    reset_on: tuple[Name, ...] = ()
    arg_table: dict[str, Arg] = Field(default_factory=dict, alias="args")

    @property
    def args(self) -> tuple[tuple[str, Arg], ...]:
        return tuple(sorted(self.arg_table.items()))


class Admission(_Table):
    max_concurrent_creates: Count | None = None
    max_concurrent_actions: dict[str, Count] = Field(default_factory=dict)
    queue_depth: Count | None = None
    queue_timeout_seconds: Count | None = None

    def cap_for(self, action: str) -> int | None:
        if action == "Create":
            return self.max_concurrent_creates
        return self.max_concurrent_actions.get(action)

    @property
    def queue_timeout_s(self) -> float:
        # DEFAULT_QUEUE_TIMEOUT_SECS in crates/temper-server/src/state/admission.rs.
        return float(30 if self.queue_timeout_seconds is None else self.queue_timeout_seconds)


class Spec(_Table):
    """A whole spec file. Sections Temper accepts but this executor does not run are refused;
    `[[invariant]]` and `[[liveness]]` are accepted and not read."""

    NOT_RUN = ("webhook", "context_entity", "field_invariant", "key", "vector")

    automaton: Automaton
    state_vars: tuple[StateVar, ...] = Field(default=(), alias="state")
    actions: tuple[Action, ...] = Field(default=(), alias="action")
    timeouts: tuple[StateTimeout, ...] = Field(default=(), alias="state_timeout")
    admission: Admission | None = None
    invariant: Any = None
    liveness: Any = None
    _source: str = PrivateAttr(default="<spec>")
    _by_name: dict[str, Action] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _refuse_sections_not_run(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if "integration" in data:
                raise ValueError(
                    "[[integration]] is no longer supported: declare the call as an "
                    "[[action.triggers]] block on the action that fires it "
                    f"({MIGRATE_HINT}; Temper: toml_parser/mod.rs)"
                )
            for section in data:
                if section in cls.NOT_RUN:
                    raise ValueError(
                        f"[{section}] is valid Temper but this executor does not run it"
                    )
        return data

    @model_validator(mode="after")
    def _names_resolve(self) -> Self:
        names = [action.name for action in self.actions]
        if len(set(names)) != len(names):
            raise ValueError("an action name is declared twice")
        self._by_name.update(zip(names, self.actions, strict=True))
        for action in self.actions:
            _check_action(self, action)
        for timeout in self.timeouts:
            _check_timeout(self, timeout)
        if self.admission is not None:
            for name in self.admission.max_concurrent_actions:
                if self.action(name) is None:
                    raise ValueError(f"[admission]: {name!r} is not a declared action")
        return self

    def model_post_init(self, context: Any) -> None:
        if isinstance(context, dict) and "source" in context:
            self._source = str(context["source"])

    @property
    def source(self) -> str:
        return self._source

    @property
    def name(self) -> str:
        return self.automaton.name

    @property
    def states(self) -> tuple[str, ...]:
        return self.automaton.states

    @property
    def initial(self) -> str:
        return self.automaton.initial

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


# -- what the sections say of each other ----------------------------------------------------


def _check_action(spec: Spec, action: Action) -> None:
    scope = f"action '{action.name}'"
    for state in (*action.sources, *([action.to] if action.to else [])):
        if state not in spec.states:
            raise ValueError(f"{scope}: {state!r} is not a declared state")
    variables = {var.name for var in spec.state_vars}
    for effect in action.effects:
        if effect.var not in variables:
            raise ValueError(
                f"{scope} effect {effect.text!r}: '{effect.var}' is not a declared [[state]]"
            )
    for trigger in action.triggers:
        for target in (trigger.on_success, trigger.on_failure):
            if target is not None and spec.action(target) is None:
                raise ValueError(
                    f"{scope} trigger '{trigger.name}': {target!r} is not a declared action"
                )
        _check_routes(spec, action, trigger)


def _check_routes(spec: Spec, action: Action, trigger: Trigger) -> None:
    """Temper's checks of a typed route (`crates/temper-spec/src/automaton/failure_routes.rs`):
    the callback exists, is not the source action, is enabled in the state the source action
    commits to, and declares exactly `params = [{ name = "failure", type = "failure_v1" }]`."""
    scope = f"action '{action.name}' trigger '{trigger.name}'"
    for category, name in trigger.failure_routes:
        callback = spec.action(name)
        if callback is None:
            raise ValueError(
                f"{scope}: failure route {category!r}: {name!r} is not a declared action"
            )
        if name == action.name:
            raise ValueError(f"{scope}: failure route {category!r} cannot replay source action")
        if action.to is None or action.to not in callback.sources:
            raise ValueError(
                f"{scope}: failure route {category!r} targets {name!r}, which is not "
                f"enabled in the committed state {action.to!r}"
            )
        if callback.params != (FAILURE_PARAM[0],) or callback.param_types != (FAILURE_PARAM[1],):
            raise ValueError(
                f"{scope}: failure route {category!r} targets {name!r}, which must "
                'declare exactly params = [{ name = "failure", type = "failure_v1" }]'
            )


def _check_timeout(spec: Spec, timeout: StateTimeout) -> None:
    scope = f"state_timeout on '{timeout.state}'"
    if timeout.state not in spec.states:
        raise ValueError(f"{scope}: not a declared state")
    # Temper's spec validator refuses both (docs/temper-upstream.md, "max_occurrences").
    if timeout.after_seconds == 0:
        raise ValueError(f"{scope}: after_seconds must be > 0")
    if timeout.max_occurrences == 0:
        raise ValueError(f"{scope}: max_occurrences must be >= 1")
    if spec.action(timeout.on_timeout) is None:
        raise ValueError(f"{scope}: on_timeout {timeout.on_timeout!r} is not a declared action")
    for name in timeout.reset_on:
        if spec.action(name) is None:
            raise ValueError(f"{scope}: reset_on {name!r} is not a declared action")
    variables = {var.name for var in spec.state_vars}
    for key, arg in timeout.args:
        if arg.var is not None and arg.var not in (*variables, "Id", "id"):
            raise ValueError(f"{scope}: args.{key} reads {arg.var!r}, not a declared [[state]]")


# -- reading -------------------------------------------------------------------------------


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SpecError(f"{path}: {error.strerror or error}") from error
    return parse_spec(text, source=str(path))


def _spec_folders() -> tuple[resources.abc.Traversable, ...]:
    # The example specs ship from `examples/` itself (setup.py maps the package
    # `harness.examples` onto it); the harness-only upstream flow lives beside the simulator.
    return resources.files("harness.examples"), resources.files("harness.simulator") / "specs"


def packaged_spec_text(name: str) -> str:
    """The text of a spec shipped with the package, found without the checkout: the examples
    (`temper_agent.ioa.toml`, `curation_job.ioa.toml`, `llm_gated_agent.ioa.toml`) and
    `temper_agent_upstream.ioa.toml`."""
    for folder in _spec_folders():
        resource = folder / name
        if resource.is_file():
            return resource.read_text(encoding="utf-8")
    raise SpecError(f"no packaged spec named {name!r}")


def packaged_spec(name: str) -> Spec:
    """A spec shipped with the package (`packaged_spec_text`), parsed."""
    return parse_spec(packaged_spec_text(name), source=f"packaged spec {name}")


def parse_spec(text: str, *, source: str = "<spec>") -> Spec:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"{source}: not TOML: {error}") from error
    try:
        return Spec.model_validate(doc, context={"source": source})
    except ValidationError as error:
        problems = [_problem(doc, detail) for detail in error.errors(include_url=False)]
        raise SpecError(f"{source}: " + "; ".join(problems)) from None


def _problem(doc: dict[str, Any], detail: Mapping[str, Any]) -> str:
    """One schema error in the spec's own words: where (`action 'Go' triggers 'p'`), what."""
    loc: Sequence[str | int] = detail["loc"]
    kind = detail["type"]
    if kind in ("extra_forbidden", "missing") and loc:
        where, key = _where(doc, loc[:-1]), loc[-1]
        if kind == "missing":
            return f"{where}: missing `{key}`" if where else f"missing [{key}]"
        if not where:
            return f"unknown section '{key}' (a spec has {', '.join(TEMPER_SECTIONS)})"
        return f"{where}: unknown key `{key}` (Temper rejects it: deny_unknown_fields)"
    where = _where(doc, loc)
    prefix = f"{where}: " if where else ""
    if kind == "value_error":
        return prefix + str(detail["ctx"]["error"])
    return f"{prefix}{detail['msg']}, found {detail['input']!r}"


def _where(doc: dict[str, Any], loc: Sequence[str | int]) -> str:
    """`('action', 0, 'triggers', 1)` as `action 'Go' triggers 'p'`: an entry of a list is
    named by its `name` (or its `state`), else by its position."""
    parts: list[str] = []
    node: Any = doc
    in_key = False  # the last part is a key inside an entry: a further key follows a dot
    for item in loc:
        if isinstance(item, int) and parts:
            node = node[item] if isinstance(node, list) and item < len(node) else None
            label = node.get("name", node.get("state")) if isinstance(node, dict) else None
            parts[-1] += f" {label!r}" if isinstance(label, str) else f" #{item + 1}"
            in_key = False
        elif in_key:
            node = node.get(item) if isinstance(node, dict) else None
            parts[-1] += f".{item}"
        else:
            node = node.get(item) if isinstance(node, dict) else None
            parts.append(f"[{item}]" if not parts and isinstance(node, dict) else str(item))
            in_key = len(parts) > 1
    return " ".join(parts)
