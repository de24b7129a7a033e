"""The resource operations: `acquire`, `settle`, and `release` with a `resource` key.

A refusal is `SandboxFailed` with a typed code, like every failure of the component
(Temper routes a failure by `on_failure` whatever its action). Storage trouble fails
closed: an acquire answers `ResourceQueued` with reason `storage`, nothing granted.

A 429 or 529 from the provider pauses every invocation of the account (the gate's shared
cooldown), the way E2B's 429s pause creates. The pause (Anthropic's rate-limit headers,
https://docs.anthropic.com/en/api/rate-limits): `retry-after` when sent; else, for a 429,
the latest `anthropic-ratelimit-*-reset` among the limits whose `-remaining` is 0 (or the
earliest reset ahead when none says 0); else the gate's backoff. Headers that do not parse
are ignored: the call has happened, and its cost must be settled whatever they say.
"""

from __future__ import annotations

import contextlib
import math
import re
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

from provisioner.config import AdmissionConfig, ResourceGate, read_config
from provisioner.failures import FailureCode
from provisioner.gates.admit import Acquisition
from provisioner.gates.cas import storage_queued
from provisioner.gates.document import INPUT, OUTPUT, Costs
from provisioner.gates.policies import request_costs, too_large
from provisioner.gates.release import ResourceRelease
from provisioner.gates.results import ProviderAnswer, Rejected, ResourceGrant, Waiter
from provisioner.gates.settle import ResourceSettlement
from provisioner.invocation import Request
from provisioner.model import Outcome, ProvisionerError, failed
from provisioner.ports import LogLevel, Ports, StorageError

RESOURCE_GRANTED = "ResourceGranted"
RESOURCE_QUEUED = "ResourceQueued"
RESOURCE_SETTLED = "ResourceSettled"
RESOURCE_RELEASED = "ResourceReleased"

_MAX_TOKENS = 1_000_000_000
# Temper dispatches an outcome by its action name, one action to one target state: a spec
# gating two resources from two states renames each trigger's answers (`granted_action`
# ...; a static on_success cannot: it would also win over SandboxFailed).
_ACTION_NAME = re.compile(r"[A-Z][A-Za-z0-9_]{0,63}")
_LIMITS = ("requests", "tokens", "input-tokens", "output-tokens")
# A pause longer than a day is a broken header, not advice.
_MAX_PAUSE_MS = 24 * 3600 * 1000


def _epoch_ms(moment: datetime) -> int | None:
    return None if moment.tzinfo is None else int(moment.timestamp() * 1000)


def _reset_ms(text: str) -> int | None:
    try:
        return _epoch_ms(datetime.fromisoformat(text.strip()))
    except ValueError:
        return None


def _retry_after_ms(text: str, now_ms: int) -> int | None:
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            at = _epoch_ms(parsedate_to_datetime(text))
        except (TypeError, ValueError, IndexError):
            return None
        return None if at is None else max(0, at - now_ms)
    return int(seconds * 1000) if math.isfinite(seconds) and seconds >= 0 else None


def pause_from_headers(status: int, headers: dict[str, str], now_ms: int) -> int | None:
    """How long the provider asked every caller to wait (None: it did not say)."""
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
        at = None if reset is None else _reset_ms(reset)
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


def _refuse(message: str) -> None:
    raise ProvisionerError(FailureCode.INVALID_INVOCATION, message)


