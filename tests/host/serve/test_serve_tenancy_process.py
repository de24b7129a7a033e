"""A real `serve --tenants` process with the component, SQLite and the mock E2B: tenants
act only for themselves (a forged tenant changes nothing stored), `status` shows a tenant
its own figures, SIGHUP reloads the clients, and slow or oversized senders are cut off."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.mocks.e2b import MockE2BServer
from tests.host.serve.raw_socket import read_until_closed
from tests.host.serve.serve_process import ServeProcess, ServingAMock
from tests.host.serve.tenancy_support import (
    OPERATOR_TOKEN,
    T1_TOKEN,
    T2_TOKEN,
    client_toml,
    tenants_toml,
    write_tenants,
)

pytestmark = [pytest.mark.component, pytest.mark.slow]
READ_TIMEOUT_S = 1.5


def context(tenant: str, entity: str, operation: str = "provision") -> dict[str, Any]:
    return {
        "tenant": tenant,
        "entity_type": "CurationJob",
        "entity_id": entity,
        "trigger_action": "Provision",
        "trigger_params": {},
        "entity_state": {},
        # One sandbox for the whole account: the second tenant's create waits.
        "integration_config": {"operation": operation, "template_id": "base", "max_sandboxes": "1"},
    }


@contextmanager
def serving_tenants(
    serving_mock: ServingAMock, tmp_path: Path, extra: list[str]
) -> Iterator[tuple[MockE2BServer, ServeProcess]]:
    """The mock E2B and a `serve --tenants` on SQLite (`tmp_path/s.db`) in front of it."""
    with serving_mock(extra=["--tenants", str(tmp_path / "tenants.toml"), *extra]) as (
        mock,
        serve,
    ):
        yield mock, serve


def stored(db: Path) -> list[str]:
    with sqlite3.connect(db) as connection:
        return list(connection.iterdump())


def invoke(serve: ServeProcess, token: str, body: dict[str, Any]) -> httpx.Response:
    with serve.client(token=token) as http:
        return http.post("/v1/invocations", json=body)


def metric_text(serve: ServeProcess, token: str) -> str:
    with serve.client(token=token) as http:
        response = http.get("/metrics")
        assert response.status_code == 200
        return response.text


def test_tenants_act_only_for_themselves_through_a_real_serve(
    tmp_path: Path, serving_mock: ServingAMock
) -> None:
    db = tmp_path / "s.db"
    write_tenants(tmp_path / "tenants.toml")
    with serving_tenants(serving_mock, tmp_path, []) as (mock, serve):
        ready = invoke(serve, T1_TOKEN, context("t1", "job-t1"))
        assert ready.status_code == 200 and ready.json()["action"] == "SandboxReady"
        queued = invoke(serve, T2_TOKEN, context("t2", "job-t2"))
        assert queued.status_code == 200 and queued.json()["action"] == "SandboxQueued"

        # t1's token names t2: release t2's entity, ask its status, provision as t2.
        before, sandboxes = stored(db), mock.running_sandboxes()
        for operation, entity in [
            ("release", "job-t2"),
            ("status", "job-t2"),
            ("provision", "job-x"),
        ]:
            forged = invoke(serve, T1_TOKEN, context("t2", entity, operation))
            assert forged.status_code == 403, operation
            assert forged.json()["error"]["code"] == "forbidden_tenant"
        assert stored(db) == before
        assert mock.running_sandboxes() == sandboxes
        events = serve.wait_for_events(
            lambda es: sum(e.get("code") == "forbidden_tenant" for e in es) == 3
        )
        assert all(
            e["client"] == "client-one" and e["tenant"] == "t2"
            for e in events
            if e.get("code") == "forbidden_tenant"
        )
        assert T1_TOKEN not in "\n".join(serve.seen)
        ops_metrics = metric_text(serve, OPERATOR_TOKEN)
        assert 'sandbox_provisioner_forbidden_tenant_total{client="client-one"} 3.0' in ops_metrics

        # status: a tenant sees its own entity and figures, and the account's.
        own = invoke(serve, T1_TOKEN, context("t1", "job-t1", "status")).json()["params"]
        assert own["entity"]["sandbox_id"] == ready.json()["params"]["sandbox_id"]
        account, tenant = own["gates"]["account"], own["gates"]["tenant"]
        assert account["queue_length"] == 1 and account["capacity"]["in_use"] == 1
        assert tenant["tenant"] == "t1" and tenant["queued"] == 0
        assert "job-t2" not in json.dumps(own)
        theirs = invoke(serve, T2_TOKEN, context("t2", "job-t2", "status")).json()["params"]
        assert theirs["gates"]["tenant"]["queued"] == 1
        assert "job-t1" not in json.dumps(theirs)
        # the operator acts for either
        for tenant_name in ("t1", "t2"):
            answer = invoke(
                serve, OPERATOR_TOKEN, context(tenant_name, f"job-{tenant_name}", "status")
            )
            assert answer.status_code == 200 and answer.json()["params"]["entity"] is not None

        # /metrics: each tenant's client sees its own tenant's series only
        one, ops = metric_text(serve, T1_TOKEN), metric_text(serve, OPERATOR_TOKEN)
        assert 'tenant="t1"' in one and 'tenant="t2"' not in one
        assert 'tenant="t1"' in ops and 'tenant="t2"' in ops
        assert "sandbox_provisioner_queue_length 1.0" in one  # account figures stay


def test_sighup_reloads_the_clients_and_a_broken_file_keeps_the_old_ones(
    tmp_path: Path, serving_mock: ServingAMock
) -> None:
    tenants = write_tenants(tmp_path / "tenants.toml")
    newcomer = "newcomer-token-0123456789"
    with serving_tenants(serving_mock, tmp_path, []) as (_, serve):
        assert invoke(serve, newcomer, context("t3", "j")).status_code == 401
        tenants.write_text(tenants_toml() + client_toml(newcomer, "t3"))
        serve.process.send_signal(signal.SIGHUP)
        serve.wait_for_events(lambda es: any(e.get("event") == "tenants_reloaded" for e in es))
        assert invoke(serve, newcomer, context("t3", "j", "status")).status_code == 200

        tenants.write_text("[[client]\nbroken")
        serve.process.send_signal(signal.SIGHUP)
        events = serve.wait_for_events(
            lambda es: any(e.get("event") == "tenants_reload_failed" for e in es)
        )
        [failed] = [e for e in events if e.get("event") == "tenants_reload_failed"]
        assert "not TOML" in failed["error"]
        assert invoke(serve, newcomer, context("t3", "j", "status")).status_code == 200
        assert invoke(serve, T2_TOKEN, context("t2", "j", "status")).status_code == 200
        assert serve.process.poll() is None


def test_slow_and_oversized_senders_are_cut_off(tmp_path: Path, serving_mock: ServingAMock) -> None:
    write_tenants(tmp_path / "tenants.toml")
    with serving_tenants(serving_mock, tmp_path, ["--read-timeout", str(READ_TIMEOUT_S)]) as (
        mock,
        serve,
    ):
        address = ("127.0.0.1", serve.port)
        head = (
            f"POST /v1/invocations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {T1_TOKEN}\r\n"
            "Content-Type: application/json\r\n"
        ).encode()

        # A head sent one byte every 0.2 s: closed once the read timeout is up, unanswered.
        with socket.create_connection(address) as slow_head:
            started, closed = time.monotonic(), False
            for byte in head:
                try:
                    slow_head.sendall(bytes([byte]))
                except OSError:
                    closed = True
                    break
                time.sleep(0.2)
                if time.monotonic() - started > READ_TIMEOUT_S * 10:
                    break
            if not closed:
                received, _ = read_until_closed(slow_head, READ_TIMEOUT_S * 5)
                assert received == b""
            assert time.monotonic() - started < READ_TIMEOUT_S * 10

        # A body that stops halfway: 408 once the read timeout is up, then closed.
        with socket.create_connection(address) as slow_body:
            slow_body.sendall(head + b"Content-Length: 100\r\n\r\n" + b'{"tenant": ')
            received, seconds = read_until_closed(slow_body, READ_TIMEOUT_S * 10)
            assert received.startswith(b"HTTP/1.1 408 ")
            assert b'"body_timeout"' in received
            assert READ_TIMEOUT_S * 0.9 <= seconds < READ_TIMEOUT_S * 10

        # A declared 2 MiB body: 413 before a byte of it is sent.
        with socket.create_connection(address) as big:
            big.sendall(head + f"Content-Length: {2 * 1024 * 1024}\r\n\r\n".encode())
            received, _ = read_until_closed(big, READ_TIMEOUT_S * 10)
            assert received.startswith(b"HTTP/1.1 413 ")
            assert b'"too_large"' in received

        # An idle connection that never sends a byte is closed too.
        with socket.create_connection(address) as idle:
            received, seconds = read_until_closed(idle, READ_TIMEOUT_S * 10)
            assert received == b"" and seconds >= READ_TIMEOUT_S * 0.9

        assert mock.stats().requests_total == 0
        assert invoke(serve, T1_TOKEN, context("t1", "job-ok", "status")).status_code == 200
