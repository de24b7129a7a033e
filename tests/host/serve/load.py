"""Jobs that keep retrying against a real `serve`, the way the Temper shim's routes would:
after a 503 they wait its Retry-After, after SandboxQueued its retry_after_ms."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ROOT
from tests.host.serve.serve_process import TOKEN


def job_context(entity_id: str, config: dict[str, str], tenant: str = "acme") -> dict[str, Any]:
    return {
        "tenant": tenant,
        "entity_type": "CurationJob",
        "entity_id": entity_id,
        "trigger_action": "Provision",
        "trigger_params": {},
        "entity_state": {},
        "integration_config": {"operation": "provision", "template_id": "base", **config},
    }


TRANSPORT_RETRIES = 3
# Below uvicorn's keep-alive timeout (5 s): the client drops an idle connection before the
# server closes it, so a request is never sent on a connection the server just closed.
KEEPALIVE_EXPIRY_S = 2.0


@dataclass
class LoadRecord:
    statuses: list[int] = field(default_factory=list)
    retry_after_missing: int = 0
    actions: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)  # SandboxQueued reasons
    sandboxes: dict[str, str] = field(default_factory=dict)  # entity -> sandbox id
    unexpected: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)  # entities cut off (service gone)
    transport_errors: list[str] = field(default_factory=list)  # no answer: retried


async def keep_retrying(
    http: httpx.AsyncClient,
    entity_id: str,
    config: dict[str, str],
    record: LoadRecord,
    start: asyncio.Event,
) -> None:
    await start.wait()
    body = job_context(entity_id, config)
    failures_in_a_row = 0
    while True:
        try:
            response = await http.post("/v1/invocations", json=body)
        except httpx.TransportError as error:
            # What the shim reports as ProvisionerUnreachable, which the spec routes to a
            # retry; the service gone for good (refused several times) ends the job.
            record.transport_errors.append(type(error).__name__)
            failures_in_a_row += 1
            if failures_in_a_row >= TRANSPORT_RETRIES:
                record.stopped.append(entity_id)
                return
            await asyncio.sleep(1.0)
            continue
        failures_in_a_row = 0
        record.statuses.append(response.status_code)
        if response.status_code == 503:
            retry_after = response.headers.get("retry-after")
            if retry_after is None:
                record.retry_after_missing += 1
                return
            await asyncio.sleep(float(retry_after))
            continue
        if response.status_code != 200:
            record.unexpected.append(f"{entity_id}: {response.status_code} {response.text[:200]}")
            return
        answer = response.json()
        action = answer.get("action", "?")
        record.actions[action] = record.actions.get(action, 0) + 1
        if action == "SandboxReady":
            record.sandboxes[entity_id] = answer["params"]["sandbox_id"]
            return
        if action != "SandboxQueued":
            record.unexpected.append(f"{entity_id}: {json.dumps(answer)[:300]}")
            return
        reason = str(answer["params"].get("reason"))
        record.reasons[reason] = record.reasons.get(reason, 0) + 1
        await asyncio.sleep(int(answer["params"]["retry_after_ms"]) / 1000)


async def run_jobs(
    url: str, entities: list[str], config: dict[str, str], record: LoadRecord, timeout_s: float
) -> None:
    """All jobs start at once (one event, a connection each, kept alive) and keep retrying."""
    limits = httpx.Limits(
        max_connections=len(entities) + 10,
        max_keepalive_connections=len(entities) + 10,
        keepalive_expiry=KEEPALIVE_EXPIRY_S,
    )
    async with httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=150.0,
        limits=limits,
    ) as http:
        start = asyncio.Event()
        tasks = [
            asyncio.create_task(keep_retrying(http, entity, config, record, start))
            for entity in entities
        ]
        start.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout_s)


def status_json(storage: str, *config: str) -> dict[str, Any]:
    """`sandbox-provisioner status --json`, as an operator runs it."""
    args = [sys.executable, "-m", "host.cli", "status", "--storage", storage, "--json"]
    for item in config:
        args += ["--config", item]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


def status_table(storage: str, *config: str) -> str:
    args = [sys.executable, "-m", "host.cli", "status", "--storage", storage]
    for item in config:
        args += ["--config", item]
    done = subprocess.run(
        args,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    return done.stdout


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"
