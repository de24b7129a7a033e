"""A resource gate: its decisions (`acquire`, `settle`, `release`) and the component's
entry for those operations with a `resource` key.

A refusal is `SandboxFailed` with a typed code, like every failure of the component.
Storage trouble fails closed: an acquire answers `ResourceQueued` with reason `storage`,
nothing granted. A 429 or 529 from the provider pauses every invocation of the account
(the gate's shared cooldown), for as long as its headers say (`pause_from_headers`), else
the gate's backoff. A settle after its lease expired no longer knows what the grant
charged, so it charges the actual in full: it errs towards waiting, never towards a 429.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, NoReturn

from provisioner.config import AdmissionConfig, ResourceGate, read_config
from provisioner.failures import FailureCode
from provisioner.gates.blocking import Assessment, Scheduled, Turn, resource_assess
from provisioner.gates.bucket import Charge, settle_charge
from provisioner.gates.cas import new_lease_id, storage_queued
from provisioner.gates.document import (
    INPUT,
    OUTPUT,
    REQUESTS,
    Costs,
    Reservation,
    ResourceLease,
    ResourceState,
    decode_ticket,
    encode_ticket,
    margin_of,
    resource_prefix,
)
from provisioner.gates.ledger import (
    GateLedger,
    LoadedDocument,
    charge_margins,
    prune,
    queued_place,
    retried,
    set_bucket,
)
from provisioner.gates.place import Place
from provisioner.gates.policies import (
    cooling_ms,
    rate_limits,
    record_failure,
    request_costs,
    too_large,
)
from provisioner.gates.queue import (
    drop_ticket,
    pass_over_unclaimed,
    reservation_of,
    reserve,
)
from provisioner.gates.results import (
    ProviderAnswer,
    Queued,
    Rejected,
    ResourceGrant,
    Waiter,
)
from provisioner.invocation import Request
from provisioner.model import Outcome, ProvisionerError, failed, fields_of
from provisioner.ports import LogLevel, Ports, StorageError

_MAX_TOKENS = 1_000_000_000
# Temper dispatches an outcome by its action name, one action to one target state: a spec
# gating two resources from two states renames each trigger's answers (`<verb>_action`,
# default `Resource<Verb>`; a static on_success cannot: it would also win over SandboxFailed).
_VERBS = ("granted", "queued", "settled", "released")
_ACTION_NAME = re.compile(r"[A-Z][A-Za-z0-9_]{0,63}")
_LIMITS = ("requests", "tokens", "input-tokens", "output-tokens")
# A pause longer than a day is a broken header, not advice.
_MAX_PAUSE_MS = 24 * 3600 * 1000


def _epoch_ms(parse: Callable[[str], datetime], text: str) -> int | None:
    """A moment `parse` reads in `text` (None: unreadable or without a time zone)."""
    try:
        moment = parse(text.strip())
    except (TypeError, ValueError, IndexError):
        return None
    return None if moment.tzinfo is None else int(moment.timestamp() * 1000)


def _retry_after_ms(text: str, now_ms: int) -> int | None:
    try:
        seconds = float(text)
    except ValueError:
        at = _epoch_ms(parsedate_to_datetime, text)
        return None if at is None else max(0, at - now_ms)
    return int(seconds * 1000) if math.isfinite(seconds) and seconds >= 0 else None


def pause_from_headers(status: int, headers: dict[str, str], now_ms: int) -> int | None:
    """How long the provider asked every caller to wait (None: it did not say):
    `retry-after`; else, for a 429, the latest `anthropic-ratelimit-*-reset` among the
    limits whose `-remaining` is 0, or the earliest reset ahead. Headers that do not parse
    are ignored: the call has happened, and its cost must be settled whatever they say."""
    retry_after = headers.get("retry-after")
    if retry_after is not None:
        pause = _retry_after_ms(retry_after, now_ms)
        if pause is not None:
            return min(pause, _MAX_PAUSE_MS)
    if status != 429:
        return None
    exhausted: list[int] = []
    ahead: list[int] = []
    for limit in _LIMITS:
        reset = headers.get(f"anthropic-ratelimit-{limit}-reset")
        at = None if reset is None else _epoch_ms(datetime.fromisoformat, reset)
        if at is None or at <= now_ms:
            continue
        ahead.append(at - now_ms)
        if headers.get(f"anthropic-ratelimit-{limit}-remaining", "").strip() == "0":
            exhausted.append(at - now_ms)
    pause = max(exhausted) if exhausted else min(ahead, default=None)
    return None if pause is None else min(pause, _MAX_PAUSE_MS)


def is_resource_request(request: Request) -> bool:
    """acquire and settle; release only with a `resource` key (without it, release frees
    the entity's sandbox, as it always has)."""
    if request.operation in ("acquire", "settle"):
        return True
    return request.operation == "release" and bool(request.config.get("resource", "").strip())


def _refuse(message: str, code: FailureCode = FailureCode.INVALID_INVOCATION) -> NoReturn:
    raise ProvisionerError(code, message)


def _whole(value: Any, low: int, high: int, refusal: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        _refuse(refusal)
    return value


def _tokens(params: dict[str, Any], name: str) -> int | None:
    if params.get(name) is None:
        return None
    refusal = f"{name} must be a whole number from 0 to {_MAX_TOKENS}"
    return _whole(params[name], 0, _MAX_TOKENS, refusal)


def action_name(config: dict[str, str], key: str, default: str) -> str:
    """The answer a trigger's `key` renames (`default` when absent); a bad name is
    invalid_config, refused before anything is read or written."""
    raw = config.get(key, "").strip()
    if not raw:
        return default
    if not _ACTION_NAME.fullmatch(raw):
        rule = "an action name (a capital letter, then up to 63 letters, digits or _)"
        _refuse(f"{key} must be {rule}, got {raw[:40]!r}", FailureCode.INVALID_CONFIG)
    return raw


def _declared(request: Request, name: str) -> int | None:
    """From the trigger's params, else from the entity's state field of the same name (a
    spec keeps its next call's estimate there)."""
    found = _tokens(request.trigger_params, name)
    return _tokens(request.entity_state, name) if found is None else found


def _gate(gates: dict[str, ResourceGate], raw: str | None) -> ResourceGate:
    name, misconfigured = (raw or "").strip(), FailureCode.INVALID_CONFIG
    if not name:
        _refuse("operation needs the config key resource (a gate name)", misconfigured)
    gate = gates.get(name)
    if gate is None:
        unknown = f"resource {name[:40]!r} is not declared by any resource.{name[:40]}.<limit> key"
        _refuse(f"{unknown} (declared: {', '.join(gates) or 'none'})", misconfigured)
    return gate


ResourceLoaded = LoadedDocument[ResourceState]


class ResourceLedger(GateLedger[ResourceState, ResourceGrant]):
    costs: Costs  # the request's estimates, set by `acquire`

    def __init__(self, ports: Ports, config: AdmissionConfig, gate: ResourceGate) -> None:
        super().__init__(ports, config, resource_prefix(gate.name), ResourceState)
        self.gate = gate

    @property
    def queue_timeout_ms(self) -> int:
        timeout = self.gate.queue_timeout_ms
        return self.config.queue_timeout_ms if timeout is None else timeout

    def catch_up(self, state: ResourceState, now_ms: int) -> bool:
        prune(state, self.gate, now_ms)
        return bool(pass_over_unclaimed(state, now_ms, self.config.reservation_claim_ms))

    def read_ticket(self, tenant: str, ticket: int) -> Costs | None:
        value = self.ticket_entry(tenant, ticket)
        return None if value is None else decode_ticket(value)[1]

    def acquire(self, waiter: Waiter, costs: Costs) -> ResourceGrant | Queued | Rejected:
        self.costs = costs
        self.ticket_value = encode_ticket(waiter.entity, costs)
        return self.ask(waiter)

    def locate(self, waiter: Waiter, loaded: ResourceLoaded) -> Place | ResourceGrant:
        """Asking again while holding the lease renews it and answers the same grant."""
        state, now = loaded.state, loaded.now_ms
        held = state.lease_of(waiter.tenant, waiter.entity)
        if held is not None:
            held.expires_ms = now + self.gate.lease_ms
            self.save_gate(loaded)
            return ResourceGrant(held.lease_id, held.expires_ms, 0, renewed=True)
        return queued_place(state, waiter.tenant, loaded.place, now)

    def assess(self, waiter: Waiter, loaded: ResourceLoaded, place: Place) -> Assessment:
        state, gate, now, uniform = loaded.state, self.gate, loaded.now_ms, self.ports.uniform
        costs, read = self.costs, self.read_ticket
        return resource_assess(
            state, gate, self.config, now, waiter.tenant, place, costs, read, uniform
        )

    def reserve(
        self, loaded: ResourceLoaded, scheduled: list[Scheduled], mine: Turn
    ) -> tuple[bool, Reservation | None]:
        state, now, claim_ms = loaded.state, loaded.now_ms, self.config.reservation_claim_ms
        reserved = False
        for item in scheduled:
            turn, rid = item.turn, new_lease_id(self.ports, "v")
            made = reserve(state, turn.tenant, turn.ticket, None, now, now, claim_ms, rid)[1]
            reserved = reserved or made
        return reserved, reservation_of(state, mine.tenant, mine.ticket, None)

    def timed_out(self, loaded: ResourceLoaded, place: Place) -> str | None:
        """Longer than the queue timeout, or than the stall timeout with no grant made by
        the gate meanwhile (a stuck gate; a queue that moves keeps its waiters)."""
        now_ms, since_ms, granted_ms = loaded.now_ms, place.since_ms, loaded.state.granted_ms
        waited = now_ms - since_ms
        if waited >= self.queue_timeout_ms:
            return (
                f"waited {waited} ms for resource {self.gate.name!r}, longer than its queue "
                f"timeout of {self.queue_timeout_ms} ms"
            )
        stall = self.gate.stall_timeout_ms
        stalled = now_ms - max(since_ms, granted_ms)
        if stall is not None and stalled >= stall:
            return (
                f"resource {self.gate.name!r} granted no one for {stalled} ms of this wait, "
                f"longer than its stall timeout of {stall} ms"
            )
        return None

    def grant(self, waiter: Waiter, loaded: ResourceLoaded, place: Place) -> ResourceGrant:
        state, now, costs = loaded.state, loaded.now_ms, self.costs
        charges: list[Charge] = []
        for rate in rate_limits(self.gate):
            name = rate.bucket_id(waiter.tenant)
            cost = costs.get(rate.kind, 0.0)
            tat = rate.bucket.charge(state.buckets.get(name, 0.0), now, cost)
            set_bucket(state, name, tat, now)
            charges.append(Charge(name, cost, tat - now))
        margins = {kind: margin for kind in (INPUT, OUTPUT) if (margin := margin_of(costs, kind))}
        lease_id, until = new_lease_id(self.ports, "r"), now + self.gate.lease_ms
        lease = ResourceLease(lease_id, waiter.tenant, waiter.entity, until, now, charges, margins)
        state.leases.append(lease)
        state.granted_ms = now
        self.save_gate(loaded)
        # The gate document is the truth about who holds what: the place is not needed.
        self.forget(waiter, place.ticket)
        return ResourceGrant(lease.lease_id, lease.expires_ms, now - place.since_ms)

    @retried
    def settle(
        self, waiter: Waiter, lease_id: str | None, actual: Costs, answer: ProviderAnswer
    ) -> dict[str, Any]:
        """What `ResourceSettled` says: `held`, the lease was still held (else the actual
        was charged in full); `charged`, tokens per cost kind (negative: given back)."""
        loaded = self.load(waiter)
        state, now = loaded.state, loaded.now_ms
        lease = state.lease_of(waiter.tenant, waiter.entity, lease_id)
        charged: dict[str, float] = {}
        if lease is not None:
            state.leases.remove(lease)
            state.observe_hold(lease.started_ms, now)
            rates = {rate.bucket_id(waiter.tenant): rate for rate in rate_limits(self.gate)}
            for charge in lease.charges:
                rate = rates.get(charge.bucket)
                if rate is None:
                    continue  # the limit was removed from the config since the grant
                known = actual.get(rate.kind)
                if known is None:
                    continue  # not told: what the grant charged stands
                tat = state.buckets.get(charge.bucket, 0.0)
                settled = settle_charge(rate.bucket, tat, now, charge, known)
                set_bucket(state, charge.bucket, settled, now)
                if not rate.per_tenant:
                    charged[rate.kind] = (settled - tat) / rate.bucket.interval_ms
        else:
            for rate in rate_limits(self.gate):
                known = actual.get(rate.kind)
                if rate.kind == REQUESTS or not known:
                    continue
                name = rate.bucket_id(waiter.tenant)
                tat = state.buckets.get(name, 0.0)
                set_bucket(state, name, rate.bucket.charge(tat, now, known), now)
                if not rate.per_tenant:
                    charged[rate.kind] = known
        if answer.backs_off:
            record_failure(state, self.config, now, answer.pause_ms, self.ports.uniform())
        elif answer.kind == "success":
            state.backoff_failures = 0
        self.save_gate(loaded)
        return {
            "lease_id": lease.lease_id if lease is not None else lease_id,
            "held": lease is not None,
            "answer": answer.kind,
            "status": answer.status,
            "charged": {kind: round(tokens, 3) for kind, tokens in charged.items()},
            "cooling_ms": cooling_ms(state, now),
        }

    @retried
    def release(self, waiter: Waiter) -> dict[str, Any]:
        loaded = self.load(waiter)
        state, now = loaded.state, loaded.now_ms
        lease = state.lease_of(waiter.tenant, waiter.entity)
        if lease is not None:
            state.leases.remove(lease)
            state.observe_hold(lease.started_ms, now)
            charge_margins(state, self.gate, lease, now)
        ticket = None if loaded.place is None else loaded.place.queued_ticket
        waited = ticket is not None and state.holds_ticket(waiter.tenant, ticket)
        if ticket is not None and waited:
            drop_ticket(state, waiter.tenant, ticket)
        if lease is not None or waited:
            self.save_gate(loaded)
        self.forget(waiter, ticket)
        held = None if lease is None else lease.lease_id
        return {"released": lease is not None, "lease_id": held, "waited": waited}


class ResourceOperations:
    def __init__(self, request: Request, ports: Ports) -> None:
        config = read_config(request.config)
        self.request = request
        self.ports = ports
        self.gate = _gate(config.resources, request.config.get("resource"))
        self.ledger = ResourceLedger(ports, config.admission, self.gate)
        self.waiter = Waiter(request.tenant, request.entity)
        self.actions = {
            verb: action_name(request.config, f"{verb}_action", f"Resource{verb.title()}")
            for verb in _VERBS
        }

    def _answer(self, verb: str, params: dict[str, Any]) -> Outcome:
        """The outcome `verb` names (none for a refusal), told as event `resource_<verb>`."""
        event, action = f"resource_{verb}", self.actions.get(verb, "")
        body = {"resource": self.gate.name, **params}
        self.ports.progress(
            {"event": event, "tenant": self.waiter.tenant, "entity": self.waiter.entity, **body}
        )
        return Outcome(action, body)

    def acquire(self) -> Outcome:
        estimates: dict[str, int] = {}
        worst_cases: dict[str, int] = {}
        for kind in (INPUT, OUTPUT):
            estimate = estimates[kind] = _declared(self.request, f"estimated_{kind}_tokens") or 0
            name = f"max_{kind}_tokens"
            worst = _declared(self.request, name)
            if worst is not None:
                if worst < estimate:
                    bound = "a worst case bounds it"
                    _refuse(f"{name} ({worst}) is below its estimate ({estimate}): {bound}")
                worst_cases[kind] = worst
        costs: Costs = request_costs(estimates, worst_cases)
        reason = too_large(self.gate, costs)
        if reason is not None:
            _refuse(reason)
        try:
            decision = self.ledger.acquire(self.waiter, costs)
        except StorageError as error:
            with contextlib.suppress(Exception):
                self.ports.telemetry.log(LogLevel.WARN, f"resource acquire fails closed: {error!r}")
            decision = storage_queued(self.ports, self.ledger.config)
        if isinstance(decision, ResourceGrant):
            return self._answer("granted", fields_of(decision))
        if isinstance(decision, Rejected):
            self._answer("rejected", {"code": decision.failure.code})
            return failed(decision.failure)
        return self._answer("queued", decision.params())

    def settle(self) -> Outcome:
        params = self.request.trigger_params
        lease_id = params.get("lease_id")
        if lease_id is not None and (not isinstance(lease_id, str) or len(lease_id) > 64):
            _refuse("trigger param lease_id must be the lease id ResourceGranted gave")
        actual: Costs = {}
        for kind in (INPUT, OUTPUT):
            tokens = _tokens(params, f"{kind}_tokens")
            if tokens is not None:
                actual[kind] = float(tokens)
        refusal = "trigger param status must be the provider's HTTP status (100-599)"
        status = _whole(params.get("status", 200), 100, 599, refusal)
        headers = params.get("headers")
        if not isinstance(headers, dict | None):
            _refuse("trigger param headers must be an object of header names to values")
        lowered = {str(k).lower(): str(v) for k, v in (headers or {}).items()}
        now = self.ports.clock.now_ms()
        answer = ProviderAnswer(status, pause_from_headers(status, lowered, now))
        settled = self.ledger.settle(self.waiter, lease_id or None, actual, answer)
        return self._answer("settled", settled)

    def release(self) -> Outcome:
        return self._answer("released", self.ledger.release(self.waiter))


def dispatch_resource(request: Request, ports: Ports) -> Outcome:
    operations = ResourceOperations(request, ports)
    decisions = {"acquire": operations.acquire, "settle": operations.settle}
    return decisions.get(request.operation, operations.release)()
