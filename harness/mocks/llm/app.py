"""The mock's HTTP routes (Starlette): Anthropic's POST /v1/messages, plus a control API
under /_mock/."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from harness.mocks.llm.config import MockLLMConfig
from harness.mocks.llm.state import MockLLMState
from harness.mocks.llm.wire import BadRequest, error_response, message_body, parse_messages_request
from harness.mocks.shared.control import control_routes


def presented_key(request: Request) -> str | None:
    """The API key a request presents: ``x-api-key`` (the documented header, which SDKs
    before 2.x send) or ``Authorization: Bearer`` (how ``anthropic`` 2.x sends its
    ``api_key``)."""
    key = request.headers.get("x-api-key")
    if key:
        return key
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class Runtime:
    """What lives on the server's event loop: the event that ends latencies when the
    server stops."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()

    async def wait_or_close(self, seconds: float) -> None:
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), seconds)

    async def close(self) -> None:
        self.closing.set()


def build_app(
    state: MockLLMState, on_configure: Callable[[dict[str, Any]], MockLLMConfig]
) -> tuple[Starlette, Callable[[], Runtime | None]]:
    """The ASGI app and a getter for its runtime (which exists once the app has started)."""
    holder: dict[str, Runtime] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        holder["runtime"] = Runtime()
        try:
            yield
        finally:
            await holder["runtime"].close()

    async def create_message(request: Request) -> Response:
        arrived_at = state.begin()
        try:
            return await answer(request, arrived_at)
        finally:
            state.end()

    async def answer(request: Request, arrived_at: float) -> Response:
        api_key = presented_key(request)
        if not state.is_key(api_key):
            state.refuse(arrived_at, 401, "authentication_error")
            return error_response(401, "authentication_error", "invalid x-api-key")
        assert api_key is not None
        try:
            if not request.headers.get("anthropic-version"):
                raise BadRequest("anthropic-version: header is required")
            try:
                body = await request.json()
            except (ValueError, UnicodeDecodeError) as exc:
                raise BadRequest(f"the request body is not valid JSON: {exc}") from exc
            parsed = parse_messages_request(body)
        except BadRequest as exc:
            state.refuse(arrived_at, 400, "invalid_request_error")
            return error_response(400, "invalid_request_error", str(exc))
        admission = state.admit(api_key, parsed, arrived_at)
        if admission.status == 529:
            return error_response(529, "overloaded_error", admission.message, admission.headers)
        if admission.status == 429:
            return error_response(429, "rate_limit_error", admission.message, admission.headers)
        await holder["runtime"].wait_or_close(admission.latency_s)
        headers = state.settle(api_key, admission, parsed.input_tokens, arrived_at)
        body = message_body(
            admission.message_id,
            parsed.model,
            parsed.input_tokens,
            admission.output_tokens,
            admission.stop_reason,
        )
        return JSONResponse(body, 200, headers=headers)

    # -- control -----------------------------------------------------------------------------

    def bad_control_request(message: str) -> Response:
        return error_response(400, "invalid_request_error", message)

    async def get_requests(_: Request) -> Response:
        return JSONResponse([record.to_json() for record in state.requests()])

    routes = [
        Route("/v1/messages", create_message, methods=["POST"]),
        *control_routes(state, on_configure, bad_control_request),
        Route("/_mock/requests", get_requests, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan), lambda: holder.get("runtime")