def _whole(value: Any, low: int, high: int, refusal: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        _refuse(refusal)
    assert isinstance(value, int)
    return value


def _tokens(params: dict[str, Any], name: str) -> int | None:
    if params.get(name) is None:
        return None
    refusal = f"{name} must be a whole number from 0 to {_MAX_TOKENS}"
    return _whole(params[name], 0, _MAX_TOKENS, refusal)


def _action_name(config: dict[str, str], key: str, default: str) -> str:
    raw = config.get(key, "").strip()
    if not raw:
        return default
    if not _ACTION_NAME.fullmatch(raw):
        raise ProvisionerError(
            FailureCode.INVALID_CONFIG,
            f"{key} must be an action name (a capital letter, then up to 63 letters, digits "
            f"or _), got {raw[:40]!r}",
        )
    return raw


def _declared(request: Request, name: str) -> int | None:
    """From the trigger's params, else from the entity's state field of the same name (a
    spec keeps its next call's estimate there)."""
    found = _tokens(request.trigger_params, name)
    return _tokens(request.entity_state, name) if found is None else found


def _gate(gates: dict[str, ResourceGate], raw: str | None) -> ResourceGate:
    name = (raw or "").strip()
    if not name:
        raise ProvisionerError(
            FailureCode.INVALID_CONFIG, "operation needs the config key resource (a gate name)"
        )
    gate = gates.get(name)
    if gate is None:
        declared = ", ".join(gates) or "none"
        raise ProvisionerError(
            FailureCode.INVALID_CONFIG,
            f"resource {name[:40]!r} is not declared by any resource.{name[:40]}.<limit> key "
            f"(declared: {declared})",
        )
    return gate


class ResourceOperations:
    def __init__(self, request: Request, ports: Ports) -> None:
        config = read_config(request.config)
        self.request = request
        self.ports = ports
        self.admission: AdmissionConfig = config.admission
        self.gate = _gate(config.resources, request.config.get("resource"))
        self.waiter = Waiter(request.tenant, request.entity)
        self.granted_action = _action_name(request.config, "granted_action", RESOURCE_GRANTED)
        self.queued_action = _action_name(request.config, "queued_action", RESOURCE_QUEUED)
        self.settled_action = _action_name(request.config, "settled_action", RESOURCE_SETTLED)
        self.released_action = _action_name(request.config, "released_action", RESOURCE_RELEASED)

    def _answer(self, action: str, event: str, params: dict[str, Any]) -> Outcome:
        body = {"resource": self.gate.name, **params}
        with contextlib.suppress(Exception):
            self.ports.telemetry.progress(
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
            decision = Acquisition(self.ports, self.admission, self.gate).decide(self.waiter, costs)
        except StorageError as error:
            with contextlib.suppress(Exception):
                self.ports.telemetry.log(LogLevel.WARN, f"resource acquire fails closed: {error!r}")
            decision = storage_queued(self.ports, self.admission)
        if isinstance(decision, ResourceGrant):
            granted = {
                "lease_id": decision.lease_id,
                "expires_at_ms": decision.expires_at_ms,
                "queued_ms": decision.queued_ms,
                "renewed": decision.renewed,
            }
            return self._answer(self.granted_action, "resource_granted", granted)
        if isinstance(decision, Rejected):
            self._answer("", "resource_rejected", {"code": decision.failure.code})
            return failed(decision.failure)
        return self._answer(self.queued_action, "resource_queued", decision.params())

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
        settled = ResourceSettlement(self.ports, self.admission, self.gate).decide(
            self.waiter, lease_id or None, actual, answer
        )
        body = {
            "lease_id": settled.lease_id,
            "held": settled.held,
            "answer": settled.answer,
            "status": answer.status,
            "charged": settled.charged,
            "cooling_ms": settled.cooling_ms,
        }
        return self._answer(self.settled_action, "resource_settled", body)

    def release(self) -> Outcome:
        released = ResourceRelease(self.ports, self.admission, self.gate).decide(self.waiter)
        body = {"released": released.held, "lease_id": released.lease_id, "waited": released.waited}
        return self._answer(self.released_action, "resource_released", body)


def dispatch_resource(request: Request, ports: Ports) -> Outcome:
    operations = ResourceOperations(request, ports)
    if request.operation == "acquire":
        return operations.acquire()
    if request.operation == "settle":
        return operations.settle()
    return operations.release()
