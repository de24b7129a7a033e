"""The sandbox operations: provision, release and status (the resource gates' acquire,
settle and release-with-a-resource are in `provisioner.gates.resource`).

Order matters for "nothing is lost": the entity record (and so the idempotency key) is
written before any create is sent, and the record is deleted only after E2B confirmed the
kill, so a crash at any point leaves state from which the next invocation recovers.
"""

from __future__ import annotations

import contextlib
from typing import Any

from provisioner.config import read_config
from provisioner.e2b import E2BClient, SandboxInfo
from provisioner.entity_records import (
    PENDING,
    READY,
    EntityRecord,
    EntityRecords,
    idempotency_key,
)
from provisioner.failures import FailureCode
from provisioner.gates.cas import storage_queued
from provisioner.gates.controller import AdmissionController
from provisioner.gates.resource import dispatch_resource, is_resource_request
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

# A pending record outlives the longest a waiter may queue, then vanishes on its own.
_PENDING_GRACE_MS = 10 * 60 * 1000
_RECORD_CAS_TRIES = 4
_SETTLE_TRIES = 3


def _ready(record: EntityRecord) -> Outcome:
    return Outcome(
        action=SANDBOX_READY,
        params={
            "sandbox_url": record.sandbox_url,
            "sandbox_id": record.sandbox_id,
            "template_id": record.template_id,
            "client_id": record.client_id,
            "envd_version": record.envd_version,
            "attempts": record.attempts,
            "queued_ms": record.queued_ms,
        },
    )


def with_wake_ups(outcome: Outcome, controller: AdmissionController) -> Outcome:
    if not controller.wake_ups:
        return outcome
    wake_ups = []
    for wake in controller.wake_ups:
        entity_type, _, entity_id = wake.entity.partition("/")
        wake_ups.append(
            {
                "tenant": wake.tenant,
                "entity_type": entity_type,
                "entity_id": entity_id,
                "at_ms": wake.at_ms,
                "reservation": wake.reservation,
            }
        )
    return Outcome(
        outcome.action, {**outcome.params, WAKE_UPS: wake_ups}, outcome.success, outcome.error
    )


def _queued(queued: Queued) -> Outcome:
    return Outcome(action=SANDBOX_QUEUED, params=queued.params())


