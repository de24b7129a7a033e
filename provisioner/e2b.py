"""The E2B API as the provisioner uses it: create (v2, idempotent), find by metadata, kill.

Every answer is classified into what admission control needs to know about it; nothing
here retries or waits, because the guest cannot sleep: retries are new invocations.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from provisioner.config import SandboxSettings
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
# E2B sandbox ids are short lowercase alphanumerics (older APIs append "-<client id>"). An id
# outside this shape is not trusted: it would be stored, returned to the runtime and put in
# the kill URL (a lone surrogate from a JSON escape made `quote` raise, so the sandbox could
# never be released through the provisioner).
_SANDBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A DNS name: what may stand between the sandbox id and the end of a derived URL.
_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}\.)*[A-Za-z0-9-]{1,63}")
# The envd daemon's port and E2B's public domain, as the old module derives the URL
# (`provision_sandbox` in sandbox_provisioner/src/lib.rs: "port comes FIRST").
ENVD_PORT = 49983
DEFAULT_DOMAIN = "e2b.app"


@dataclass(frozen=True, slots=True)
class SandboxInfo:
    sandbox_id: str
    template_id: str
    client_id: str
    envd_version: str
    sandbox_url: str = ""


def _printable(text: str, limit: int) -> str:
    """Only what can cross the WIT boundary and be shown safely: a lone surrogate (from a
    JSON escape) cannot be lowered to a WIT string, and control characters garble logs."""
    return "".join(ch for ch in text[:limit] if ch.isprintable())


def _error_message(response: HttpResponse) -> str:
    try:
        body = json.loads(response.body)
    except ValueError:
        return _printable(response.body[:200].decode("utf-8", "replace"), 200)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return _printable(str(body["message"]), 300)
    return _printable(response.body[:200].decode("utf-8", "replace"), 200)


def _retry_after_ms(response: HttpResponse) -> int | None:
    for header in ("retry-after", "ratelimit-reset"):
        raw = response.header(header)
        if raw is None:
            continue
        try:
            seconds = float(raw.strip())
        except ValueError:
            continue  # an HTTP date: treat as unknown and let backoff decide
        if seconds >= 0:
            return min(int(seconds * 1000), 3_600_000)
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
    if status in (401, 403):
        code = FailureCode.E2B_UNAUTHORIZED
    elif status == 404:
        code = FailureCode.E2B_TEMPLATE_NOT_FOUND
    elif status == 400:
        code = FailureCode.E2B_BAD_REQUEST
    else:
        code = FailureCode.E2B_UNEXPECTED_STATUS
    return CreateFailed(Failure(code, f"E2B answered {status}: {message}", retryable=False))


def _first_text(body: dict[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = body.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def sandbox_url(body: dict[str, Any], sandbox_id: str) -> str:
    """The old module's rule: the answer's `sandbox_url` or `url`, else
    `https://49983-{sandbox_id}.{domain}` with the answer's domain (E2B's create answer
    names it `domain`; `sandboxDomain` is accepted too) or `e2b.app`."""
    given = _first_text(body, "sandbox_url", "url")
    if given is not None:
        return _printable(given, 2048)
    domain = _first_text(body, "sandboxDomain", "domain")
    if domain is None or not _DOMAIN.fullmatch(domain):
        domain = DEFAULT_DOMAIN
    return f"https://{ENVD_PORT}-{sandbox_id}.{domain}"


def _sandbox_info(body: Any) -> SandboxInfo | None:
    if not isinstance(body, dict):
        return None
    # `sandboxID` is E2B's name; the old module also read `sandbox_id`.
    sandbox_id = _first_text(body, "sandboxID", "sandbox_id")
    if sandbox_id is None or not _SANDBOX_ID.fullmatch(sandbox_id):
        return None

    def text(*keys: str) -> str:
        value = _first_text(body, *keys)
        return "" if value is None else _printable(value, 128)

    return SandboxInfo(
        sandbox_id,
        text("templateID"),
        text("clientID", "client_id"),
        text("envdVersion"),
        sandbox_url(body, sandbox_id),
    )


class E2BClient:
    def __init__(self, http: Http, settings: SandboxSettings) -> None:
        self._http = http
        self._settings = settings

    def _send(
        self, method: str, path: str, body: bytes, timeout_ms: int, *extra: tuple[str, str]
    ) -> HttpResponse:
        return self._http.send(
            HttpRequest(
                method=method,
                url=self._settings.api_url + path,
                headers=_JSON_HEADERS + extra,
                body=body,
                timeout_ms=timeout_ms,
            )
        )

    def create(
        self, *, idempotency_key: str, metadata: dict[str, str]
    ) -> tuple[CreateResult, SandboxInfo | None]:
        settings = self._settings
        body = json.dumps(
            {
                "templateID": settings.template_id,
                "timeout": settings.sandbox_timeout_s,
                "metadata": metadata,
            }
        ).encode()
        try:
            response = self._send(
                "POST",
                "/v2/sandboxes",
                body,
                settings.create_timeout_ms,
                ("idempotency-key", idempotency_key),
            )
        except HttpError as error:
            return _transport_failure(error), None
        if response.status in (200, 201):
            try:
                info = _sandbox_info(json.loads(response.body))
            except ValueError:
                info = None
            if info is None:
                # The sandbox may exist; the same idempotency key adopts it on the next try.
                return Unavailable(status=response.status), None
            return Created(info.sandbox_id, settings.sandbox_timeout_s * 1000), info
        return classify_failure(response), None

    def find_by_metadata(self, key: str, value: str) -> list[str]:
        """Ids of running sandboxes whose metadata has key=value."""
        query = urlencode({"metadata": urlencode({key: value})})
        response = self._send(
            "GET", f"/v2/sandboxes?{query}", b"", self._settings.request_timeout_ms
        )
        if response.status != 200:
            raise HttpError(HttpErrorKind.CONNECTION, f"list answered {response.status}")
        try:
            body = json.loads(response.body)
        except ValueError:
            raise HttpError(HttpErrorKind.CONNECTION, "list answered malformed JSON") from None
        found: list[str] = []
        for item in body if isinstance(body, list) else []:
            info = _sandbox_info(item)
            if info is not None:
                found.append(info.sandbox_id)
        return found

    def kill(self, sandbox_id: str) -> Failure | None:
        """Kill a sandbox; one that is already gone counts as killed."""
        try:
            response = self._send(
                "DELETE",
                "/sandboxes/" + quote(sandbox_id, safe=""),
                b"",
                self._settings.request_timeout_ms,
            )
        except HttpError as error:
            return Failure(
                FailureCode.E2B_UNAVAILABLE,
                f"kill failed: {error}",
                retryable=error.kind is not HttpErrorKind.DENIED,
            )
        if response.status in (200, 204, 404):
            return None
        if response.status in (401, 403):
            return Failure(
                FailureCode.E2B_UNAUTHORIZED, f"kill answered {response.status}", retryable=False
            )
        return Failure(
            FailureCode.E2B_UNAVAILABLE,
            f"kill answered {response.status}: {_error_message(response)}",
            retryable=True,
        )


def _transport_failure(error: HttpError) -> CreateResult:
    if error.kind is HttpErrorKind.DENIED:
        return CreateFailed(
            Failure(
                FailureCode.E2B_DENIED,
                f"the host refused the request: {error.detail}",
                retryable=False,
            )
        )
    if error.kind is HttpErrorKind.INVALID_REQUEST:
        return CreateFailed(
            Failure(
                FailureCode.E2B_BAD_REQUEST, f"invalid request: {error.detail}", retryable=False
            )
        )
    return Unavailable(status=None)
