"""The one shape of every error `serve` answers: `{"error": {"code", "message"}}`, JSON."""

from __future__ import annotations

from starlette.responses import JSONResponse


def error_response(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers=headers)


__all__ = ["error_response"]
