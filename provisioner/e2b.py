"""The E2B API as the provisioner uses it: create (v2, idempotent), find by metadata, kill.
Nothing here retries or waits (the guest cannot sleep): retries are new invocations."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote, urlencode

from provisioner.config import SandboxSettings
from provisioner.entity_records import READY, EntityRecord
from provisioner.failures import FailureCode
from provisioner.gates.results import (
    CapacityExhausted,
    Created,
    CreateFailed,
    CreateResult,
    RateLimited,
    Unavailable,
)
from provisioner.model import Failure
from provisioner.ports import Http, HttpError, HttpErrorKind, HttpRequest, HttpResponse

_CAPACITY_MESSAGE = re.compile(r"maximum number of concurrent E2B sandboxes(?:\s*\((\d+)\))?", re.I)
_JSON_HEADERS = (("content-type", "application/json"), ("accept", "application/json"))
# An id of another shape is not trusted: it is stored, answered and put in the kill URL.
_SANDBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}\.)*[A-Za-z0-9-]{1,63}")
# How the old module derives the URL: envd's port first, then the id and E2B's domain.
ENVD_PORT = 49983
_CODES = {
    400: FailureCode.E2B_BAD_REQUEST,
    401: FailureCode.E2B_UNAUTHORIZED,
    403: FailureCode.E2B_UNAUTHORIZED,
    404: FailureCode.E2B_TEMPLATE_NOT_FOUND,
}
DEFAULT_DOMAIN = "e2b.app"
# A create the host would not send: what it fails as (any other transport error: unavailable).
_REFUSED = {
    HttpErrorKind.DENIED: (FailureCode.E2B_DENIED, "the host refused the request"),
    HttpErrorKind.INVALID_REQUEST: (FailureCode.E2B_BAD_REQUEST, "invalid request"),
}


def _printable(text: str, limit: int) -> str:
    """What can cross the WIT boundary (no lone surrogate) and be logged (no control)."""
    return "".join(ch for ch in text[:limit] if ch.isprintable())


def _error_message(response: HttpResponse) -> str:
    try:
        message = json.loads(response.body).get("message")
    except (ValueError, AttributeError):
        message = None
    if isinstance(message, str):
        return _printable(message, 300)
    return _printable(response.body[:200].decode("utf-8", "replace"), 200)


def _retry_after_ms(response: HttpResponse) -> int | None:
    for header in ("retry-after", "ratelimit-reset"):
        try:
            seconds = float((response.header(header) or "").strip())
        except ValueError:
            continue  # absent, or an HTTP date: unknown, backoff decides
        if seconds >= 0:
            return int(min(seconds * 1000, 3_600_000))  # capped before int: `inf` is a float
    return None


def classify_failure(response: HttpResponse) -> CreateResult:
    """What a non-success create answer means for admission control."""
    status = response.status
    message = _error_message(response)
    if status == 429:
        capacity = _CAPACITY_MESSAGE.search(message)
        if capacity is not None:
            limit = capacity.group(1)
            return CapacityExhausted(reported_limit=int(limit) if limit else None)
        return RateLimited(retry_after_ms=_retry_after_ms(response))
    if status >= 500:
        return Unavailable(status=status)
    code = _CODES.get(status, FailureCode.E2B_UNEXPECTED_STATUS)
    return CreateFailed(Failure(code, f"E2B answered {status}: {message}", retryable=False))


def _first_text(body: dict[str, Any], *keys: str) -> str:
    """The first of `keys` holding a non-empty string, or ""."""
    for key in keys:
        value = body.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def sandbox_url(body: dict[str, Any], sandbox_id: str) -> str:
    """The old module's rule: the answer's `sandbox_url` or `url`, else one derived from the
    answer's domain (`sandboxDomain` or `domain`) or `e2b.app`."""
    given = _first_text(body, "sandbox_url", "url")
    if given:
        return _printable(given, 2048)
    domain = _first_text(body, "sandboxDomain", "domain")
    if not _DOMAIN.fullmatch(domain):
        domain = DEFAULT_DOMAIN
    return f"https://{ENVD_PORT}-{sandbox_id}.{domain}"


