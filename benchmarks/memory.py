"""Figure 4: peak RSS with 50 invocations in flight at once.

Runs in its own process (`python -m benchmarks.memory --json`), so the high-water mark is
this figure's alone. 50 threads each provision a new entity; the host's HTTP gateway
holds every create request (`HoldingGateway`) until all 50 are held, so all 50 sit inside
a component call at once (each with its own Store and instance) however slowly they
start; the figure is read then, and from VmHWM afterwards. The precondition is the count
of held requests, not a deadline: the wait fails only if no new create arrives for
`STALL_S` seconds (a host that stopped making progress).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

from benchmarks.support import (
    API_KEY,
    WIDE_OPEN,
    Hosts,
    QuietTelemetry,
    invocation,
    mock_e2b,
)
from benchmarks.table import Row, times
from harness.mocks.e2b import MockE2BServer
from host.runtime.component_runtime import ComponentRuntime, HostServices
from host.runtime.loader import load_component
from host.runtime.native import NativeRuntime
from host.services.http_gateway import HttpGateway
from host.storage.memory import MemoryBackend
from provisioner.model import SANDBOX_READY
from provisioner.ports import HttpRequest, HttpResponse

IN_FLIGHT = 50
STALL_S = 60.0
MIB = 1 << 20


class HoldingGateway(HttpGateway):
    """Holds create requests (POST .../sandboxes) while `holding`, counting them."""

    def __init__(self, e2b_url: str) -> None:
        super().__init__(e2b_url, API_KEY, allow_private_network=True)
        self._changed = threading.Condition()
        self._held = 0
        self._release = threading.Event()
        self._release.set()

    def send(
        self, request: HttpRequest, *, deadline_ms: int | None = None, api_key: str | None = None
    ) -> HttpResponse:
        if request.method.upper() == "POST" and request.url.rstrip("/").endswith("/sandboxes"):
            with self._changed:
                self._held += 1
                self._changed.notify_all()
            self._release.wait()
        return super().send(request, deadline_ms=deadline_ms, api_key=api_key)

    def hold(self) -> None:
        with self._changed:
            self._held = 0
        self._release.clear()

    def wait_until_held(self, count: int) -> None:
        """Until `count` creates are held; fails only after STALL_S without a new one."""
        with self._changed:
            while self._held < count:
                before = self._held
                self._changed.wait_for(partial(self._held_more_than, before), timeout=STALL_S)
                if self._held == before:
                    raise RuntimeError(
                        f"only {self._held} of {count} creates arrived; none in {STALL_S:.0f} s"
                    )

    def _held_more_than(self, seen: int) -> bool:
        return self._held > seen

    def release(self) -> None:
        self._release.set()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def hwm_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def _in_flight(
    count: int, tag: str, hosts: Hosts, gateway: HoldingGateway, mock: MockE2BServer
) -> int:
    """Starts `count` provisions at once; returns RSS when all `count` creates are held."""
    outcomes: list[str] = []
    lock = threading.Lock()

    def provision(index: int) -> None:
        outcome = hosts.component.invoke(invocation(mock.url, f"{tag}-{index}", config=WIDE_OPEN))
        with lock:
            outcomes.append(outcome.action)

    threads = [threading.Thread(target=provision, args=(i,)) for i in range(count)]
    gateway.hold()
    try:
        for thread in threads:
            thread.start()
        # All `count` inside their call at once, or the figure would price fewer.
        gateway.wait_until_held(count)
        during = rss_bytes()
    finally:
        gateway.release()
        for thread in threads:
            thread.join()
    if outcomes.count(SANDBOX_READY) != count:
        raise RuntimeError(f"not every invocation got its sandbox: {outcomes}")
    return during


def measure_here(component: Path | None = None) -> dict[str, int]:
    loaded = load_component(component)
    with mock_e2b() as mock:
        gateway = HoldingGateway(mock.url)
        services = HostServices(MemoryBackend(), gateway, QuietTelemetry(), account="bench")
        hosts = Hosts(services, ComponentRuntime(loaded, services), NativeRuntime(services), None)
        try:
            warm = hosts.component.invoke(invocation(mock.url, "warm-up", config=WIDE_OPEN))
            assert warm.action == SANDBOX_READY, warm
            idle = rss_bytes()
            one = _in_flight(1, "one", hosts, gateway, mock)
            many = _in_flight(IN_FLIGHT, "many", hosts, gateway, mock)
            peak = hwm_bytes()
        finally:
            hosts.close()
    return {
        "idle": idle,
        "one_in_flight": one,
        "many_in_flight": many,
        "peak_hwm": peak,
        "in_flight": IN_FLIGHT,
    }


def measure(component: Path | None = None) -> dict[str, int]:
    """In a fresh interpreter, so earlier benchmarks do not raise the high-water mark.
    Load `component` once here first: a compile in the child would count in its RSS."""
    load_component(component)
    command = [sys.executable, "-m", "benchmarks.memory", "--json"]
    if component is not None:
        command += ["--component", str(component)]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory benchmark failed:\n{result.stderr[-2000:]}")
    figures: dict[str, int] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def rows(figures: dict[str, int]) -> list[Row]:
    idle, one = figures["idle"], figures["one_in_flight"]
    many, peak = figures["many_in_flight"], figures["peak_hwm"]
    count = figures["in_flight"]
    per_call = (many - idle) / count
    return [
        Row(
            "4",
            f"peak RSS, {count} invocations in flight",
            f"{peak / MIB:.0f} MiB peak (VmHWM); {many / MIB:.0f} MiB with all {count} held",
            times(peak / idle),
            f"idle host, {idle / MIB:.0f} MiB",
        ),
        Row(
            "4",
            "RSS per invocation in flight",
            f"{per_call / MIB:.1f} MiB ({count} in flight); {(one - idle) / MIB:.1f} MiB (1)",
            times(per_call / max(1, one - idle)) if one > idle else "",
            "1 in flight",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="measure here, print JSON")
    parser.add_argument("--component", type=Path, default=None)
    args = parser.parse_args()
    if args.json:
        print(json.dumps(measure_here(args.component)))
        return
    from benchmarks.table import format_text

    print(format_text(rows(measure(args.component))))


if __name__ == "__main__":
    main()
