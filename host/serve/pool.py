"""A fixed pool of invocation workers that refuses work when full instead of queueing.

`try_submit` either hands the job to a free worker (returning a future) or returns None at
once. A slot is given back when the job itself finishes, in the worker thread, so a
request whose client went away still holds its slot until the component call is done:
the count of running component calls never exceeds the pool size.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class InvocationPool:
    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError("the pool needs at least one worker")
        self.workers = workers
        self._slots = threading.BoundedSemaphore(workers)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="invoke")
        self._lock = threading.Lock()
        self._busy = 0

    @property
    def busy(self) -> int:
        with self._lock:
            return self._busy

    def try_submit(self, job: Callable[[], T]) -> Future[T] | None:
        if not self._slots.acquire(blocking=False):
            return None
        with self._lock:
            self._busy += 1

        def run() -> T:
            try:
                return job()
            finally:
                with self._lock:
                    self._busy -= 1
                self._slots.release()

        try:
            return self._executor.submit(run)
        except RuntimeError:  # shut down
            with self._lock:
                self._busy -= 1
            self._slots.release()
            return None

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
