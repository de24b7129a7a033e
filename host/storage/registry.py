"""Storage URI schemes and the backend classes that serve them, modelled on `limits`.

In `limits` (alisaifee/limits, limits/storage/registry.py) every storage class names its
`STORAGE_SCHEME` and a metaclass records it in `SCHEMES`; `storage_from_string` looks the
scheme up there. Here `CheckedBackend.__init_subclass__` records each subclass's `schemes`
the same way. Built-in backends are registered when their module is first imported: the
table below says which module serves which scheme, so that `storage_from_uri("memory://")`
never imports redis-py, and a host without Redis never loads it.
"""

from __future__ import annotations

import importlib
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from host.storage.base import CheckedBackend

__all__ = [
    "StorageURIError",
    "UnknownStorageScheme",
    "backend_for",
    "known_schemes",
    "register",
    "scheme_of",
]

# scheme -> the module whose import registers the backend serving it
_BUILT_IN: dict[str, str] = {
    "memory": "host.storage.memory",
    "sqlite": "host.storage.sqlite",
    "redis": "host.storage.redis",
    "rediss": "host.storage.redis",
    "redis+cluster": "host.storage.redis_cluster",
}

_registered: dict[str, type[CheckedBackend]] = {}
_lock = threading.Lock()


class StorageURIError(ValueError):
    """A storage URI that names no usable backend, or one with malformed options.

    A configuration error, raised before any backend exists; not a StorageError, which is
    what a running backend's calls raise."""


class UnknownStorageScheme(StorageURIError):
    """The URI's scheme is served by no registered backend."""

    def __init__(self, uri: str, scheme: str, known: tuple[str, ...]) -> None:
        super().__init__(
            f"unsupported storage URI {uri!r}: scheme {scheme!r} is not one of "
            + ", ".join(f"{name}://" for name in known)
        )
        self.scheme = scheme
        self.known = known


def register(backend: type[CheckedBackend]) -> None:
    """Record `backend` under each of its schemes; a scheme served twice is a TypeError."""
    with _lock:
        for scheme in backend.schemes:
            if scheme != scheme.lower() or "://" in scheme or not scheme:
                raise TypeError(f"{backend.__qualname__}: malformed scheme {scheme!r}")
            holder = _registered.get(scheme)
            if holder is not None and holder is not backend:
                raise TypeError(
                    f"scheme {scheme!r} is served by {holder.__qualname__} already,"
                    f" cannot register {backend.__qualname__}"
                )
            _registered[scheme] = backend


def known_schemes() -> tuple[str, ...]:
    with _lock:
        return tuple(sorted(set(_registered) | set(_BUILT_IN)))


def scheme_of(uri: str) -> str:
    """The lower-cased scheme of `uri`; a URI without `://` is an UnknownStorageScheme."""
    scheme, sep, _ = uri.partition("://")
    if not sep:
        raise UnknownStorageScheme(uri, "", known_schemes())
    return scheme.lower()


def backend_for(uri: str) -> type[CheckedBackend]:
    """The backend class serving `uri`'s scheme."""
    scheme = scheme_of(uri)
    module = _BUILT_IN.get(scheme)
    if module is not None and scheme not in _registered:
        importlib.import_module(module)
    with _lock:
        found = _registered.get(scheme)
    if found is None:
        raise UnknownStorageScheme(uri, scheme, known_schemes())
    return found
