"""The component's entry point (only inside the component): binds the ports to the WIT
imports. Nothing escapes `run`: an escaping exception would trap."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import fields
from typing import Any, TypeVar

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports import provisioner as wit
from wit_world.imports import clock, http, randomness, storage, telemetry

from provisioner.app import run
from provisioner.failures import FailureCode
from provisioner.model import Failure, Invocation, Outcome, failed
from provisioner.ports import (
    Entry,
    HttpError,
    HttpErrorKind,
    HttpRequest,
    HttpResponse,
    LogLevel,
    Ports,
    Scope,
    StorageConflict,
    StorageError,
    StorageInvalidKey,
    StorageTooLarge,
    StorageUnavailable,
)

_SCOPES = {scope: getattr(storage.Scope, scope.name) for scope in Scope}
_LEVELS = {level: getattr(telemetry.Level, level.name) for level in LogLevel}
_T = TypeVar("_T")


def _storage_error(error: Err[Any]) -> StorageError:
    value = error.value
    if isinstance(value, storage.StorageError_Conflict):
        return StorageConflict("version moved")
    if isinstance(value, storage.StorageError_InvalidKey):
        return StorageInvalidKey(value.value)
    if isinstance(value, storage.StorageError_TooLarge):
        return StorageTooLarge(value.value)
    if isinstance(value, storage.StorageError_Unavailable):
        return StorageUnavailable(value.value)
    return StorageUnavailable(repr(value))


def _stored(call: Callable[..., _T], scope: Scope, *args: Any) -> _T:
    try:
        return call(_SCOPES[scope], *args)
    except Err as error:
        raise _storage_error(error) from None


class WitStorage:
    def get(self, scope: Scope, key: str) -> Entry | None:
        found = _stored(storage.get, scope, key)
        return None if found is None else Entry(found.value, found.version)

    def compare_and_swap(
        self, scope: Scope, key: str, expected_version: int | None, value: bytes, ttl_ms: int | None
    ) -> int:
        return _stored(storage.compare_and_swap, scope, key, expected_version, value, ttl_ms)

    def delete(self, scope: Scope, key: str, expected_version: int | None) -> bool:
        return _stored(storage.delete, scope, key, expected_version)


def _http_error(error: Err[Any]) -> HttpError:
    value = error.value
    if isinstance(value, http.HttpError_Denied):
        return HttpError(HttpErrorKind.DENIED, value.value)
    if isinstance(value, http.HttpError_Timeout):
        return HttpError(HttpErrorKind.TIMEOUT)
    if isinstance(value, http.HttpError_Connection):
        return HttpError(HttpErrorKind.CONNECTION, value.value)
    if isinstance(value, http.HttpError_TooLarge):
        return HttpError(HttpErrorKind.TOO_LARGE, f"body over {value.value} bytes")
    if isinstance(value, http.HttpError_InvalidRequest):
        return HttpError(HttpErrorKind.INVALID_REQUEST, value.value)
    return HttpError(HttpErrorKind.CONNECTION, repr(value))


class WitHttp:
    def send(self, request: HttpRequest) -> HttpResponse:
        wit_request = http.Request(
            request.method, request.url, list(request.headers), request.body, request.timeout_ms
        )
        try:
            response = http.send(wit_request)
        except Err as error:
            raise _http_error(error) from None
        return HttpResponse(response.status, tuple(response.headers), response.body)


class WitTelemetry:
    def log(self, level: LogLevel, message: str) -> None:
        telemetry.log(_LEVELS[level], message)

    def progress(self, event: dict[str, Any]) -> None:
        telemetry.progress(json.dumps(event, separators=(",", ":")))


# The clock and randomness imports already have the ports' shape.
_PORTS = Ports(WitStorage(), WitHttp(), clock, randomness, WitTelemetry())


def _to_wit(outcome: Outcome) -> wit.Outcome:
    return wit.Outcome(action=outcome.action, params=outcome.params_json())


def _from_wit(invocation: wit.Invocation) -> Invocation:
    values = {f.name: getattr(invocation, f.name) for f in fields(Invocation)}
    values["config"] = tuple(invocation.config)
    return Invocation(**values)


class Provisioner(exports.Provisioner):
    def run(self, invocation: wit.Invocation) -> wit.Outcome:
        try:
            return _to_wit(run(_from_wit(invocation), _PORTS))
        except Exception as error:  # the last line of defence: never trap on a bug
            message = f"{type(error).__name__}: {error}"
            return _to_wit(failed(Failure(FailureCode.INTERNAL_ERROR, message, retryable=False)))
