"""Running the component the way the Temper runtime does: fresh per call, within budgets.

Every invocation gets a new Store (so nothing survives between calls, as in Temper) with
fuel, a memory cap and an epoch deadline; the store is closed when the call has answered
(on a background thread, host.runtime.closing), so its instance's memory (or its
pooling-allocator slot) is given back without the caller waiting for it. The imports
are linked once; each host function finds its invocation's services through a
thread-local, which is sound because a Store is used by one thread for the whole call.
Host functions never raise into the guest: every failure becomes a WIT error value (the
bindings' exception plumbing is not thread-safe).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import wasmtime
from wasmtime import component as wc

from host.runtime import wasmtime_compat
from host.runtime.closing import NOTHING_TO_RELEASE, StoreCloser
from host.runtime.credentials import gateway_call, key_arguments
from host.runtime.epochs import TickedByEpochs
from host.runtime.loader import LoadedComponent
from host.runtime.temper_limits import EPOCH_TICK_MS, TemperLimits
from host.runtime.wasmtime_compat import WitErr
from host.services.http_gateway import HttpGateway
from host.services.namespaces import ScopedStorage
from host.services.telemetry import InvocationTag, LoggingTelemetry, TelemetrySink
from host.storage.base import StorageBackend
from provisioner.failures import HOST_CODES, FailureCode
from provisioner.model import SANDBOX_FAILED, Failure, Invocation, Outcome, failed
from provisioner.ports import (
    HttpError,
    HttpErrorKind,
    HttpRequest,
    LogLevel,
    Scope,
    StorageConflict,
    StorageInvalidKey,
    StorageTooLarge,
    StorageUnavailable,
)

wasmtime_compat.install()

PACKAGE = "temper:sandbox-provisioner"
VERSION = "0.2.0"


def interface(name: str) -> str:
    return f"{PACKAGE}/{name}@{VERSION}"


_TEMPER = TemperLimits()


@dataclass(frozen=True)
class Budgets:
    """Temper's per-invocation budgets, by default Temper's own (`TemperLimits`)."""

    fuel: int = _TEMPER.max_fuel
    memory_bytes: int = _TEMPER.max_memory
    deadline_ms: int = round(_TEMPER.max_duration_s * 1000)
    result_bytes: int = 1024 * 1024


def _os_random_u64() -> int:
    return secrets.randbits(64)


@dataclass
class HostServices:
    """What the imports are linked to."""

    storage: StorageBackend
    http: HttpGateway
    telemetry: TelemetrySink = field(default_factory=LoggingTelemetry)
    account: str = "default"
    random_u64: Callable[[], int] = _os_random_u64
    # None: the storage backend's clock, so leases agree across hosts sharing a backend.
    clock_ms: Callable[[], int] | None = None


@dataclass
class _Call:
    storage: ScopedStorage
    tag: InvocationTag
    deadline: float
    api_key: str | None = None  # the invocation's own E2B key (None: the host's)


_SCOPES = {"tenant": Scope.TENANT, "account": Scope.ACCOUNT}
_LEVELS = {
    "debug": LogLevel.DEBUG,
    "info": LogLevel.INFO,
    "warn": LogLevel.WARN,
    "error": LogLevel.ERROR,
}


def _record(**fields: Any) -> wc.Record:
    record = wc.Record()
    for name, value in fields.items():
        setattr(record, name.replace("_", "-"), value)
    return record


def _invocation_record(invocation: Invocation) -> wc.Record:
    """The WIT `invocation` record: the model's fields under their WIT names."""
    values = {f.name: getattr(invocation, f.name) for f in dataclasses.fields(Invocation)}
    values["config"] = list(invocation.config)
    return _record(**values)


def _storage_error(error: Exception) -> WitErr:
    if isinstance(error, StorageConflict):
        return WitErr(wc.Variant("conflict"))
    if isinstance(error, StorageInvalidKey):
        return WitErr(wc.Variant("invalid-key", str(error)))
    if isinstance(error, StorageTooLarge):
        return WitErr(wc.Variant("too-large", error.limit))
    if isinstance(error, StorageUnavailable):
        return WitErr(wc.Variant("unavailable", str(error)[:500]))
    return WitErr(wc.Variant("unavailable", f"host error: {type(error).__name__}"))


