"""Stores closed after the answer (host.runtime.closing): in order, bounded, all by stop."""

from __future__ import annotations

import threading
from typing import cast

import pytest
import wasmtime

from host.runtime.closing import StoreCloser


class HeldStore:
    """Stands in for a wasmtime.Store whose close takes as long as the test says."""

    def __init__(self, name: str, log: list[str], gate: threading.Event | None = None) -> None:
        self.name, self.log, self.gate = name, log, gate

    def close(self) -> None:
        if self.gate is not None:
            assert self.gate.wait(10), "the test never let the close finish"
        self.log.append(f"closed {self.name}")


def store(held: HeldStore) -> wasmtime.Store:
    return cast(wasmtime.Store, held)


def test_the_caller_goes_on_while_the_store_closes_and_release_comes_after() -> None:
    log: list[str] = []
    gate = threading.Event()
    released = threading.Event()
    closer = StoreCloser()

    def release() -> None:
        log.append("released a")
        released.set()

    closer.close_later(store(HeldStore("a", log, gate)), release)
    assert log == []  # the close is still running: handing over did not wait for it
    gate.set()
    assert released.wait(10)
    closer.stop()
    assert log == ["closed a", "released a"]


def test_a_full_backlog_makes_the_caller_wait() -> None:
    log: list[str] = []
    gate = threading.Event()
    closer = StoreCloser(backlog=1)
    closer.close_later(store(HeldStore("a", log, gate)), lambda: None)
    handed_over = threading.Event()

    def second() -> None:
        closer.close_later(store(HeldStore("b", log)), lambda: None)
        handed_over.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert not handed_over.wait(0.2), "a second store was taken while the first still closed"
    gate.set()
    assert handed_over.wait(10)
    thread.join()
    closer.stop()
    assert log == ["closed a", "closed b"]


def test_stop_closes_every_store_handed_over_and_later_ones_close_at_once() -> None:
    log: list[str] = []
    closer = StoreCloser(backlog=8)
    for name in "abc":
        closer.close_later(store(HeldStore(name, log)), lambda: None)
    closer.stop()
    assert log == ["closed a", "closed b", "closed c"]
    closer.close_later(store(HeldStore("late", log)), lambda: log.append("released late"))
    assert log[-2:] == ["closed late", "released late"]


def test_a_close_that_fails_still_releases_and_the_closer_serves_on() -> None:
    class Broken:
        def close(self) -> None:
            raise wasmtime.WasmtimeError("close failed")

    log: list[str] = []
    released = threading.Event()
    closer = StoreCloser(backlog=1)
    closer.close_later(cast(wasmtime.Store, Broken()), released.set)
    assert released.wait(10)
    closer.close_later(store(HeldStore("next", log)), lambda: None)
    closer.stop()
    assert log == ["closed next"]


def test_a_backlog_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="backlog"):
        StoreCloser(backlog=0)
