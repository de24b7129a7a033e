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
  Bearer <token>`; a missing or wrong token is 401 before anything else happens (compared
  in constant time).
- Every refusal (401, 400, 404, 405, 413, 503) is JSON, `{"error": {"code", "message"}}`,
  and is logged as one `refused` line with its status, code and reason (never a header,
  so never the token).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
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
from starlette.types import ASGIApp, Receive, Scope, Send

from host.runtime.temper_context import MAX_CONTEXT_BYTES, InvalidContext, parse_context
from host.serve.metrics import CONTENT_TYPE, ServeMetrics
from host.serve.openapi import OPENAPI
from host.serve.pool import InvocationPool
from host.serve.results import temper_result
from provisioner.admission import AdmissionConfig
from provisioner.model import Invocation, Outcome, ProvisionerError

LOG = logging.getLogger("sandbox_provisioner.serve")
# Config keys that address the service itself: the shim's, not the component's.
SHIM_CONFIG_KEYS = frozenset({"provisioner_url", "provisioner_token"})


@dataclass
class ServeState:
    token: str
    pool: InvocationPool
    invoke: Callable[[Invocation], Outcome]
    e2b_url: str
    storage_probe: Callable[[], None]
    retry_after_s: int = 1
    # Why the gateway would refuse every E2B request (None: it would not).
    e2b_refusal: Callable[[], str | None] = lambda: None
    draining: bool = False
    metrics: ServeMetrics | None = None
    # The admission settings of the latest invocation (the gates' limits depend on the
    # integration config); None until one arrives. Read by the metrics' gate collector.
    admission_config: AdmissionConfig | None = None
    log: Callable[[dict[str, Any]], None] = field(
        default=lambda line: LOG.info(json.dumps(line, sort_keys=True))
    )


def _authorized(request: Request, token: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    # compare_digest on bytes: constant time in the token's content.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        presented.strip().encode(), token.encode()
    )


def _error(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers=headers)


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
    """Drop the shim's own keys (the token must not reach the component) and point the
    guest at the host's E2B URL unless the context names one (as `invoke` does)."""
    config = tuple((k, v) for k, v in invocation.config if k not in SHIM_CONFIG_KEYS)
    if not any(key == "e2b_api_url" for key, _ in config):
        config = (*config, ("e2b_api_url", e2b_url))
    return replace(invocation, config=config)


def remember_admission_config(state: ServeState, invocation: Invocation) -> None:
    # An invalid config: the component answers it invalid_config; the metrics keep the
    # last settings.
    with contextlib.suppress(ProvisionerError):
        state.admission_config = AdmissionConfig.from_config(dict(invocation.config))


def create_app(state: ServeState) -> ASGIApp:
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
            invocation = prepare(parse_context(body.decode("utf-8")), state.e2b_url)
        except UnicodeDecodeError:
            return refuse(request, 400, "invalid_context", "the context is not UTF-8")
        except InvalidContext as invalid:
            return refuse(request, 400, "invalid_context", str(invalid))
        started = time.monotonic()
        remember_admission_config(state, invocation)

        def run() -> tuple[Outcome, float]:
            begun = time.monotonic()
            outcome = state.invoke(invocation)
            return outcome, time.monotonic() - begun

        future = state.pool.try_submit(run)
        if future is None:
            if state.metrics is not None:
                state.metrics.observe_saturated()
            return refuse(
                request,
                503,
                "saturated",
                f"all {state.pool.workers} workers are busy",
                **{"Retry-After": str(state.retry_after_s)},
            )
        outcome, seconds = await asyncio.wrap_future(future)
        if state.metrics is not None:
            state.metrics.observe_invocation(outcome, seconds)
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
                "trace_id": invocation.trace_id,
            }
        )
        return JSONResponse(result)

    async def metrics(request: Request) -> Response:
        if state.metrics is None:
            return refuse(request, 404, "not_found", "this service has no metrics")
        # The gate collector reads storage: off the event loop.
        body = await asyncio.get_running_loop().run_in_executor(None, state.metrics.exposition)
        return Response(body, headers={"Content-Type": CONTENT_TYPE})

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
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/v1/invocations", invocations, methods=["POST"]),
        ],
        exception_handlers={HTTPException: http_error},
    )
    return BearerTokenGate(
        app,
        state.token,
        lambda scope, status, code, why: log_refusal(state, scope, status, code, why),
    )


class BearerTokenGate:
    """ASGI middleware: every HTTP request but the health routes needs the token."""

    OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})

    def __init__(
        self,
        app: ASGIApp,
        token: str,
        on_refused: Callable[[Scope, int, str, str], None] | None = None,
    ) -> None:
        self.app = app
        self.token = token
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN_PATHS:
            request = Request(scope)
            if not _authorized(request, self.token):
                reason = (
                    "no bearer token"
                    if not request.headers.get("authorization")
                    else "the bearer token does not match"
                )
                if self.on_refused is not None:
                    self.on_refused(scope, 401, "unauthorized", reason)
                response = _error(
                    401,
                    "unauthorized",
                    "a valid bearer token is required",
                    **{"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
