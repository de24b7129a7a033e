"""E2B's wire format: request parsing and response bodies as the ``e2b`` SDK reads them."""

from __future__ import annotations

import base64
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.responses import JSONResponse

from harness.mocks.e2b.team import SandboxRecord

IDEMPOTENCY_KEY = re.compile(r"[a-z0-9-]{1,255}")


class BadRequest(ValueError):
    """A request E2B would answer with 400."""


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """E2B's error body: ``{"code": <status>, "message": ...}``."""
    return JSONResponse({"code": status, "message": message}, status, headers=dict(headers or {}))


# E2B's sandbox ids are lowercase letters and digits; the API also takes the legacy
# "<sandboxID>-<clientID>" form and drops the suffix (infra: packages/api/internal/utils/
# split.go ShortID, packages/shared/pkg/id/id.go ValidateSandboxID).
_SANDBOX_ID = re.compile(r"[a-z0-9]+")
INT32_MAX = 2**31 - 1
MAX_REFRESH_S = 3600  # spec: SandboxRefreshRequest.duration maximum
MIN_PAGE, MAX_PAGE = 1, 100  # spec: components/parameters/paginationLimit
SANDBOX_STATES = ("running", "paused")  # spec: SandboxState
ORDERS = ("asc", "desc")  # spec: OrderDirection (default desc)


def short_sandbox_id(raw: str) -> str:
    """The sandbox id a path names, as E2B reads it; BadRequest when it is malformed."""
    parts = raw.split("-")
    if len(parts) > 2 or _SANDBOX_ID.fullmatch(parts[0]) is None:
        raise BadRequest("Invalid sandbox ID")
    return parts[0]


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


def _optional(body: Mapping[str, Any], name: str, kind: type, what: str) -> Any:
    """``body[name]`` when present; BadRequest when it is not of ``kind``. JSON's true and
    false are never integers here, as the spec's validator sees them."""
    if name not in body:
        return None
    value = body[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"{name} must be {what}")
    return value


def seconds_field(
    body: Mapping[str, Any], name: str, *, default: int | None, maximum: int = INT32_MAX
) -> int:
    """An int32 seconds field with the spec's ``minimum: 0``; BadRequest otherwise."""
    value = _optional(body, name, int, "an integer number of seconds")
    if value is None:
        if default is None:
            raise BadRequest(f"{name} is required")
        return default
    if not 0 <= value <= maximum:
        raise BadRequest(f"{name} must be between 0 and {maximum}")
    return int(value)


def lifetime_field(body: Mapping[str, Any], default_s: int, max_s: int) -> int:
    """A create's or resume's ``timeout``: positive and at most the plan's limit (infra:
    packages/api/internal/handlers/timeout_helper.go validateAndParseTimeout)."""
    timeout = seconds_field(body, "timeout", default=default_s)
    if timeout <= 0:
        raise BadRequest("Timeout must be greater than 0")
    if timeout > max_s:
        raise BadRequest(f"Timeout cannot be greater than {max_s // 3600} hours")
    return timeout


ABSENT = object()  # no request body at all (JSON `null` is a body, and not an object)


