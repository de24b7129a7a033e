"""The mock TemperFS's routes: ``/tdata/...`` (Temper's OData API for Workspaces and Files),
``/_mock/temperfs`` (the records) and the control API every mock serves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from harness.mocks.e2b.config import FaultRule
from harness.mocks.shared.control import control_routes
from harness.mocks.shared.server import Runtime
from harness.mocks.temperfs.config import TemperFSConfig
from harness.mocks.temperfs.state import TemperFSState
from harness.mocks.temperfs.store import TemperFSError

FAULT_HEADER = "X-Mock-Fault"


def _error(status: int, code: str, message: str) -> Response:
    return JSONResponse(TemperFSError(status, code, message).body(), status)


def build_app(
    state: TemperFSState, on_configure: Callable[[dict[str, Any]], TemperFSConfig]
) -> tuple[Starlette, Callable[[], Runtime | None]]:
    """The ASGI app; nothing of it waits on the event loop, so it has no runtime."""

    async def tdata(request: Request) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            answer = state.handle(
                request.method, request.path_params["path"], headers, await request.body()
            )
        finally:
            state.notify_changed()
        if isinstance(answer, FaultRule):
            headers = {FAULT_HEADER: answer.kind}
            if answer.should_retry is not None:
                headers["Should-Retry"] = "true" if answer.should_retry else "false"
            response = _error(answer.status, "InjectedFault", "injected fault: upstream error")
            response.headers.update(headers)
            return response
        if isinstance(answer.body, bytes):
            return Response(answer.body, answer.status, media_type=answer.content_type)
        if answer.body is None:
            return Response(status_code=answer.status, headers=answer.headers)
        return JSONResponse(answer.body, answer.status, headers=answer.headers)

    async def records(_: Request) -> Response:
        return JSONResponse(state.store.to_json())

    routes = [
        Route("/tdata/{path:path}", tdata, methods=["GET", "POST", "PUT"]),
        Route("/_mock/temperfs", records, methods=["GET"]),
        *control_routes(state, on_configure, lambda message: _error(400, "InvalidConfig", message)),
    ]
    return Starlette(routes=routes), lambda: None
