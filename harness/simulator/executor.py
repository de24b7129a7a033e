"""Runs entities of a spec the way the Temper runtime does, on any clock.

One executor serves both the real-time driver (`harness/simulator/driver.py`, threads and the wall
clock) and the deterministic simulation (`harness/simulator/detsim.py`, virtual time): each gives
it a `Loop` (a clock, timers, and a way to run an invocation and hear back), and everything
else, the rules below, is the same code. Every rule is Temper's, read from `nerdsane/temper`:

- **Dispatch.** An action fires when the entity's status is in its `from` (an input action
  with no `from` fires anywhere: `types/action.rs`); otherwise it is rejected and nothing
  changes. Only declared params reach the entity's fields
  (`crates/temper-server/src/entity_actor/declared_params.rs`); effects run after.
- **Admission** (`crates/temper-server/src/state/admission.rs`, ADR-0051): a FIFO permit per
  (tenant, entity type, action) is held across the actor ask only, that is the transition
  itself, and released before any trigger runs, so it never bounds what a trigger does.
- **Triggers** run after the transition commits. On a successful result the static
  `on_success` wins over the action the module names
  (`crates/temper-server/src/state/dispatch/wasm/invocation.rs`); on a failed one,
  `on_failure` is dispatched with `{error, error_message, integration}` and nothing else
  (`handle_wasm_failure`); a failure with no `on_failure` changes nothing (ADR-0152: it
  surfaces as an error, it is not a transition).
- **Timers** (`crates/temper-server/src/state/dispatch/state_timeouts/arming.rs`, `tracker.rs`):
  one active timer per entity. Entering a state arms only its first `[[state_timeout]]`;
  leaving it cancels the timer; a self-loop that stays in the state re-arms each declaration
  whose `reset_on` names the action, the last one winning (the tracker replaces the owner);
  any other action leaves the timer alone. Every arm fires once, whatever `max_occurrences`
  says: Temper's timers never read it (`state_timeouts.rs` of the `args` spec format;
  docs/temper-upstream.md). A fired timer dispatches `on_timeout` with its `args`.
  Progress events from a module are broadcast only and never reset a timer
  (`crates/temper-server/src/state/dispatch/wasm/callbacks.rs`).

- **External dispatch** (`ExternalDispatch`, Temper's
  `POST /tdata/{EntitySet}('{id}')/Temper.{Action}`: `build_router` in
  `crates/temper-server/src/router.rs`, `handle_odata_post` in `odata/write.rs`,
  `execute_bound_action` in `odata/bindings/execute.rs`, bearer tokens in `bearer_auth.rs`):
  404 for an entity set or entity the tenant does not have, 401 without a valid credential,
  403 when the credential is another tenant's (Cedar denies), 409 `ActionFailed` when the
  action is not enabled in the entity's state, else the same dispatch as above, triggers
  included, and 200. An `Idempotency-Key` already used for the same action on the entity
  replays 200 without dispatching again.

Nothing here wakes an entity by itself: a queued entity asks again when its spec's timer
fires, or when someone outside dispatches an action on it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from harness.simulator.model import Job, SessionEvent
from harness.simulator.spec import Action, Arg, Spec, StateTimeout, Trigger
from provisioner.failures import FailureCode
from provisioner.model import Failure, Invocation, Outcome, failed

EventSink = Callable[[SessionEvent], None]


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Loop(Protocol):
    """What an executor runs on. Every callback it makes runs on the loop's one thread."""

    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle: ...

    def invoke(
        self, module: str, invocation: Invocation, done: Callable[[Outcome], None]
    ) -> None: ...


def no_such_module(module: str) -> Outcome:
    """What a loop answers an invocation of a module it does not run: a host failure, as
    Temper's runtime reports a module it cannot find."""
    return failed(Failure(FailureCode.HOST_ERROR, f"no module named {module!r}", True))


@dataclass
class Entity:
    """One entity: its status and fields, its one timer, and what the run saw of it."""

    job: Job
    status: str
    fields: dict[str, Any]
    timer: TimerHandle | None = None
    timer_declaration: int | None = None  # index into spec.timeouts
    timer_deadline: float | None = None
    generation: int = 0
    fired: Counter[int] = field(default_factory=Counter)
    in_flight: int = 0
    invocations: int = 0
    # (at, status) each time the status changed, first entry at creation.
    history: list[tuple[float, str]] = field(default_factory=list)
    last_action: str | None = None
    last_source: str | None = None
    rejected: int = 0
    unhandled_failures: int = 0
    # Idempotency-Key -> the action it was used for (external dispatch only).
    idempotency_keys: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Secrets:
    """`{secret:name}` templates Temper resolves from the tenant's vault before an
    invocation; a name with no value is left out of the config."""

    values: Mapping[str, str] = field(default_factory=dict)

    def resolve(self, config: tuple[tuple[str, str], ...]) -> dict[str, str]:
        resolved: dict[str, str] = {}
        for key, value in config:
            if value.startswith("{secret:") and value.endswith("}"):
                name = value[len("{secret:") : -1]
                if name in self.values:
                    resolved[key] = self.values[name]
                continue
            resolved[key] = value
        return resolved


