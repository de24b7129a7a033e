"""E2B's wire format: request parsing and response bodies as the ``e2b`` SDK reads them."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from starlette.responses import JSONResponse

from host.mock_e2b.state import SandboxRecord

IDEMPOTENCY_KEY = re.compile(r"[a-z0-9-]{1,255}")


class BadRequest(ValueError):
    """A request E2B would answer with 400."""


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """E2B's error body: ``{"code": <status>, "message": ...}``."""
    return JSONResponse({"code": status, "message": message}, status, headers=dict(headers or {}))


@dataclass(frozen=True)
class CreateRequest:
    template_id: str
    timeout_s: int
    metadata: dict[str, str]
    env_vars: dict[str, str]
    allow_internet_access: bool | None
    auto_pause: bool
    idempotency_key: str | None


def _string_map(body: Mapping[str, Any], name: str) -> dict[str, str]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadRequest(f"{name} must be an object of strings")
    return dict(value)


def parse_create(
    body: Any, idempotency_key: str | None, default_timeout_s: int, max_timeout_s: int
) -> CreateRequest:
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    template_id = body.get("templateID")
    if not isinstance(template_id, str) or not template_id:
        raise BadRequest("templateID is required")
    timeout = body.get("timeout", default_timeout_s)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
        raise BadRequest("timeout must be a positive integer (seconds)")
    if timeout > max_timeout_s:
        raise BadRequest(f"timeout cannot be greater than {max_timeout_s // 3600} hours")
    if idempotency_key is not None and IDEMPOTENCY_KEY.fullmatch(idempotency_key) is None:
        raise BadRequest(
            "Idempotency-Key must be 1-255 characters of lowercase letters, digits and hyphens"
        )
    allow_internet_access = body.get("allow_internet_access")
    if allow_internet_access is not None and not isinstance(allow_internet_access, bool):
        raise BadRequest("allow_internet_access must be a boolean")
    return CreateRequest(
        template_id=template_id,
        timeout_s=timeout,
        metadata=_string_map(body, "metadata"),
        env_vars=_string_map(body, "envVars"),
        allow_internet_access=allow_internet_access,
        auto_pause=bool(body.get("autoPause", False)),
        idempotency_key=idempotency_key,
    )


def parse_metadata_filter(raw: str | None) -> dict[str, str]:
    """The SDK sends ``urlencode({quote(k): quote(v)})``: unquote twice, as E2B does."""
    if not raw:
        return {}
    try:
        pairs = urllib.parse.parse_qsl(raw, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        raise BadRequest(f"invalid metadata filter: {exc}") from exc
    return {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}


def timeout_field(body: Any, name: str, default: int | None, max_s: int) -> int:
    value = body.get(name, default) if isinstance(body, dict) else default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"{name} must be a non-negative integer (seconds)")
    return min(value, max_s)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def created_body(record: SandboxRecord, envd_version: str, domain: str | None) -> dict[str, Any]:
    return {
        "sandboxID": record.sandbox_id,
        "templateID": record.template_id,
        "clientID": record.client_id,
        "envdVersion": envd_version,
        "alias": record.alias,
        "envdAccessToken": record.envd_access_token,
        "domain": domain,
    }


def listed_body(
    record: SandboxRecord, started: datetime, end: datetime, envd_version: str
) -> dict[str, Any]:
    return {
        "templateID": record.template_id,
        "alias": record.alias,
        "sandboxID": record.sandbox_id,
        "clientID": record.client_id,
        "startedAt": _iso(started),
        "endAt": _iso(end),
        "cpuCount": 2,
        "memoryMB": 512,
        "diskSizeMB": 1024,
        "state": "running",
        "envdVersion": envd_version,
        "metadata": dict(record.metadata),
    }


def detail_body(
    record: SandboxRecord,
    started: datetime,
    end: datetime,
    envd_version: str,
    domain: str | None,
) -> dict[str, Any]:
    body = listed_body(record, started, end, envd_version)
    body["envdAccessToken"] = record.envd_access_token
    body["domain"] = domain
    if record.allow_internet_access is not None:
        body["allowInternetAccess"] = record.allow_internet_access
    return body
