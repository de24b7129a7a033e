"""The HTTP surface of `sandbox-provisioner serve` (Starlette).

- `POST /v1/invocations`: a Temper invocation context (the JSON `invoke` reads) in; the
  outcome as a Temper terminal result out (`results.py`). 200 for every outcome the
  component produced, 400 for a malformed context, 413 past 1 MiB, 503 with
  `Retry-After` when every worker is busy (nothing ran), and 503 with `Retry-After` and
  `Connection: close` once the service is draining (nothing ran).
- `GET /healthz`: the process is up. `GET /readyz`: the component is compiled, the storage
  takes a write, the gateway would not refuse the E2B URL, and the process is not draining
  (`readiness.py`).
- `GET /metrics`: Prometheus exposition (`metrics.py`), when the service has metrics.
- `GET /openapi.json`: the OpenAPI description of these routes (`openapi.py`).
- Every route but the two health routes and the OpenAPI document needs `Authorization:
  Bearer <token>` of a known client (`tenants.py`, `access.py`); a missing or wrong token
  is 401 before anything else happens, and a context naming a tenant the client does not
  cover is 403 `forbidden_tenant` before anything runs. `/metrics` shows a tenant's client
  only its own tenants' labelled series. Bodies, read times and repeated refusals are
  bounded (`bounds.py`).
- Every refusal is JSON, `{"error": {"code", "message"}}` (`errors.py`), and is logged as
  one `refused` line with its status, code and reason (never a header, so never the
  token).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Scope

from host.runtime.temper_context import MAX_CONTEXT_BYTES, InvalidContext, parse_context
from host.serve.access import BearerTokenGate, Refusals, caller, forbidden_tenant, label_filter
from host.serve.bounds import BODY_TIMEOUT_S, BodyBounds, RefusalLimiter
from host.serve.errors import error_response as _error
from host.serve.hold import PACE_CONFIG_KEYS, InvalidHoldConfig
from host.serve.metrics import CONTENT_TYPE, ServeMetrics
from host.serve.openapi import OPENAPI
from host.serve.pace import AnswerAndWake
from host.serve.pacing import ServePace
from host.serve.pool import InvocationPool
from host.serve.results import temper_result
from host.serve.tenants import Client, TenantAccess
from provisioner.model import Failure, Invocation, Outcome, failed

LOG = logging.getLogger("sandbox_provisioner.serve")
# Config keys that address the service itself: the shim's, not the component's.
SHIM_CONFIG_KEYS = frozenset({"provisioner_url", "provisioner_token"})


@dataclass
class ServeState:
    token: str  # the operator token when `access` is None
    pool: InvocationPool
    invoke: Callable[[Invocation], Outcome]
    e2b_url: str
    storage_probe: Callable[[], None]
    retry_after_s: int = 1
    # Why the gateway would refuse every E2B request (None: it would not).
    e2b_refusal: Callable[[], str | None] = lambda: None
    draining: bool = False
    metrics: ServeMetrics | None = None
    # The integration config of the latest invocation the component did not refuse as
    # invalid (the gates' limits depend on it); empty until one arrives. The metrics' gate
    # collector inspects the gates with it.
    settings: dict[str, str] = field(default_factory=dict)
    # Held answers and wake-ups (host/serve/pacing.py); None: every answer at once.
    pace: ServePace | None = None
    log: Callable[[dict[str, Any]], None] = field(
        default=lambda line: LOG.info(json.dumps(line, sort_keys=True))
    )
    # The clients and the tenants each may act for (`--tenants`); None: `token` alone, as
    # an operator.
    access: TenantAccess | None = None
    limiter: RefusalLimiter = field(default_factory=RefusalLimiter)
    body_timeout_s: float = BODY_TIMEOUT_S

    def tenant_access(self) -> TenantAccess:
        if self.access is None:
            self.access = TenantAccess.single_operator(self.token)
        return self.access

    def refusals(self) -> Refusals:
        def count(code: str, client: Client | None) -> None:
            if self.metrics is not None:
                self.metrics.observe_refusal(code, None if client is None else client.name)

        return Refusals(self.limiter, self.log, count)


def log_refusal(state: ServeState, scope: Scope, status: int, code: str, message: str) -> None:
    """One log line per refused request: what was refused and why. Only the method, the
    path and the peer are read from the request: never a header, so never the token."""
    client = scope.get("client")
    state.log(
        {
            "event": "refused",
            "method": scope.get("method", ""),
            "path": scope.get("path", ""),
            "client": f"{client[0]}:{client[1]}" if client else None,
            "status": status,
            "code": code,
            "reason": message,
        }
    )


def prepare(invocation: Invocation, e2b_url: str) -> Invocation:
    """Drop the shim's and the service's own keys (the token must not reach the component)
    and point the guest at the host's E2B URL unless the context names one (as `invoke`
    does)."""
    own = SHIM_CONFIG_KEYS | PACE_CONFIG_KEYS
    config = tuple((k, v) for k, v in invocation.config if k not in own)
    if not any(key == "e2b_api_url" for key, _ in config):
        config = (*config, ("e2b_api_url", e2b_url))
    return replace(invocation, config=config)


def remember_settings(state: ServeState, invocation: Invocation, outcome: Outcome) -> None:
    # An invalid config is answered invalid_config; the metrics keep the last good one.
    if outcome.error is None or outcome.error.code != "invalid_config":
        state.settings = dict(invocation.config)


def asks_for_inspection(invocation: Invocation) -> bool:
    """`operation = inspect` names every tenant's waiters: only the host may ask for it."""
    operation = dict(invocation.config).get("operation", "")
    return operation.strip().lower() == "inspect"