def json_object(body: Any, *, required: bool) -> dict[str, Any]:
    """A request body that the spec declares as an object (absent allowed unless required).
    `body` is the parsed JSON, or ABSENT when the request had none."""
    if body is ABSENT and not required:
        return {}
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def parse_create(
    body: Any, idempotency_key: str | None, default_timeout_s: int, max_timeout_s: int
) -> CreateRequest:
    """A create body checked against the spec's NewSandbox schema (timeout default 15)."""
    body = json_object(body, required=True)
    template_id = body.get("templateID")
    if not isinstance(template_id, str) or not template_id:
        raise BadRequest("templateID is required")
    timeout = lifetime_field(body, default_timeout_s, max_timeout_s)
    if idempotency_key is not None and IDEMPOTENCY_KEY.fullmatch(idempotency_key) is None:
        raise BadRequest(
            "Idempotency-Key must be 1-255 characters of lowercase letters, digits and hyphens"
        )
    for flag in ("autoPause", "autoPauseMemory", "secure", "allow_internet_access"):
        _optional(body, flag, bool, "a boolean")
    for obj in ("network", "iam"):
        _optional(body, obj, dict, "an object")
    if body.get("mcp") is not None:
        _optional(body, "mcp", dict, "an object or null")
    auto_resume = _optional(body, "autoResume", dict, "an object")
    if auto_resume is not None and not isinstance(auto_resume.get("enabled"), bool):
        raise BadRequest("autoResume.enabled must be a boolean")
    mounts = _optional(body, "volumeMounts", list, "an array")
    if mounts is not None and not all(
        isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("path"), str)
        for m in mounts
    ):
        raise BadRequest("volumeMounts must be objects with string name and path")
    return CreateRequest(
        template_id=template_id,
        timeout_s=timeout,
        metadata=_string_map(body, "metadata"),
        env_vars=_string_map(body, "envVars"),
        allow_internet_access=body.get("allow_internet_access"),
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


@dataclass(frozen=True)
class ListQuery:
    """The v2 list's query parameters, checked as the spec declares them."""

    metadata: dict[str, str]
    states: frozenset[str]
    order: str
    started_after: datetime | None
    template: str | None
    limit: int
    cursor: tuple[datetime, str] | None


def _rfc3339(raw: str, what: str) -> datetime:
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError as exc:
        raise BadRequest(f"{what} must be an RFC 3339 date-time") from exc
    if moment.tzinfo is None:
        raise BadRequest(f"{what} must carry a time zone")
    return moment.astimezone(UTC)


def rfc3339_nano(moment: datetime) -> str:
    """Go's time.RFC3339Nano for a UTC time: trailing zeros of the fraction dropped."""
    text = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{moment.microsecond:06d}".rstrip("0")
    return f"{text}.{fraction}Z" if fraction else f"{text}Z"


def encode_cursor(started: datetime, sandbox_id: str, order: str) -> str:
    """E2B's list cursor: base64url of ``<RFC3339Nano>__<sandboxID>[__asc]``
    (infra: packages/api/internal/utils/sandboxes_list.go ParseCursor)."""
    raw = f"{rfc3339_nano(started)}__{sandbox_id}" + ("__asc" if order == "asc" else "")
    return base64.urlsafe_b64encode(raw.encode()).decode()


def decode_cursor(token: str, order: str) -> tuple[datetime, str]:
    try:
        parts = base64.urlsafe_b64decode(token.encode()).decode().split("__")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("Invalid next token: error decoding cursor") from exc
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "asc"):
        raise BadRequest("Invalid next token: invalid cursor format")
    if ("asc" if len(parts) == 3 else "desc") != order:
        raise BadRequest("Invalid next token: the cursor was made for the other order")
    return _rfc3339(parts[0], "the cursor's timestamp"), parts[1]


def parse_list_query(params: Mapping[str, str], version: int) -> ListQuery:
    """v1 lists running sandboxes only and takes ``metadata`` alone; v2 takes the rest."""
    metadata = parse_metadata_filter(params.get("metadata"))
    if version == 1:
        return ListQuery(metadata, frozenset({"running"}), "desc", None, None, INT32_MAX, None)
    raw_states = params.get("state")
    states = frozenset(SANDBOX_STATES if raw_states is None else raw_states.split(","))
    unknown = sorted(states - set(SANDBOX_STATES))
    if unknown:
        raise BadRequest(f"Invalid state {unknown[0]!r}: expected one of {SANDBOX_STATES}")
    order = params.get("order", "desc")
    if order not in ORDERS:
        raise BadRequest(f"Invalid order parameter: unknown order {order!r}")
    raw_after = params.get("startedAfter")
    started_after = None if raw_after is None else _rfc3339(raw_after, "startedAfter")
    raw_limit = params.get("limit", str(MAX_PAGE))
    try:
        limit = int(raw_limit)
    except ValueError as exc:
        raise BadRequest("limit must be an integer") from exc
    if not MIN_PAGE <= limit <= MAX_PAGE:
        raise BadRequest(f"limit must be between {MIN_PAGE} and {MAX_PAGE}")
    token = params.get("nextToken")
    cursor = decode_cursor(token, order) if token else None
    return ListQuery(
        metadata, states, order, started_after, params.get("template") or None, limit, cursor
    )


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
        "state": record.state,
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
