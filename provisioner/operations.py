"""The sandbox operations: provision, release and status (the resource gates' are in
`provisioner.gates.resource`).

For "nothing is lost": the entity record (and so the idempotency key) is written before any
create is sent, and deleted only after E2B confirmed the kill, so the next invocation
recovers from a crash at any point.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

from provisioner.config import read_config
from provisioner.e2b import E2BClient
from provisioner.entity_records import PENDING, READY, EntityRecord, EntityRecords, idempotency_key
from provisioner.failures import FailureCode
from provisioner.gates.cas import storage_queued
from provisioner.gates.controller import AdmissionController
from provisioner.gates.resource import action_name, dispatch_resource, is_resource_request
from provisioner.gates.results import (
    REASON_STORAGE,
    Created,
    CreateFailed,
    CreateResult,
    Grant,
    Queued,
    Rejected,
    Unavailable,
    Waiter,
)
from provisioner.gates.view import resource_snapshot
from provisioner.invocation import Request
from provisioner.model import (
    SANDBOX_QUEUED,
    SANDBOX_READY,
    SANDBOX_RELEASED,
    SANDBOX_STATUS,
    WAKE_UPS,
    Failure,
    Outcome,
    ProvisionerError,
    failed,
    fields_of,
)
from provisioner.ports import (
    LogLevel,
    Ports,
    StorageConflict,
    StorageError,
    StorageInvalidKey,
    StorageTooLarge,
)
from provisioner.temperfs import NONE as NO_CONVERSATION_STORAGE
from provisioner.temperfs import conversation_storage

# What the old module calls a sandbox it did not create (a static URL).
STATIC_SANDBOX_ID = "static-sandbox"
# The old module's messages, word for word (`run` and `provision_sandbox` in its lib.rs).
NOT_CONFIGURED = "agent not configured — user_message is empty"
NO_KEY = (
    "no sandbox_url configured and no e2b_api_key available — "
    "set sandbox_url via Configure or store e2b_api_key secret"
)
# SandboxReady's params: the record's fields but the cycle's own.
_CYCLE_FIELDS = ("state", "nonce", "since_ms")
# The entity's record as `status` shows it.
_STATUS_FIELDS = ("state", "sandbox_id", "attempts", "since_ms")
# A pending record outlives the longest a waiter may queue, then vanishes on its own.
_PENDING_GRACE_MS = 10 * 60 * 1000
_RECORD_CAS_TRIES = 4
_SETTLE_TRIES = 3


def _ready(record: EntityRecord) -> Outcome:
    fields = fields_of(record)
    return Outcome(SANDBOX_READY, {k: v for k, v in fields.items() if k not in _CYCLE_FIELDS})


def with_wake_ups(outcome: Outcome, controller: AdmissionController) -> Outcome:
    if not controller.wake_ups:
        return outcome
    wake_ups = []
    for wake in controller.wake_ups:
        entity_type, _, entity_id = wake.entity.partition("/")
        where = {"tenant": wake.tenant, "entity_type": entity_type, "entity_id": entity_id}
        wake_ups.append({**where, "at_ms": wake.at_ms, "reservation": wake.reservation})
    return replace(outcome, params={**outcome.params, WAKE_UPS: wake_ups})


class Operations:
    def __init__(self, request: Request, ports: Ports) -> None:
        self.request = request
        self.ports = ports
        config = read_config(request.config)
        self.settings = config.sandbox
        self.admission_config = config.admission
        self.resources = config.resources
        self.records = EntityRecords(ports.storage)
        self.waiter = Waiter(tenant=request.tenant, entity=request.entity)
        self.controller = AdmissionController(ports, config.admission)
        self.e2b = E2BClient(ports.http, config.sandbox)

    def _progress(self, event: str, **fields: Any) -> None:
        request = self.request
        self.ports.progress(
            {"event": event, "tenant": request.tenant, "entity": request.entity, **fields}
        )

    def _ensure_record(self) -> tuple[EntityRecord, int]:
        ttl_ms = self.admission_config.queue_timeout_ms + _PENDING_GRACE_MS
        for _ in range(_RECORD_CAS_TRIES):
            loaded = self.records.load(self.request.entity)
            if loaded is not None:
                return loaded
            nonce = f"{self.ports.random.next_u64():016x}"
            record = EntityRecord(state=PENDING, nonce=nonce, since_ms=self.ports.clock.now_ms())
            with contextlib.suppress(StorageConflict):
                return record, self.records.put(self.request.entity, record, None, ttl_ms)
        message = "the entity record kept changing; try again"
        raise ProvisionerError(FailureCode.STORAGE_CONTENTION, message, retryable=True)

    def _static_url(self) -> str:
        """The old module's order: the entity's field, the config's, the trigger param's."""
        param = self.request.trigger_params.get("sandbox_url")
        return (
            self.request.field_text("sandbox_url").strip()
            or self.settings.static_url
            or (param.strip() if isinstance(param, str) else "")
        )

    def _with_conversation(self, ready: Outcome) -> Outcome:
        """SandboxReady with the five TemperFS ids (empty when the setup is off or failed)."""
        made = NO_CONVERSATION_STORAGE
        if self.settings.temperfs_enabled:
            made = conversation_storage(self.ports, self.settings, self.request)
        return Outcome(ready.action, {**ready.params, **fields_of(made)})

    def provision(self) -> Outcome:
        if self.settings.temperfs_enabled and not self.request.field_text("user_message"):
            raise ProvisionerError(FailureCode.AGENT_NOT_CONFIGURED, NOT_CONFIGURED)
        url = self._static_url()
        if url:
            message = f"sandbox_provisioner: using static sandbox_url: {url}"
            self.ports.telemetry.log(LogLevel.INFO, message)
            # Described as a ready record (never stored), so SandboxReady reads one way.
            record = EntityRecord(READY, "", 0, sandbox_id=STATIC_SANDBOX_ID, sandbox_url=url)
        elif self.settings.api_key_source == "none":
            raise ProvisionerError(FailureCode.E2B_API_KEY_MISSING, NO_KEY)
        else:
            record, version = self._ensure_record()
            if record.state != READY:
                outcome = with_wake_ups(self._admitted(record, version), self.controller)
                if outcome.action != SANDBOX_READY:
                    return outcome
                return self._with_conversation(outcome)
        return self._with_conversation(_ready(record))

    def _admitted(self, record: EntityRecord, version: int) -> Outcome:
        timeout_ms = self.settings.sandbox_timeout_s * 1000
        decision: Grant | Queued | Rejected | None = self.controller.admit(self.waiter, timeout_ms)
        # The cycle's only create was refused outright: E2B made nothing to look for.
        made_nothing = False
        if isinstance(decision, Grant):
            grant, request = decision, self.request
            key = idempotency_key(request.tenant, request.entity, record.nonce)
            metadata = {
                "temper_tenant": request.tenant,
                "temper_entity_type": request.entity_type,
                "temper_entity_id": request.entity_id,
                "temper_idempotency_key": key,
            }
            try:
                result, info = self.e2b.create(idempotency_key=key, metadata=metadata)
            except Exception as error:
                # The slot goes back now, not at its lease's end; our fault: no shared backoff.
                failure = Failure(FailureCode.INTERNAL_ERROR, f"create failed: {error!r}", False)
                self._settle(grant, CreateFailed(failure))
                raise
            decision = self._settle(grant, result)
            if isinstance(result, Created) and info is not None:
                return self._record_ready(record, version, info, grant)
            made_nothing = grant.attempt == 1 and not isinstance(result, Unavailable)
        if isinstance(decision, Queued):
            return Outcome(SANDBOX_QUEUED, decision.params())
        if isinstance(decision, Rejected):
            # A create of this cycle may have made a sandbox whose answer was lost: kill
            # what its key finds before forgetting the key, or keep the record for the
            # release to find it.
            if made_nothing or self._kill_cycle(record)[1] is None:
                self._forget(version)
            return failed(decision.failure)
        raise ProvisionerError(FailureCode.INTERNAL_ERROR, "admission gave no decision")

    def _settle(self, grant: Grant, result: CreateResult) -> Grant | Queued | Rejected | None:
        """A settle that met a storage failure is safe to repeat, and returns the slot sooner."""
        for _ in range(_SETTLE_TRIES):
            decision = self.controller.settle(self.waiter, grant, result)
            if not (isinstance(decision, Queued) and decision.reason == REASON_STORAGE):
                break
        if isinstance(decision, Grant):
            # Admission never hands out a grant from a settle; if it did, give it back.
            return self.controller.settle(self.waiter, decision, Unavailable(status=None))
        return decision

    def _record_ready(
        self, record: EntityRecord, version: int, info: EntityRecord, grant: Grant
    ) -> Outcome:
        ready = replace(
            info,
            nonce=record.nonce,
            since_ms=self.ports.clock.now_ms(),
            attempts=max(record.attempts, grant.attempt),
            template_id=info.template_id or self.settings.template_id,
            queued_ms=grant.queued_ms,
        )
        ttl_ms = self.settings.sandbox_timeout_s * 1000
        try:
            self.records.put(self.request.entity, ready, version, ttl_ms)
        except StorageConflict:
            # Released while the create was in flight: the sandbox belongs to nobody now.
            kill_failure = self.e2b.kill(info.sandbox_id)
            with contextlib.suppress(Exception):
                # Left to the entity's release, where the failure answered below sends
                # it: that release frees the permit, or fails and is asked again.
                self.controller.release(self.waiter)
            message = "the entity was released while its sandbox was being created"
            if kill_failure is not None:
                message += f"; kill failed: {kill_failure.message}"
            return failed(Failure(FailureCode.RELEASED_DURING_CREATE, message, retryable=False))
        progress = {"attempts": ready.attempts, "queued_ms": ready.queued_ms}
        self._progress("sandbox_ready", sandbox_id=ready.sandbox_id, **progress)
        return _ready(ready)

    def _forget(self, version: int) -> None:
        with contextlib.suppress(StorageConflict):
            self.records.remove(self.request.entity, version)

    def release(self) -> Outcome:
        # A spec releasing from two states names one answer per target state (Releasing ->
        # Completed, Failing -> Failed), as the resource gates' released_action does.
        released = action_name(self.request.config, "released_action", SANDBOX_RELEASED)
        loaded = self.records.load(self.request.entity)
        params: dict[str, Any] = {"released": False}
        if loaded is None:
            params["held_permit"] = self.controller.release(self.waiter)
        else:
            doomed, refused = self._kill_cycle(loaded[0])
            if refused is not None:
                return refused
            # Raises when the gate cannot be written: the record stays, so the next release
            # frees the permit (forgotten, it would stay held until the sandbox timeout).
            self.controller.release(self.waiter)
            self._forget(loaded[1])
            self._progress("sandbox_released", sandbox_ids=doomed)
            params = {"released": bool(doomed), "sandbox_id": doomed[0] if doomed else None}
        return with_wake_ups(Outcome(released, params), self.controller)

    def _kill_cycle(self, record: EntityRecord) -> tuple[list[str], Outcome | None]:
        """Kill the recorded sandbox, or whatever the cycle's key made (a create may have
        succeeded unrecorded); the ids killed, and the failure that stopped it if any."""
        doomed = [record.sandbox_id]
        if record.state != READY:
            key = idempotency_key(self.request.tenant, self.request.entity, record.nonce)
            try:
                doomed = self.e2b.find_by_metadata("temper_idempotency_key", key)
            except Exception as error:  # HttpError: the kill would fail too
                message = f"could not list sandboxes: {error}"
                return [], failed(Failure(FailureCode.E2B_UNAVAILABLE, message, retryable=True))
        for sandbox_id in doomed:
            failure = self.e2b.kill(sandbox_id)
            if failure is not None:
                return doomed, failed(failure, sandbox_id=sandbox_id)
        return doomed, None

    def status(self) -> Outcome:
        loaded = self.records.load(self.request.entity)
        entity: dict[str, Any] | None = None
        if loaded is not None:
            entity = {name: getattr(loaded[0], name) for name in _STATUS_FIELDS}
            entity["sandbox_id"] = entity["sandbox_id"] or None  # none made yet
        gates = self.controller.status(self.request.tenant)
        params: dict[str, Any] = {"entity": entity, "gates": gates}
        if self.resources:
            params["resources"] = resource_snapshot(self.ports, self.resources, self.request.tenant)
        return Outcome(SANDBOX_STATUS, params)


def dispatch(request: Request, ports: Ports) -> Outcome:
    if is_resource_request(request):
        return dispatch_resource(request, ports)
    operations = Operations(request, ports)
    if request.operation == "release":
        return operations.release()
    if request.operation == "status":
        return operations.status()
    try:
        return operations.provision()
    except (StorageInvalidKey, StorageTooLarge):
        raise  # the request's fault, not an outage: app.run makes it a typed failure
    except StorageError:
        # Fail closed and keep waiting: a SandboxFailed would end the session (Temper routes
        # it to Failed), SandboxQueued keeps it polling until storage answers again.
        return Outcome(SANDBOX_QUEUED, storage_queued(ports, operations.admission_config).params())