def _http_error(error: HttpError) -> WitErr:
    if error.kind is HttpErrorKind.TIMEOUT:
        return WitErr(wc.Variant("timeout"))
    if error.kind is HttpErrorKind.TOO_LARGE:
        return WitErr(wc.Variant("too-large", int(error.detail or 0)))
    tag = {
        HttpErrorKind.DENIED: "denied",
        HttpErrorKind.CONNECTION: "connection",
        HttpErrorKind.INVALID_REQUEST: "invalid-request",
    }[error.kind]
    return WitErr(wc.Variant(tag, error.detail))


class ComponentRuntime(TickedByEpochs):
    """Invokes the provisioner component; safe to call from many threads at once."""

    def __init__(
        self,
        loaded: LoadedComponent,
        services: HostServices,
        budgets: Budgets | None = None,
        *,
        close_in_background: bool = True,
    ) -> None:
        """`close_in_background`: free each call's instance on a background thread after
        the call has answered (host.runtime.closing); False frees it before answering."""
        self.loaded = loaded
        self.services = services
        self.budgets = budgets or Budgets()
        pooling = loaded.pooling
        if pooling is not None and self.budgets.memory_bytes > pooling.max_memory_bytes:
            raise ValueError(
                f"the memory budget ({self.budgets.memory_bytes} bytes) is larger than the "
                f"pooling allocator's memories ({pooling.max_memory_bytes} bytes)"
            )
        # A pooled engine has a fixed number of instance slots: wait for one, never fail.
        self._slots = (
            None if pooling is None else threading.BoundedSemaphore(pooling.instance_slots)
        )
        self._local = threading.local()
        self._clock = services.clock_ms or services.storage.now_ms
        self._linker = self._link()
        component = loaded.component
        iface = component.get_export_index(interface("provisioner"))
        run = component.get_export_index("run", iface) if iface is not None else None
        if run is None:
            raise ValueError(f"{loaded.path} does not export {interface('provisioner')}#run")
        self._run_index = run
        self._closer = StoreCloser() if close_in_background else None
        super().__init__(loaded.engine, EPOCH_TICK_MS)

    def _before_release(self) -> None:
        if self._closer is not None:
            self._closer.stop()

    # -- the imports -------------------------------------------------------------

    def _call(self) -> _Call:
        call: _Call | None = getattr(self._local, "call", None)
        if call is None:
            raise RuntimeError("import used outside an invocation")
        return call

    def _link(self) -> wc.Linker:
        linker = wc.Linker(self.loaded.engine)
        with linker.root() as root:
            with root.add_instance(interface("storage")) as storage:
                storage.add_func("get", self._storage_get)
                storage.add_func("compare-and-swap", self._storage_cas)
                storage.add_func("delete", self._storage_delete)
            with root.add_instance(interface("http")) as http:
                http.add_func("send", self._http_send)
            with root.add_instance(interface("clock")) as clock:
                clock.add_func("now-ms", self._now_ms)
            with root.add_instance(interface("randomness")) as randomness:
                randomness.add_func("next-u64", self._next_u64)
            with root.add_instance(interface("telemetry")) as telemetry:
                telemetry.add_func("log", self._log)
                telemetry.add_func("progress", self._progress)
        return linker

    def _storage_get(self, _store: object, scope: str, key: str) -> object:
        try:
            entry = self._call().storage.get(_SCOPES[scope], key)
        except Exception as error:
            return _storage_error(error)
        return None if entry is None else _record(value=entry.value, version=entry.version)

    def _storage_cas(
        self,
        _store: object,
        scope: str,
        key: str,
        expected: int | None,
        value: bytes,
        ttl_ms: int | None,
    ) -> object:
        try:
            return self._call().storage.compare_and_swap(
                _SCOPES[scope], key, expected, bytes(value), ttl_ms
            )
        except Exception as error:
            return _storage_error(error)

    def _storage_delete(self, _store: object, scope: str, key: str, expected: int | None) -> object:
        try:
            return self._call().storage.delete(_SCOPES[scope], key, expected)
        except Exception as error:
            return _storage_error(error)

    def _http_send(self, _store: object, request: wc.Record) -> object:
        try:
            call = self._call()
            remaining_ms = int((call.deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                return WitErr(wc.Variant("timeout"))
            response = self.services.http.send(
                HttpRequest(
                    method=str(getattr(request, "method")),  # noqa: B009
                    url=str(getattr(request, "url")),  # noqa: B009
                    headers=tuple((str(k), str(v)) for k, v in getattr(request, "headers")),  # noqa: B009
                    body=bytes(getattr(request, "body")),  # noqa: B009
                    timeout_ms=int(getattr(request, "timeout-ms")),
                ),
                deadline_ms=remaining_ms,
                **key_arguments(call.api_key),
            )
        except HttpError as error:
            return _http_error(error)
        except Exception as error:
            return WitErr(wc.Variant("connection", f"host error: {type(error).__name__}"))
        return _record(status=response.status, headers=list(response.headers), body=response.body)

    def _now_ms(self, _store: object) -> int:
        try:
            return int(self._clock())
        except Exception:
            return time.time_ns() // 1_000_000

    def _next_u64(self, _store: object) -> int:
        try:
            return int(self.services.random_u64()) & 0xFFFF_FFFF_FFFF_FFFF
        except Exception:
            return secrets.randbits(64)

    def _log(self, _store: object, level: str, message: str) -> None:
        try:
            call = self._call()
            self.services.telemetry.log(call.tag, _LEVELS.get(level, LogLevel.INFO), message[:4096])
        except Exception:
            pass

    def _progress(self, _store: object, event: str) -> None:
        try:
            call = self._call()
            parsed = json.loads(event) if len(event) <= 65_536 else None
            if isinstance(parsed, dict):
                self.services.telemetry.progress(call.tag, parsed)
        except Exception:
            pass

    # -- invoking ----------------------------------------------------------------

    def invoke(self, invocation: Invocation) -> Outcome:
        unencodable = _unencodable_field(invocation)
        if unencodable is not None:
            # WIT strings are Unicode scalar values: a lone surrogate cannot cross the boundary.
            return failed(
                Failure(
                    FailureCode.INVALID_INVOCATION,
                    f"{unencodable} is not valid Unicode (it holds a lone surrogate)",
                    retryable=False,
                )
            )
        call = gateway_call(self.services.http, invocation)
        release = NOTHING_TO_RELEASE
        if self._slots is not None:
            self._slots.acquire()
            release = self._slots.release
        try:
            store = wasmtime.Store(self.loaded.engine)
        except BaseException:
            release()
            raise
        try:
            return self._run_in(store, call.invocation, self.budgets, call.api_key)
        finally:
            try:
                self._after_call(store)
            finally:
                self._close_store(store, release)

    def _close_store(self, store: wasmtime.Store, release: Callable[[], None]) -> None:
        """Free the call's instance (its pool slot, if any), then `release` the slot."""
        if self._closer is not None:
            self._closer.close_later(store, release)
            return
        try:
            store.close()
        finally:
            release()

    def _after_call(self, store: wasmtime.Store) -> None:
        """Called with the call's store before it is closed (a hook for measurements)."""

    def _run_in(
        self,
        store: wasmtime.Store,
        invocation: Invocation,
        budgets: Budgets,
        api_key: str | None,
    ) -> Outcome:
        store.set_fuel(budgets.fuel)
        store.set_limits(memory_size=budgets.memory_bytes)
        store.set_epoch_deadline(max(1, budgets.deadline_ms // EPOCH_TICK_MS))
        self._local.call = _Call(
            storage=ScopedStorage(
                self.services.storage, tenant=invocation.tenant, account=self.services.account
            ),
            tag=InvocationTag(
                invocation.tenant,
                invocation.entity_type,
                invocation.entity_id,
                invocation.trace_id,
            ),
            deadline=time.monotonic() + budgets.deadline_ms / 1000,
            api_key=api_key,
        )
        try:
            instance = self.loaded_instance(store)
            func = instance.get_func(store, self._run_index)
            if func is None:
                return failed(
                    Failure(FailureCode.HOST_ERROR, "run export not found", retryable=False)
                )
            raw = func(
                store,
                _invocation_record(invocation),
            )
            func.post_return(store)
        except (wasmtime.WasmtimeError, wasmtime.Trap) as error:
            return failed(_classify_trap(error, store, budgets))
        except (ValueError, TypeError) as error:
            # A value that does not fit the WIT types, on either side of the boundary.
            return failed(
                Failure(FailureCode.HOST_ERROR, f"{type(error).__name__}: {error}", False)
            )
        finally:
            self._local.call = None
        return _outcome_from_wit(raw, budgets)

    def loaded_instance(self, store: wasmtime.Store) -> wc.Instance:
        return self._linker.instantiate(store, self.loaded.component)


def _unencodable_field(invocation: Invocation) -> str | None:
    fields: list[tuple[str, str | None]] = [
        ("tenant", invocation.tenant),
        ("entity_type", invocation.entity_type),
        ("entity_id", invocation.entity_id),
        ("trigger_action", invocation.trigger_action),
        ("trigger_params", invocation.trigger_params),
        ("entity_state", invocation.entity_state),
        ("session_id", invocation.session_id),
        ("trace_id", invocation.trace_id),
    ]
    for key, value in invocation.config:
        fields += [("a config key", key), (f"config value {key[:40]!r}", value)]
    for name, text in fields:
        if text is None:
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return name
    return None


def _classify_trap(error: Exception, store: wasmtime.Store, budgets: Budgets) -> Failure:
    text = str(error)
    try:
        fuel_left = store.get_fuel()
    except Exception:
        fuel_left = -1
    if fuel_left == 0 or "all fuel consumed" in text:
        return Failure(
            FailureCode.FUEL_EXHAUSTED, f"the guest used its {budgets.fuel} fuel", retryable=False
        )
    if "interrupt" in text:
        return Failure(
            FailureCode.DEADLINE_EXCEEDED,
            f"the guest ran past {budgets.deadline_ms} ms",
            retryable=True,
        )
    if "memory" in text and ("limit" in text or "grow" in text):
        return Failure(
            FailureCode.MEMORY_EXHAUSTED, "the guest hit its memory cap", retryable=False
        )
    # wasmtime puts the backtrace first and the reason after "Caused by:".
    reason = text.rsplit("Caused by:", 1)[-1].strip()
    first_line = reason.splitlines()[0].strip() if reason else type(error).__name__
    return Failure(
        FailureCode.GUEST_TRAP, f"the guest trapped: {first_line[:300]}", retryable=False
    )


_FAILURE_PARAMS = (("code", str), ("message", str), ("retryable", bool))


def decided(action: str, params: dict[str, Any]) -> Outcome:
    """A WIT `outcome` read as an outcome (`model.failed`'s inverse); ValueError when a
    `SandboxFailed` lacks its typed params or claims a host code."""
    if action != SANDBOX_FAILED:
        return Outcome(action, params)
    for name, kind in _FAILURE_PARAMS:
        if not isinstance(params.get(name), kind):
            raise ValueError(f"SandboxFailed's {name} is not a {kind.__name__}")
    failure = Failure(params["code"], params["message"], params["retryable"])
    if failure.code in HOST_CODES:
        raise ValueError(f"SandboxFailed claims the host code {failure.code}")
    return Outcome(action, params, success=True, error=failure)


def _outcome_from_wit(raw: Any, budgets: Budgets) -> Outcome:
    """The guest's decision, `{action, params}`, read as an outcome (`decided`)."""
    try:
        action = str(raw.action)
        params_text = str(raw.params)
        size = len(action) + len(params_text)
        if size > budgets.result_bytes:
            return failed(
                Failure(
                    FailureCode.RESULT_TOO_LARGE,
                    f"the guest's result is {size} bytes,"
                    f" over the {budgets.result_bytes} byte limit",
                    retryable=False,
                )
            )
        params = json.loads(params_text) if params_text else {}
        if not isinstance(params, dict):
            raise ValueError("params is not a JSON object")
        return decided(action, params)
    except (ValueError, AttributeError) as problem:
        return failed(
            Failure(
                FailureCode.MALFORMED_RESULT,
                f"the guest's result is malformed: {problem}",
                retryable=False,
            )
        )


__all__ = ["Budgets", "ComponentRuntime", "HostServices", "interface"]