def _sandbox(body: Any) -> EntityRecord | None:
    """The sandbox an answer describes, as a ready record of no cycle yet."""
    if not isinstance(body, dict):
        return None
    sandbox_id = _first_text(body, "sandboxID", "sandbox_id")
    if not _SANDBOX_ID.fullmatch(sandbox_id):
        return None
    return EntityRecord(
        READY,
        nonce="",
        since_ms=0,
        sandbox_id=sandbox_id,
        template_id=_printable(_first_text(body, "templateID"), 128),
        client_id=_printable(_first_text(body, "clientID", "client_id"), 128),
        envd_version=_printable(_first_text(body, "envdVersion"), 128),
        sandbox_url=sandbox_url(body, sandbox_id),
    )


class E2BClient:
    def __init__(self, http: Http, settings: SandboxSettings) -> None:
        self._http = http
        self._settings = settings

    def _send(
        self, method: str, path: str, timeout_ms: int, body: bytes = b"", *extra: tuple[str, str]
    ) -> HttpResponse:
        url = self._settings.api_url + path
        return self._http.send(HttpRequest(method, url, _JSON_HEADERS + extra, body, timeout_ms))

    def create(
        self, *, idempotency_key: str, metadata: dict[str, str]
    ) -> tuple[CreateResult, EntityRecord | None]:
        settings = self._settings
        body = {"templateID": settings.template_id, "timeout": settings.sandbox_timeout_s}
        encoded = json.dumps({**body, "metadata": metadata}).encode()
        try:
            key = ("idempotency-key", idempotency_key)
            response = self._send("POST", "/v2/sandboxes", settings.create_timeout_ms, encoded, key)
        except HttpError as error:
            if error.kind not in _REFUSED:
                return Unavailable(status=None), None
            code, what = _REFUSED[error.kind]
            return CreateFailed(Failure(code, f"{what}: {error.detail}", retryable=False)), None
        if response.status not in (200, 201):
            return classify_failure(response), None
        try:
            info = _sandbox(json.loads(response.body))
        except ValueError:
            info = None
        if info is None:
            # The sandbox may exist; the same idempotency key adopts it on the next try.
            return Unavailable(status=response.status), None
        return Created(info.sandbox_id, settings.sandbox_timeout_s * 1000), info

    def find_by_metadata(self, key: str, value: str) -> list[str]:
        """Ids of running sandboxes whose metadata has key=value."""
        query = urlencode({"metadata": urlencode({key: value})})
        response = self._send("GET", f"/v2/sandboxes?{query}", self._settings.request_timeout_ms)
        if response.status != 200:
            raise HttpError(HttpErrorKind.CONNECTION, f"list answered {response.status}")
        try:
            body = json.loads(response.body)
        except ValueError:
            raise HttpError(HttpErrorKind.CONNECTION, "list answered malformed JSON") from None
        infos = (_sandbox(item) for item in (body if isinstance(body, list) else []))
        return [info.sandbox_id for info in infos if info is not None]

    def kill(self, sandbox_id: str) -> Failure | None:
        """Kill a sandbox; one that is already gone counts as killed."""
        try:
            path = "/sandboxes/" + quote(sandbox_id, safe="")
            response = self._send("DELETE", path, self._settings.request_timeout_ms)
        except HttpError as error:
            retryable = error.kind is not HttpErrorKind.DENIED
            return Failure(FailureCode.E2B_UNAVAILABLE, f"kill failed: {error}", retryable)
        status = response.status
        if status in (200, 204, 404):
            return None
        if status in (401, 403):
            return Failure(FailureCode.E2B_UNAUTHORIZED, f"kill answered {status}", False)
        message = f"kill answered {status}: {_error_message(response)}"
        return Failure(FailureCode.E2B_UNAVAILABLE, message, retryable=True)
