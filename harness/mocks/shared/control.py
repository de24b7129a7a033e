"""The control routes every mock serves under ``/_mock/``: read and change the config,
read the stats, reset."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


class _Json(Protocol):
    def to_json(self) -> dict[str, Any]: ...


class ControlledState(Protocol):
    """What the control routes read and reset."""

    @property
    def config(self) -> _Json: ...

    def stats(self) -> _Json: ...

    def reset(self) -> None: ...


async def _nothing() -> None:
    return None


def control_routes(
    state: ControlledState,
    on_configure: Callable[[dict[str, Any]], _Json],
    bad_request: Callable[[str], Response],
    after_configure: Callable[[], Awaitable[None]] = _nothing,
) -> list[Route]:
    """GET and POST /_mock/config, GET /_mock/stats, POST /_mock/reset.

    ``on_configure`` applies a POSTed object of config fields (ValueError or TypeError: a
    400 in the mock's own error body, from ``bad_request``); ``after_configure`` then runs
    on the event loop (e.g. to wake requests waiting for a slot)."""

    async def get_config(_: Request) -> Response:
        return JSONResponse(state.config.to_json())

    async def post_config(request: Request) -> Response:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise TypeError("expected a JSON object of config fields")
            config = on_configure(changes)
        except (ValueError, TypeError) as exc:
            return bad_request(str(exc))
        await after_configure()
        return JSONResponse(config.to_json())

    async def get_stats(_: Request) -> Response:
        return JSONResponse(state.stats().to_json())

    async def post_reset(_: Request) -> Response:
        state.reset()
        return Response(status_code=204)

    return [
        Route("/_mock/config", get_config, methods=["GET"]),
        Route("/_mock/config", post_config, methods=["POST"]),
        Route("/_mock/stats", get_stats, methods=["GET"]),
        Route("/_mock/reset", post_reset, methods=["POST"]),
    ]
