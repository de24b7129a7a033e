"""Who is calling and whether they may act for the tenant they name.

`BearerTokenGate` (ASGI middleware) answers 401 to every request but the health routes
that has no token of a known client (`tenants.TenantAccess`), and otherwise puts the
client in the request's scope (`caller`). `forbidden_tenant` is the invocation route's
check, once the body is parsed: a client that does not cover the context's tenant gets
403 `forbidden_tenant`, and nothing runs. Both refusals are logged (client name, address,
tenant named; never the token), counted, and rate limited per remote address
(`bounds.RefusalLimiter`: 429 with `Retry-After` past its burst).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from host.serve.bounds import RefusalLimiter, remote_address
from host.serve.errors import error_response
from host.serve.tenants import Client, TenantAccess

CALLER_SCOPE_KEY = "sandbox_provisioner.caller"


@dataclass(frozen=True)
class Refusals:
    """Where the gate and the tenant check report a refusal."""

    limiter: RefusalLimiter
    log: Callable[[dict[str, Any]], None]
    count: Callable[[str, Client | None], None]  # (code, client) into the metrics

    def answer(
        self, scope: Scope, response: JSONResponse, code: str, client: Client | None, **detail: Any
    ) -> JSONResponse:
        """`response`, or a 429 when this address has been refused too often."""
        address = remote_address(scope)
        retry_after = self.limiter.refuse(address)
        if retry_after is not None:
            code, response = (
                "rate_limited",
                error_response(
                    429,
                    "rate_limited",
                    "too many refused requests from this address",
                    **{"Retry-After": str(retry_after)},
                ),
            )
        self.count(code, client)
        self.log(
            {
                "event": "refused",
                "code": code,
                "status": response.status_code,
                "remote": address,
                "path": scope.get("path"),
                "client": None if client is None else client.name,
                **detail,
            }
        )
        return response


def caller(request: Request) -> Client:
    """The client the gate let through."""
    client: Client = request.scope[CALLER_SCOPE_KEY]
    return client


def presented_token(scope: Scope) -> str | None:
    for key, value in scope["headers"]:
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class BearerTokenGate:
    """ASGI middleware: every HTTP request but the health routes and the OpenAPI document
    needs a client's token."""

    OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})

    def __init__(self, app: ASGIApp, access: TenantAccess, refusals: Refusals) -> None:
        self.app = app
        self.access = access
        self.refusals = refusals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN_PATHS:
            token = presented_token(scope)
            client = None if token is None else self.access.authenticate(token)
            if client is None:
                response = self.refusals.answer(
                    scope,
                    error_response(
                        401,
                        "unauthorized",
                        "a valid bearer token is required",
                        **{"WWW-Authenticate": "Bearer"},
                    ),
                    "unauthorized",
                    None,
                    reason="no bearer token"
                    if token is None
                    else "the bearer token does not match",
                )
                await response(scope, receive, send)
                return
            scope[CALLER_SCOPE_KEY] = client
        await self.app(scope, receive, send)


def forbidden_tenant(
    request: Request, refusals: Refusals, tenant: str, entity_id: str
) -> JSONResponse | None:
    """The 403 (or 429) when the caller may not act for `tenant`; None when it may."""
    client = caller(request)
    if client.covers(tenant):
        return None
    return refusals.answer(
        request.scope,
        error_response(
            403,
            "forbidden_tenant",
            f"this token does not act for tenant {tenant!r}",
        ),
        "forbidden_tenant",
        client,
        tenant=tenant,
        entity_id=entity_id,
    )


def label_filter(client: Client) -> Callable[[Mapping[str, str]], bool] | None:
    """Which metric series `client` may read: an operator every one; any other client only
    series with no `tenant` label or one of its tenants, and no `client` label or its own."""
    if client.operator:
        return None

    def sees(labels: Mapping[str, str]) -> bool:
        tenant, name = labels.get("tenant"), labels.get("client")
        return (tenant is None or client.covers(tenant)) and (name is None or name == client.name)

    return sees


__all__ = ["BearerTokenGate", "Refusals", "caller", "forbidden_tenant", "label_filter"]