@dataclass(frozen=True)
class ExternalAnswer:
    """What Temper's bound-action endpoint answers: the HTTP status and its OData error
    code ("" on success)."""

    status: int
    code: str = ""
    message: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass(frozen=True)
class ExternalAccess:
    """Who may dispatch from outside: `credentials` maps a bearer token to its tenant (an
    `AgentCredential` is a tenant's); `entity_set` is the spec's entity set name."""

    entity_set: str
    credentials: Mapping[str, str] = field(default_factory=dict)


ConfigHook = Callable[[Trigger, dict[str, str]], dict[str, str]]
TimerScale = Callable[[StateTimeout], float]


def overlay_config(overlay: Mapping[str, str]) -> ConfigHook:
    """A hook laying `overlay` over each trigger's integration config, except that the
    trigger's own `operation` stays: a run's settings (E2B URL, admission) apply to every
    trigger, but which operation a trigger runs is the spec's."""
    pairs = dict(overlay)

    def configure(trigger: Trigger, config: dict[str, str]) -> dict[str, str]:
        merged = {**config, **pairs}
        if "operation" in config:
            merged["operation"] = config["operation"]
        return merged

    return configure


@dataclass
class AdmissionGate:
    """`[admission]` as Temper runs it: a permit per (tenant, action), held across the ask.
    The executor's asks are instantaneous, so a permit is never contended; what matters is
    that it is gone before any trigger starts (`peak_held` shows it)."""

    caps: Callable[[str], int | None]
    held: Counter[tuple[str, str]] = field(default_factory=Counter)
    peak_held: int = 0

    def acquire(self, tenant: str, action: str) -> bool:
        cap = self.caps(action)
        if cap is None:
            return False
        key = (tenant, action)
        if self.held[key] >= cap:
            raise AssertionError("an instantaneous ask found its permit taken")
        self.held[key] += 1
        self.peak_held = max(self.peak_held, self.held[key])
        return True

    def release(self, tenant: str, action: str) -> None:
        self.held[(tenant, action)] -= 1


