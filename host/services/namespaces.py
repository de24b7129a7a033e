"""Scope to namespace: the one place where a guest scope becomes a storage namespace.

The guest names keys only; the host prefixes them with the invoking tenant's namespace or
the E2B account's. Names are percent-encoded, so no tenant name can reach into another
namespace (`a/b` and `a%2Fb` stay apart).
"""

from __future__ import annotations

import functools
from urllib.parse import quote

from host.storage.base import StorageBackend
from provisioner.ports import Entry, Scope


def _encoded(name: str) -> str:
    # surrogatepass: a lone surrogate (possible in a JSON context) still gets a namespace of
    # its own instead of an exception; valid UTF-8 never produces those bytes, so no clash.
    return quote(name.encode("utf-8", "surrogatepass"), safe="")


@functools.lru_cache(maxsize=4096)
def tenant_namespace(tenant: str) -> str:
    return "tenant/" + _encoded(tenant)


@functools.lru_cache(maxsize=256)
def account_namespace(account: str) -> str:
    return "account/" + _encoded(account)


class ScopedStorage:
    """The guest's Storage port over a host backend, bound to one invocation's scopes."""

    def __init__(self, backend: StorageBackend, *, tenant: str, account: str) -> None:
        self._backend = backend
        self._namespaces = {
            Scope.TENANT: tenant_namespace(tenant),
            Scope.ACCOUNT: account_namespace(account),
        }

    def namespace(self, scope: Scope) -> str:
        return self._namespaces[scope]

    def get(self, scope: Scope, key: str) -> Entry | None:
        return self._backend.get(self._namespaces[scope], key)

    def compare_and_swap(
        self,
        scope: Scope,
        key: str,
        expected_version: int | None,
        value: bytes,
        ttl_ms: int | None,
    ) -> int:
        return self._backend.compare_and_swap(
            self._namespaces[scope], key, expected_version, value, ttl_ms
        )

    def delete(self, scope: Scope, key: str, expected_version: int | None) -> bool:
        return self._backend.delete(self._namespaces[scope], key, expected_version)
