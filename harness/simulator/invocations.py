"""Temper-shaped invocation contexts for a CurationJob session."""

from __future__ import annotations

import json
from typing import Any

from harness.simulator.model import Job
from provisioner.model import Invocation

ENTITY_TYPE = "CurationJob"
PROVISION = "provision"
RELEASE = "release"


def with_operation(
    config: tuple[tuple[str, str], ...], operation: str
) -> tuple[tuple[str, str], ...]:
    return (*((k, v) for k, v in config if k != "operation"), ("operation", operation))


def job_invocation(
    job: Job,
    *,
    operation: str,
    trigger_action: str,
    trigger_params: dict[str, Any],
    entity_state: dict[str, Any],
    config: tuple[tuple[str, str], ...],
    run_id: str,
) -> Invocation:
    """What the Temper runtime hands a WASM integration when `trigger_action` fires."""
    return Invocation(
        tenant=job.tenant,
        entity_type=ENTITY_TYPE,
        entity_id=job.id,
        trigger_action=trigger_action,
        trigger_params=json.dumps(trigger_params, sort_keys=True),
        entity_state=json.dumps(entity_state, sort_keys=True),
        config=with_operation(config, operation),
        session_id=f"session-{run_id}-{job.id}",
        trace_id=f"{run_id}-{job.id}",
    )