def _rejected(rejected: Rejected) -> Outcome:
    return failed(rejected.failure)


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

    def _metadata(self, key: str) -> dict[str, str]:
        return {
            "temper_tenant": self.request.tenant,
            "temper_entity_type": self.request.entity_type,
            "temper_entity_id": self.request.entity_id,
            "temper_idempotency_key": key,
        }

    def _pending_ttl_ms(self) -> int:
        return self.admission_config.queue_timeout_ms + _PENDING_GRACE_MS

    def _ensure_record(self) -> tuple[EntityRecord, int]:
        for _ in range(_RECORD_CAS_TRIES):
            loaded = self.records.load(self.request.entity)
            if loaded is not None:
                return loaded
            nonce = f"{self.ports.random.next_u64():016x}"
            record = EntityRecord(state=PENDING, nonce=nonce, since_ms=self.ports.clock.now_ms())
            try:
                version = self.records.put(
                    self.request.entity, record, None, self._pending_ttl_ms()
                )
            except StorageConflict:
                continue
            return record, version
        raise ProvisionerError(
            FailureCode.STORAGE_CONTENTION,
            "the entity record kept changing; try again",
            retryable=True,
        )

    def _static_url(self) -> str:
        """The old module's order: the entity's `sandbox_url` field, the config's, the
        trigger param's (an empty or non-string value counts as absent)."""
        param = self.request.trigger_params.get("sandbox_url")
        return (
            self.request.field_text("sandbox_url").strip()
            or self.settings.static_url
            or (param.strip() if isinstance(param, str) else "")
        )

    def _with_conversation(self, ready: Outcome) -> Outcome:
        """SandboxReady with the five TemperFS ids (empty when the setup is off or failed)."""
        request = self.request
        params = dict(ready.params)
        if self.settings.temperfs_enabled:
            agent_id = request.entity_state.get("entity_id")
            made = conversation_storage(
                self.ports,
                base_url=self.settings.temper_api_url,
                tenant=request.tenant,
                entity=request.entity,
                agent_id=agent_id if isinstance(agent_id, str) and agent_id else request.entity_id,
                user_message=request.field_text("user_message"),
                timeout_ms=self.settings.request_timeout_ms,
            )
            params.update(made.params())
        else:
            params.update(NO_CONVERSATION_STORAGE.params())
        return Outcome(ready.action, params)

    def provision(self) -> Outcome:
        if self.settings.temperfs_enabled and not self.request.field_text("user_message"):
            raise ProvisionerError(FailureCode.AGENT_NOT_CONFIGURED, NOT_CONFIGURED)
        static_url = self._static_url()
        if static_url:
            self.ports.telemetry.log(
                LogLevel.INFO, f"sandbox_provisioner: using static sandbox_url: {static_url}"
            )
            # Described as a ready record (never stored), so SandboxReady reads one way.
            static = EntityRecord(
                READY, nonce="", since_ms=0, sandbox_id=STATIC_SANDBOX_ID, sandbox_url=static_url
            )
            return self._with_conversation(_ready(static))
        if self.settings.api_key_source == "none":
            raise ProvisionerError(FailureCode.E2B_API_KEY_MISSING, NO_KEY)
        outcome = self._provision_e2b()
        return self._with_conversation(outcome) if outcome.action == SANDBOX_READY else outcome

    def _provision_e2b(self) -> Outcome:
        record, version = self._ensure_record()
        if record.state == READY:
            return _ready(record)
        controller = AdmissionController(self.ports, self.admission_config)
        return with_wake_ups(self._admitted(controller, record, version), controller)

    def _admitted(
        self, controller: AdmissionController, record: EntityRecord, version: int
    ) -> Outcome:
        decision: Grant | Queued | Rejected | None = controller.admit(
            self.waiter, self.settings.sandbox_timeout_s * 1000
        )
        if isinstance(decision, Grant):
            grant = decision
            key = idempotency_key(self.request.tenant, self.request.entity, record.nonce)
            try:
                result, info = E2BClient(self.ports.http, self.settings).create(
                    idempotency_key=key, metadata=self._metadata(key)
                )
            except Exception as error:
                # The slot goes back now rather than when its lease runs out; the fault is
                # ours, not E2B's, so no shared backoff.
                failure = Failure(
                    FailureCode.INTERNAL_ERROR, f"create failed: {error!r}", retryable=False
                )
                self._settle(controller, grant, CreateFailed(failure))
                raise
            record = record.with_attempt(grant.attempt)
            decision = self._settle(controller, grant, result)
            if isinstance(result, Created) and info is not None:
                return self._record_ready(controller, record, version, info, grant.queued_ms)
        if isinstance(decision, Queued):
            return _queued(decision)
        if isinstance(decision, Rejected):
            self._forget(version)
            return _rejected(decision)
        raise ProvisionerError(FailureCode.INTERNAL_ERROR, "admission gave no decision")

    def _settle(
        self, controller: AdmissionController, grant: Grant, result: CreateResult
    ) -> Grant | Queued | Rejected | None:
        """Settle a grant; a settle that met a storage failure is safe to repeat, and
        repeating it now returns the create slot sooner than its lease expiry would."""
        decision = controller.settle(self.waiter, grant, result)
        for _ in range(_SETTLE_TRIES - 1):
            if not (isinstance(decision, Queued) and decision.reason == REASON_STORAGE):
                break
            decision = controller.settle(self.waiter, grant, result)
        if isinstance(decision, Grant):
            # Admission never hands out a grant from a settle; if it did, give it back.
            return controller.settle(self.waiter, decision, Unavailable(status=None))
        return decision

    def _record_ready(
        self,
        controller: AdmissionController,
        record: EntityRecord,
        version: int,
        info: SandboxInfo,
        queued_ms: int,
    ) -> Outcome:
        ready = EntityRecord(
            state=READY,
            nonce=record.nonce,
            since_ms=self.ports.clock.now_ms(),
            attempts=record.attempts,
            sandbox_id=info.sandbox_id,
            template_id=info.template_id or self.settings.template_id,
            client_id=info.client_id,
            envd_version=info.envd_version,
            queued_ms=queued_ms,
            sandbox_url=info.sandbox_url,
        )
        try:
            self.records.put(
                self.request.entity, ready, version, self.settings.sandbox_timeout_s * 1000
            )
        except StorageConflict:
            # Released while the create was in flight: the sandbox belongs to nobody now.
            kill_failure = E2BClient(self.ports.http, self.settings).kill(info.sandbox_id)
            controller.release(self.waiter)
            return failed(
                Failure(
                    FailureCode.RELEASED_DURING_CREATE,
                    "the entity was released while its sandbox was being created"
                    + ("" if kill_failure is None else f"; kill failed: {kill_failure.message}"),
                    retryable=False,
                )
            )
        self.ports.telemetry.progress(
            {
                "event": "sandbox_ready",
                "tenant": self.request.tenant,
                "entity": self.request.entity,
                "sandbox_id": info.sandbox_id,
                "attempts": record.attempts,
                "queued_ms": queued_ms,
            }
        )
        return _ready(ready)

    def _forget(self, version: int) -> None:
        with contextlib.suppress(StorageConflict):
            self.records.remove(self.request.entity, version)

    def release(self) -> Outcome:
        loaded = self.records.load(self.request.entity)
        controller = AdmissionController(self.ports, self.admission_config)
        if loaded is None:
            held = controller.release(self.waiter)
            released = Outcome(SANDBOX_RELEASED, {"released": False, "held_permit": held})
            return with_wake_ups(released, controller)
        record, version = loaded
        client = E2BClient(self.ports.http, self.settings)
        if record.state == READY:
            doomed = [record.sandbox_id]
        else:
            # A create may have succeeded without being recorded (a crash mid-create):
            # find it by the idempotency key it carries, so no sandbox is orphaned.
            key = idempotency_key(self.request.tenant, self.request.entity, record.nonce)
            try:
                doomed = client.find_by_metadata("temper_idempotency_key", key)
            except Exception as error:  # HttpError: the kill would fail too
                return failed(
                    Failure(
                        FailureCode.E2B_UNAVAILABLE,
                        f"could not list sandboxes: {error}",
                        retryable=True,
                    )
                )
        for sandbox_id in doomed:
            failure = client.kill(sandbox_id)
            if failure is not None:
                return failed(failure, sandbox_id=sandbox_id)
        controller.release(self.waiter)
        self._forget(version)
        self.ports.telemetry.progress(
            {
                "event": "sandbox_released",
                "tenant": self.request.tenant,
                "entity": self.request.entity,
                "sandbox_ids": doomed,
            }
        )
        released = Outcome(
            SANDBOX_RELEASED,
            {"released": bool(doomed), "sandbox_id": doomed[0] if doomed else None},
        )
        return with_wake_ups(released, controller)

    def status(self) -> Outcome:
        loaded = self.records.load(self.request.entity)
        entity: dict[str, Any] | None = None
        if loaded is not None:
            record = loaded[0]
            entity = {
                "state": record.state,
                "sandbox_id": record.sandbox_id or None,
                "attempts": record.attempts,
                "since_ms": record.since_ms,
            }
        gates = AdmissionController(self.ports, self.admission_config).status(self.request.tenant)
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
        # Fail closed and keep waiting. Under Temper's rules a SandboxFailed ends the
        # session (the spec routes it to Failed, and a sandbox a held create made during
        # the outage is then never adopted); SandboxQueued keeps it polling on the spec's
        # timer until storage answers again.
        return _queued(storage_queued(ports, operations.admission_config))
