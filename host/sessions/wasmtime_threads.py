"""A workaround for a thread-safety bug in wasmtime-py's component bindings (50.0.1).

Lowering a value into an untagged WIT variant (a `result`/`option` whose cases have
distinct Python types, e.g. what the storage and http imports return) goes through one
module-level scratch set, `wasmtime.component._types.case_test_cache`, which is cleared
and refilled on every call. A thread switch between the refill and the `isinstance` that
reads it lets another thread's lowering corrupt it, and a valid host return value then
fails: a compare-and-swap's version (an `int`) judged against the error case gave
"expected Variant type" with 64 concurrent invocations. (Most "value not valid for this
variant" errors seen at the same time were another, deterministic bug: error values for
`result<option<T>, E>`, fixed in host/runtime.py.) Giving each thread its own scratch set
removes the race; the bindings' behaviour is otherwise unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from wasmtime.component import _types


class _PerThreadSet:
    """The slice of the `set` interface the bindings use, one set per thread."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _set(self) -> set[type]:
        current: set[type] | None = getattr(self._local, "set", None)
        if current is None:
            current = set()
            self._local.set = current
        return current

    def clear(self) -> None:
        self._set().clear()

    def add(self, item: type) -> None:
        self._set().add(item)

    def __iter__(self) -> Iterator[type]:
        return iter(self._set())

    def __len__(self) -> int:
        return len(self._set())

    def __contains__(self, item: object) -> bool:
        return item in self._set()


_lock = threading.Lock()


def make_variant_lowering_thread_safe() -> None:
    """Idempotent; call before invoking components from several threads."""
    with _lock:
        if not isinstance(getattr(_types, "case_test_cache", None), _PerThreadSet):
            _types.case_test_cache = _PerThreadSet()  # type: ignore[assignment]