class Executor:
    def __init__(
        self,
        spec: Spec,
        loop: Loop,
        *,
        run_id: str = "run",
        secrets: Secrets | None = None,
        configure: ConfigHook | None = None,
        timer_seconds: TimerScale | None = None,
        on_event: EventSink | None = None,
        access: ExternalAccess | None = None,
    ) -> None:
        self.spec = spec
        self.access = access or ExternalAccess(entity_set=f"{spec.name}s")
        self.loop = loop
        self.run_id = run_id
        self.secrets = secrets or Secrets()
        self._configure = configure
        self._timer_seconds = timer_seconds or (lambda timeout: float(timeout.after_seconds))
        self._on_event = on_event
        self.entities: dict[str, Entity] = {}
        admission = spec.admission
        self.admission = AdmissionGate(
            caps=(lambda _action: None) if admission is None else admission.cap_for
        )
        self.timer_lag_s = 0.0
        self._listeners: list[Callable[[Entity, str, str, str], None]] = []
        self._settled: list[Callable[[Entity], None]] = []

    # -- entities ------------------------------------------------------------------------

    def create(self, job: Job) -> Entity:
        if job.id in self.entities:
            raise ValueError(f"entity {job.id} exists")
        entity = Entity(job, self.spec.initial, self.spec.initial_fields())
        entity.history.append((self.loop.now(), entity.status))
        self.entities[job.id] = entity
        return entity

    def on_transition(self, listener: Callable[[Entity, str, str, str], None]) -> None:
        """`listener(entity, action, from_status, to_status)` after each transition."""
        self._listeners.append(listener)

    def on_settled(self, listener: Callable[[Entity], None]) -> None:
        """`listener(entity)` once a dispatch has started its triggers, and once an
        invocation's answer has been dispatched: the moments an entity may have ended."""
        self._settled.append(listener)

    def emit(self, entity: Entity, kind: str, **detail: Any) -> None:
        if self._on_event is not None:
            self._on_event(SessionEvent(self.loop.now(), entity.job, kind, entity.status, detail))

    # -- dispatch ------------------------------------------------------------------------

    def dispatch(
        self,
        entity: Entity,
        name: str,
        params: Mapping[str, Any] | None = None,
        *,
        source: str = "input",
    ) -> str | None:
        """Dispatches `name` on `entity`; returns None, or why it was rejected."""
        params = dict(params or {})
        action = self.spec.action(name)
        if action is None:
            return self._reject(entity, name, source, f"unknown action '{name}'")
        held = self.admission.acquire(entity.job.tenant, name)
        try:
            error = self._ask(entity, action, params, source)
        finally:
            if held:
                self.admission.release(entity.job.tenant, name)
        if error is not None:
            return self._reject(entity, name, source, error)
        # Post-dispatch, after the permit is gone: timers, then triggers.
        for trigger in action.triggers:
            self._start_trigger(entity, action, trigger, params)
        for listener in self._settled:
            listener(entity)
        return None

    def _reject(self, entity: Entity, name: str, source: str, error: str) -> str:
        entity.rejected += 1
        self.emit(entity, "rejected", action=name, source=source, error=error)
        return error

    def _ask(
        self, entity: Entity, action: Action, params: dict[str, Any], source: str
    ) -> str | None:
        """The actor's transition: enabledness, declared params, status, effects, timers."""
        before = entity.status
        if not action.enabled_in(before):
            return f"action '{action.name}' is not enabled in state '{before}'"
        for name in action.params:
            if name in params:
                entity.fields[name] = params[name]
        after = action.target(before)
        entity.status = after
        for effect in action.effects:
            self._apply(entity, effect.var, effect.op, self._effect_value(entity, effect, params))
        entity.last_action = action.name
        entity.last_source = source
        if after != before:
            entity.history.append((self.loop.now(), after))
        self.emit(
            entity,
            "transition",
            action=action.name,
            source=source,
            before=before,
            after=after,
            params=_brief(params),
        )
        self._arm(entity, action.name, before, after)
        for listener in self._listeners:
            listener(entity, action.name, before, after)
        return None

    @staticmethod
    def _effect_value(entity: Entity, effect: Any, params: Mapping[str, Any]) -> Any:
        if effect.param is not None:
            return params.get(effect.param)
        if effect.field_ref is not None:
            return entity.fields.get(effect.field_ref)
        return effect.literal

    @staticmethod
    def _apply(entity: Entity, var: str, op: str, value: Any) -> None:
        if op == "=":
            entity.fields[var] = value
            return
        current = entity.fields.get(var) or 0
        amount = value if isinstance(value, int) and not isinstance(value, bool) else 0
        entity.fields[var] = current + amount if op == "+=" else max(0, current - amount)

    def dispatch_external(
        self,
        tenant: str,
        entity_set: str,
        entity_id: str,
        action: str,
        params: Mapping[str, Any] | None,
        credential: str | None,
        *,
        idempotency_key: str | None = None,
    ) -> ExternalAnswer:
        """Temper's `POST /tdata/{entity_set}('{entity_id}')/Temper.{action}` with
        `X-Tenant-Id: tenant` and `Authorization: Bearer credential`; runs on the loop's
        thread like every other dispatch."""
        owner = self.access.credentials.get(credential or "")
        if owner is None:
            return ExternalAnswer(401, "Unauthorized", "no valid bearer credential")
        if owner != tenant:
            return ExternalAnswer(
                403, "AuthorizationDenied", f"the credential is not tenant {tenant!r}'s"
            )
        if entity_set != self.access.entity_set:
            return ExternalAnswer(404, "EntitySetNotFound", f"Entity set '{entity_set}' not found")
        entity = self.entities.get(entity_id)
        if entity is None or entity.job.tenant != tenant:
            return ExternalAnswer(
                404, "ResourceNotFound", f"Entity '{entity_set}' with key '{entity_id}' not found"
            )
        if idempotency_key:
            used = entity.idempotency_keys.get(idempotency_key)
            if used is not None:
                if used != action:
                    return ExternalAnswer(
                        409,
                        "IdempotencyConflict",
                        "Idempotency-Key was already used by a different action request",
                    )
                return ExternalAnswer(200)
        error = self.dispatch(entity, action, params, source="external")
        if error is not None:
            return ExternalAnswer(409, "ActionFailed", error)
        if idempotency_key:
            entity.idempotency_keys[idempotency_key] = action
        return ExternalAnswer(200)

    # -- timers --------------------------------------------------------------------------

    def _arm(self, entity: Entity, action: str, before: str, after: str) -> None:
        indexed = [(i, t) for i, t in enumerate(self.spec.timeouts) if t.state == after]
        if after != before:
            self._cancel_timer(entity)
            if indexed:
                # Entry arms the first declaration only (arming.rs: one transition permit).
                self._arm_one(entity, *indexed[0])
            return
        for index, timeout in indexed:
            if action in timeout.reset_on:
                # Each matching reset replaces the owner: the last declaration wins.
                self._arm_one(entity, index, timeout)

    def _cancel_timer(self, entity: Entity) -> None:
        entity.generation += 1
        if entity.timer is not None:
            entity.timer.cancel()
        entity.timer = None
        entity.timer_declaration = None
        entity.timer_deadline = None

    def _arm_one(self, entity: Entity, index: int, timeout: StateTimeout) -> None:
        self._cancel_timer(entity)
        generation = entity.generation
        deadline = self.loop.now() + self._timer_seconds(timeout)
        entity.timer_declaration = index
        entity.timer_deadline = deadline
        entity.timer = self.loop.call_at(
            deadline, lambda: self._fire(entity, index, timeout, generation, deadline)
        )

    def _fire(
        self,
        entity: Entity,
        index: int,
        timeout: StateTimeout,
        generation: int,
        deadline: float,
    ) -> None:
        if entity.generation != generation:
            return  # a newer arm or a state change took the timer over
        entity.timer = None
        entity.timer_declaration = None
        entity.timer_deadline = None
        entity.fired[index] += 1
        self.timer_lag_s = max(self.timer_lag_s, self.loop.now() - deadline)
        params = {key: self._arg(entity, arg) for key, arg in timeout.args}
        self.emit(entity, "timer", state=timeout.state, on_timeout=timeout.on_timeout)
        self.dispatch(entity, timeout.on_timeout, params, source="timer")

    @staticmethod
    def _arg(entity: Entity, arg: Arg) -> Any:
        if arg.var is None:
            return arg.literal
        if arg.var in ("Id", "id"):
            return entity.job.id
        return entity.fields.get(arg.var)

    # -- triggers ------------------------------------------------------------------------

    def _start_trigger(
        self, entity: Entity, action: Action, trigger: Trigger, params: dict[str, Any]
    ) -> None:
        config = self.secrets.resolve(trigger.config)
        if self._configure is not None:
            config = self._configure(trigger, config)
        state = dict(entity.fields)
        state["status"] = entity.status
        invocation = Invocation(
            tenant=entity.job.tenant,
            entity_type=self.spec.name,
            entity_id=entity.job.id,
            trigger_action=action.name,
            trigger_params=json.dumps(params, sort_keys=True, default=str),
            entity_state=json.dumps(state, sort_keys=True, default=str),
            config=tuple(sorted(config.items())),
            session_id=f"session-{self.run_id}-{entity.job.id}",
            trace_id=f"{self.run_id}-{entity.job.id}-{entity.invocations + 1}",
        )
        entity.in_flight += 1
        entity.invocations += 1
        self.emit(
            entity,
            "invoked",
            trigger=trigger.name,
            module=trigger.module,
            operation=config.get("operation", ""),
        )
        self.loop.invoke(
            trigger.module, invocation, lambda outcome: self._answered(entity, trigger, outcome)
        )

    def _answered(self, entity: Entity, trigger: Trigger, outcome: Outcome) -> None:
        entity.in_flight -= 1
        try:
            self._dispatch_answer(entity, trigger, outcome)
        finally:
            for listener in self._settled:
                listener(entity)

    def _dispatch_answer(self, entity: Entity, trigger: Trigger, outcome: Outcome) -> None:
        self.emit(
            entity,
            "answered",
            trigger=trigger.name,
            action=outcome.action,
            success=outcome.success,
            params=_brief(outcome.params),
        )
        if outcome.success and outcome.action:
            # invocation.rs: prefer the static on_success, fall back to the module's action.
            callback = trigger.on_success or outcome.action
            self.dispatch(entity, callback, outcome.params, source="callback")
            return
        error = _error_text(outcome)
        if trigger.failure_routes:
            # failure_routing.rs: an untyped failure (a trap, a budget, a malformed result)
            # counts as `permanent`; an undeclared category dispatches nothing.
            route = dict(trigger.failure_routes).get("permanent")
            if route is None:
                entity.unhandled_failures += 1
                self.emit(entity, "unhandled_failure", trigger=trigger.name, error=error)
                return
            self.dispatch(
                entity,
                route,
                {
                    "failure": {
                        "category": "permanent",
                        "code": "InvocationFailed",
                        "diagnostic": error,
                    }
                },
                source="callback",
            )
            return
        if trigger.on_failure is None:
            entity.unhandled_failures += 1
            self.emit(entity, "unhandled_failure", trigger=trigger.name, error=error)
            return
        self.dispatch(
            entity,
            trigger.on_failure,
            {"error": error, "error_message": error, "integration": trigger.name},
            source="callback",
        )


def _error_text(outcome: Outcome) -> str:
    if outcome.error is not None:
        return f"{outcome.error.code}: {outcome.error.message}"
    return f"{outcome.action} (unsuccessful result)"


def _brief(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if isinstance(v, str | int | float | bool)}