def create_app(state: ServeState) -> ASGIApp:
    refusals = state.refusals()

    def refuse(
        request: Request, status: int, code: str, message: str, **headers: str
    ) -> JSONResponse:
        log_refusal(state, request.scope, status, code, message)
        return _error(status, code, message, **headers)

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        if state.draining:
            return JSONResponse({"status": "draining"}, 503)
        try:
            await asyncio.get_running_loop().run_in_executor(None, state.storage_probe)
        except Exception as error:
            return JSONResponse(
                {"status": "unready", "storage": f"{type(error).__name__}: {error}"[:300]}, 503
            )
        refused = await asyncio.get_running_loop().run_in_executor(None, state.e2b_refusal)
        if refused is not None:
            return JSONResponse({"status": "unready", "storage": "ok", "e2b": refused}, 503)
        return JSONResponse(
            {"status": "ready", "component": "compiled", "storage": "ok", "e2b": "ok"}
        )

    async def invocations(request: Request) -> Response:
        if state.draining:
            # A request that reaches a draining service (on a connection kept alive, or
            # accepted just before the listener closed) goes elsewhere: answering it would
            # keep the connection, and so the drain, open for as long as its client polls.
            return refuse(
                request,
                503,
                "draining",
                "the service is shutting down",
                **{"Retry-After": str(state.retry_after_s), "Connection": "close"},
            )
        body = await request.body()
        if len(body) > MAX_CONTEXT_BYTES:
            return refuse(
                request, 413, "too_large", f"the context is larger than {MAX_CONTEXT_BYTES} bytes"
            )
        try:
            context = parse_context(body.decode("utf-8"))
        except UnicodeDecodeError:
            return refuse(request, 400, "invalid_context", "the context is not UTF-8")
        except InvalidContext as invalid:
            return refuse(request, 400, "invalid_context", str(invalid))
        invocation = prepare(context, state.e2b_url)
        refused = forbidden_tenant(request, refusals, invocation.tenant, invocation.entity_id)
        if refused is not None:
            return refused
        if asks_for_inspection(invocation):
            return JSONResponse(
                temper_result(
                    failed(
                        Failure(
                            "unknown_operation",
                            "operation 'inspect' is the host's; an invocation may not ask it",
                            False,
                        )
                    )
                )
            )
        started = time.monotonic()
        try:
            hold_until = state.pace.hold_until_ms(dict(context.config)) if state.pace else 0
        except InvalidHoldConfig as invalid:
            return JSONResponse(
                temper_result(failed(Failure("invalid_config", str(invalid), False)))
            )

        def run() -> tuple[Outcome, float]:
            begun = time.monotonic()
            outcome = state.invoke(invocation)
            return outcome, time.monotonic() - begun

        async def call_component() -> Outcome | None:
            future = state.pool.try_submit(run)
            if future is None:
                return None
            outcome, seconds = await asyncio.wrap_future(future)
            remember_settings(state, invocation, outcome)
            if state.metrics is not None:
                state.metrics.observe_invocation(outcome, seconds, invocation.tenant)
            return outcome

        outcome = await call_component()
        if outcome is None:
            if state.metrics is not None:
                state.metrics.observe_saturated()
            return refuse(
                request,
                503,
                "saturated",
                f"all {state.pool.workers} workers are busy",
                **{"Retry-After": str(state.retry_after_s)},
            )
        calls, held_s, wake_at_ms = 1, 0.0, None
        if state.pace is not None:
            answer = await state.pace.settle(
                invocation, outcome, call_component, hold_until, request.is_disconnected
            )
            outcome, calls, held_s = answer.outcome, answer.calls, answer.held_s
            if isinstance(answer.step, AnswerAndWake):
                wake_at_ms = answer.step.at_ms
        result = temper_result(outcome)
        failure = outcome.error
        state.log(
            {
                "event": "invocation",
                "tenant": invocation.tenant,
                "entity_type": invocation.entity_type,
                "entity_id": invocation.entity_id,
                "trigger_action": invocation.trigger_action,
                "action": outcome.action,
                "success": outcome.success,
                "reason": outcome.params.get("reason") or (failure.code if failure else None),
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
                "component_calls": calls,
                "held_ms": round(held_s * 1000, 1),
                "wake_at_ms": wake_at_ms,
                "trace_id": invocation.trace_id,
            }
        )
        return JSONResponse(result)

    async def metrics(request: Request) -> Response:
        exposition = state.metrics
        if exposition is None:
            return refuse(request, 404, "not_found", "this service has no metrics")
        sees = label_filter(caller(request))
        # The gate collector reads storage: off the event loop.
        body = await asyncio.get_running_loop().run_in_executor(
            None, lambda: exposition.exposition(sees)
        )
        return Response(body, headers={"Content-Type": CONTENT_TYPE})

    async def server_error(_: Request, error: Exception) -> Response:
        LOG.exception("unhandled error", exc_info=error)
        return _error(500, "internal_error", "the service failed to answer")

    async def openapi(_: Request) -> Response:
        return JSONResponse(OPENAPI)

    async def http_error(request: Request, error: Exception) -> Response:
        # Starlette's own 404 (no such route) and 405 (a route without this method).
        assert isinstance(error, HTTPException)
        if error.status_code == 405:
            allowed = (error.headers or {}).get("Allow", "")
            return refuse(
                request,
                405,
                "method_not_allowed",
                f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})",
                **{"Allow": allowed},
            )
        if error.status_code == 404:
            return refuse(
                request, 404, "not_found", f"no route {request.method} {request.url.path}"
            )
        return refuse(request, error.status_code, "http_error", str(error.detail))

    app = Starlette(
        lifespan=(lambda _app: state.pace.running()) if state.pace is not None else None,
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/v1/invocations", invocations, methods=["POST"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )

    def count_bound(_scope: Scope, code: str) -> None:
        if state.metrics is not None:
            state.metrics.observe_refusal(code)

    bounded = BodyBounds(app, body_timeout_s=state.body_timeout_s, on_refusal=count_bound)
    return BearerTokenGate(bounded, state.tenant_access(), refusals)
