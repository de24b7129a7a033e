"""Checks a spec against the component's contract under Temper's rules, before anything runs.

Each finding names the Temper rule it rests on and the file of `nerdsane/temper` that
implements it; `simulate` refuses a spec with findings, and `check_spec` is what the tests
run on specs that break each rule. What the component answers (docs/contract.md):

- `operation = provision`: `SandboxReady`, `SandboxQueued`, `SandboxFailed`, each as a
  successful result whose `action` names it, with its params;
- `operation = release`: `SandboxReleased` (or the trigger's `released_action`),
  `SandboxFailed`;
- a trap, an exhausted budget or a malformed result is a failed invocation.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.simulator.spec import Action, Spec, StateTimeout, Trigger
from provisioner.model import SANDBOX_RELEASED

MODULE = "sandbox_provisioner"
# The invocation deadline (crates/temper-wasm/src/types.rs: 120 s).
INVOCATION_DEADLINE_S = 120
# What a failed invocation's on_failure receives (handle_wasm_failure).
FAILURE_PARAMS = ("error", "error_message", "integration")

ANSWERS: dict[str, dict[str, tuple[str, ...]]] = {
    "provision": {
        "SandboxReady": (
            "sandbox_id",
            "sandbox_url",
            "template_id",
            "client_id",
            "envd_version",
            "attempts",
            "queued_ms",
            "workspace_id",
            "conversation_file_id",
            "file_manifest_id",
            "session_file_id",
            "session_leaf_id",
        ),
        "SandboxQueued": (
            "position",
            "queue_length",
            "in_use",
            "limit",
            "reason",
            "retry_after_ms",
            "eta_ms",
            "waited_ms",
        ),
        "SandboxFailed": ("code", "message", "retryable"),
    },
    "release": {
        "SandboxReleased": ("released", "sandbox_id"),
        "SandboxFailed": ("code", "message", "retryable"),
    },
}

INVOCATION_RS = "crates/temper-server/src/state/dispatch/wasm/invocation.rs"
FAILURE_RS = "crates/temper-server/src/state/dispatch/wasm/ (handle_wasm_failure)"
ARMING_RS = "crates/temper-server/src/state/dispatch/state_timeouts/arming.rs, tracker.rs"
DECLARED_RS = "crates/temper-server/src/entity_actor/declared_params.rs"
ADMISSION_RS = "crates/temper-server/src/state/admission.rs (ADR-0051)"
TYPES_RS = "crates/temper-spec/src/automaton/types.rs"


@dataclass(frozen=True)
class Finding:
    rule: str
    where: str
    message: str
    temper: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.where}: {self.message} (Temper: {self.temper})"


class ContractError(ValueError):
    def __init__(self, spec: Spec, findings: list[Finding]) -> None:
        self.findings = findings
        lines = "\n  ".join(str(f) for f in findings)
        super().__init__(f"{spec.source} breaks Temper's rules for this component:\n  {lines}")


# A resource gate's operations (docs/admission.md, "Beyond sandboxes: resource gates";
# provisioner/gates/resource.py): each answers the action its trigger's config names
# (`granted_action`, `queued_action`, `settled_action`, `released_action`). Every operation
# may also answer SandboxFailed as a successful result, so a static on_success would turn a
# failure into its success action (invocation.rs).
RESOURCE_QUEUE_PARAMS = ANSWERS["provision"]["SandboxQueued"]
FAILED_PARAMS = ANSWERS["provision"]["SandboxFailed"]


def answers_for(trigger: Trigger, operation: str) -> dict[str, tuple[str, ...]]:
    """What the component may answer `trigger` (a successful result's action and params)."""
    named = trigger.config_value
    if trigger.config_value("resource") is None:
        answers = ANSWERS.get(operation, {})
        renamed = named("released_action") if operation == "release" else None
        if renamed:
            return {renamed if a == SANDBOX_RELEASED else a: p for a, p in answers.items()}
        return answers
    if operation == "acquire":
        return {
            named("granted_action") or "ResourceGranted": (
                "resource",
                "lease_id",
                "expires_at_ms",
                "queued_ms",
                "renewed",
            ),
            named("queued_action") or "ResourceQueued": ("resource", *RESOURCE_QUEUE_PARAMS),
            "SandboxFailed": FAILED_PARAMS,
        }
    if operation == "settle":
        return {
            named("settled_action") or "ResourceSettled": (
                "resource",
                "lease_id",
                "held",
                "answer",
                "status",
                "charged",
                "cooling_ms",
            ),
            "SandboxFailed": FAILED_PARAMS,
        }
    if operation == "release":
        return {
            named("released_action") or "ResourceReleased": (
                "resource",
                "released",
                "lease_id",
                "waited",
            ),
            "SandboxFailed": FAILED_PARAMS,
        }
    return {}


def component_triggers(spec: Spec) -> list[tuple[Action, Trigger, str]]:
    return [
        (action, trigger, trigger.config_value("operation") or "provision")
        for action, trigger in spec.triggers()
        if trigger.module == MODULE
    ]


def check_spec(spec: Spec) -> list[Finding]:
    findings: list[Finding] = []
    findings += _one_timer_per_state(spec)
    findings += _reset_on_self_loops(spec)
    findings += _timers_enabled(spec)
    for action, trigger, operation in component_triggers(spec):
        findings += _trigger_rules(spec, action, trigger, operation)
    findings += _admission(spec)
    return findings


def require_clean(spec: Spec) -> None:
    findings = check_spec(spec)
    if findings:
        raise ContractError(spec, findings)


def _one_timer_per_state(spec: Spec) -> list[Finding]:
    found = []
    for state in spec.states:
        timers = spec.timeouts_of(state)
        if len(timers) > 1:
            names = ", ".join(t.on_timeout for t in timers)
            found.append(
                Finding(
                    "one-timer-per-entity",
                    f"state '{state}'",
                    f"{len(timers)} [[state_timeout]] declarations ({names}): entering the state "
                    f"arms only the first ({timers[0].on_timeout}); a reset re-arms the last whose "
                    "reset_on names the action; they never run side by side",
                    ARMING_RS,
                )
            )
    return found


def _reset_on_self_loops(spec: Spec) -> list[Finding]:
    found = []
    for timeout in spec.timeouts:
        for name in timeout.reset_on:
            action = spec.action(name)
            if action is None:
                continue
            if not (
                action.enabled_in(timeout.state) and action.target(timeout.state) == timeout.state
            ):
                found.append(
                    Finding(
                        "reset-on-self-loop",
                        f"state_timeout on '{timeout.state}'",
                        f"reset_on names {name}, which is not a self-loop staying in "
                        f"'{timeout.state}': it never resets this timer",
                        ARMING_RS,
                    )
                )
    return found


def _timers_enabled(spec: Spec) -> list[Finding]:
    found = []
    for timeout in spec.timeouts:
        action = spec.action(timeout.on_timeout)
        if action is not None and not action.enabled_in(timeout.state):
            found.append(
                Finding(
                    "timer-action-enabled",
                    f"state_timeout on '{timeout.state}'",
                    f"on_timeout {timeout.on_timeout} is not enabled in '{timeout.state}'",
                    TYPES_RS,
                )
            )
    return found


def _first_timer(spec: Spec, state: str) -> StateTimeout | None:
    timers = spec.timeouts_of(state)
    return timers[0] if timers else None


def _trigger_rules(spec: Spec, action: Action, trigger: Trigger, operation: str) -> list[Finding]:
    found: list[Finding] = []
    where = f"action '{action.name}' trigger '{trigger.name}'"
    answers = answers_for(trigger, operation)
    if trigger.on_success is not None and len(answers) > 1:
        swallowed = [a for a in answers if a != trigger.on_success]
        found.append(
            Finding(
                "static-on-success",
                where,
                f"on_success = {trigger.on_success!r} wins over the action the component names, "
                f"so every {', '.join(swallowed)} answer dispatches {trigger.on_success}; leave "
                "on_success out",
                INVOCATION_RS,
            )
        )
    if trigger.on_failure is not None:
        target = spec.action(trigger.on_failure)
        if target is not None:
            missing = [p for p in target.params if p not in FAILURE_PARAMS]
            if missing:
                found.append(
                    Finding(
                        "failure-params",
                        where,
                        f"on_failure = {trigger.on_failure!r} declares {', '.join(missing)}, but a "
                        f"failed invocation dispatches it with {{{', '.join(FAILURE_PARAMS)}}} "
                        "only: the module's action and params are lost",
                        FAILURE_RS,
                    )
                )
    # Where the answer arrives: the state the triggering action leads to.
    for state in {action.target(s) for s in action.sources} or {action.to or spec.initial}:
        for answer, params in answers.items():
            callback = spec.action(answer)
            strict = operation in ("provision", "acquire")
            if not strict and (callback is None or not callback.enabled_in(state)):
                # A release answered in a final state, or a failed release in Releasing, is
                # dropped on purpose: the entity is done, or its timer tries again.
                continue
            if callback is None or not callback.enabled_in(state):
                found.append(
                    Finding(
                        "answer-has-transition",
                        where,
                        f"the component may answer {answer} in '{state}', where no such action is "
                        "enabled: Temper rejects the callback and the entity waits",
                        INVOCATION_RS,
                    )
                )
                continue
            variables = {v.name for v in spec.state_vars}
            lost = [p for p in params if p in variables and p not in callback.params]
            if lost:
                found.append(
                    Finding(
                        "declared-params",
                        f"action '{answer}'",
                        f"does not declare {', '.join(lost)}: the component's values never reach "
                        "those fields",
                        DECLARED_RS,
                    )
                )
        if operation == "provision":
            found += _provisioning_timers(spec, state, where)
        if operation == "release":
            found += _release_retried(spec, action, state, answers, where)
    if (
        operation == "provision"
        and "SandboxQueued" in answers
        and trigger.config_value("resource") is None
    ):
        found += _poll_rules(spec)
    return found


def _release_retried(
    spec: Spec, action: Action, state: str, answers: dict[str, tuple[str, ...]], where: str
) -> list[Finding]:
    """A release lands where its confirmation moves the entity on and a timer asks again
    (a failed release answers SandboxFailed, dropped there). One that leads straight into a
    state without a timer is asked once: if it fails, nothing asks again and the permit
    stays held until its lease expires. The last ask of a state that was itself releasing
    (a give-up on the way out) is exempt: the asks before it were retried."""
    released = next((a for a in answers if a != "SandboxFailed"), None)
    if released is None or _first_timer(spec, state) is not None:
        return []
    confirming = spec.action(released)
    if confirming is not None and all(confirming.enabled_in(s) for s in action.sources):
        return []
    return [
        Finding(
            "release-retried",
            where,
            f"the release leads into '{state}', which has no timer: a release that fails "
            "(SandboxFailed, storage unavailable or a failed kill) is never asked again and "
            "the permit stays held until its lease expires; release into a state whose timer "
            f"asks again and which {released} leaves",
            ARMING_RS,
        )
    ]


def _provisioning_timers(spec: Spec, state: str, where: str) -> list[Finding]:
    timer = _first_timer(spec, state)
    if timer is None or timer.after_seconds > INVOCATION_DEADLINE_S:
        return []
    poll = spec.action(timer.on_timeout)
    if poll is not None and any(t.module == MODULE for t in poll.triggers):
        # A poll that asks the component again (Queued's, when a wake action runs in
        # Queued) cuts nothing off: the running invocation's answer still lands, and the
        # component gives an entity no second create while its first is in flight.
        return []
    return [
        Finding(
            "guard-above-deadline",
            f"state_timeout on '{state}'",
            f"{timer.on_timeout} after {timer.after_seconds}s fires while a provision invocation "
            f"may still run (deadline {INVOCATION_DEADLINE_S}s): a slow create is cut off",
            ARMING_RS,
        )
    ]


def _poll_rules(spec: Spec) -> list[Finding]:
    queued = spec.action("SandboxQueued")
    if queued is None:
        return []
    found: list[Finding] = []
    for source in queued.sources:
        state = queued.target(source)
        timer = _first_timer(spec, state)
        poll = spec.action(timer.on_timeout) if timer is not None else None
        asks = poll is not None and any(t.module == MODULE for t in poll.triggers)
        if timer is None or poll is None or not asks:
            found.append(
                Finding(
                    "poll-timer",
                    f"state '{state}'",
                    "a queued entity asks again only when a timer of its state fires (Temper "
                    "has no wake-up and no per-answer delay); the first timer here does not "
                    "trigger the component",
                    ARMING_RS,
                )
            )
    return found


def _admission(spec: Spec) -> list[Finding]:
    # Not a finding: caps are fine, they just do not bound the component's creates. The
    # README says so; nothing to refuse here.
    return []
