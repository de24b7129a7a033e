"""Closing a call's store after its answer is out.

Closing a store frees its instance: on the pooling allocator wasmtime restores the slot's
memory image in place (the C API offers no dirty-page scan), on demand it unmaps the
dirtied memory. Either is a large share of a held provision's time
(docs/host-performance.md), and none of it changes the answer, so `StoreCloser` does it on
one background thread: the caller returns as soon as the guest has answered.

The contract is unchanged. A closed store's instance is unreachable (nothing else holds
the store), and wasmtime hands a pool slot to a new instance only after the reset, so no
instance ever sees a previous call's memory (tests/host/runtime/test_pristine.py). The
backlog is bounded: a caller waits while `backlog` stores are still closing, so memory
held by closing stores stays bounded whatever the call rate; `close` waits for them all.
The CPU spent is the same; it moves to another core while the caller goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import wasmtime

CLOSE_BACKLOG = 4
log = logging.getLogger(__name__)


class StoreCloser:
    """Closes stores on a background thread, at most `backlog` waiting at once."""

    def __init__(self, backlog: int = CLOSE_BACKLOG) -> None:
        if backlog < 1:
            raise ValueError("backlog must be at least 1")
        self._room = threading.BoundedSemaphore(backlog)
        self._queue: queue.SimpleQueue[tuple[wasmtime.Store, Callable[[], None]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name="store-closer", daemon=True)
        self._started = False
        self._lock = threading.Lock()
        self._stopped = False

    def close_later(self, store: wasmtime.Store, then: Callable[[], None]) -> None:
        """Close `store`, then call `then` (which gives back what the store held)."""
        self._room.acquire()
        with self._lock:
            if self._stopped:
                self._room.release()
                _close(store, then)
                return
            if not self._started:
                self._thread.start()
                self._started = True
            self._queue.put((store, then))

    def stop(self) -> None:
        """Close every store handed over so far, then end the thread."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            started = self._started
        if started:
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            store, then = item
            try:
                _close(store, then)
            except Exception:  # the thread must outlive one bad store
                log.exception("closing a store failed")
            finally:
                self._room.release()


def _close(store: wasmtime.Store, then: Callable[[], None]) -> None:
    try:
        store.close()
    finally:
        then()


def _nothing() -> None:
    pass


NOTHING_TO_RELEASE: Callable[[], None] = _nothing

__all__ = ["CLOSE_BACKLOG", "NOTHING_TO_RELEASE", "StoreCloser"]
