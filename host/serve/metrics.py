"""`GET /metrics` of `sandbox-provisioner serve`: Prometheus exposition through the official
client (`prometheus-client`), on a registry of the service's own (never the global one).

Three sources:

- the invocations the service ran (`observe_invocation`): counts by outcome action and
  reason, and by tenant and action, the decision latency (the component call, queue wait
  excluded), 503s refused for saturation, and the workers busy;
- the requests refused before anything ran (`observe_refusal`): by code, and the
  forbidden-tenant 403s by client name. `exposition(sees)` keeps only the series a
  client may read: a tenant's client sees its own `tenant` and `client` labels only
  (`access.label_filter`, docs/tenancy.md);
- the HTTP gateway (`observe_exchange`, hooked with `HttpGateway.observe`): E2B answers by
  method and status, requests that got no answer by error kind, and 429s by kind, read off
  the wire: `rate_limit` (E2B's route rate limiter and its concurrent-create limit, both
  sending `Retry-After`) or `sandbox_cap` (the concurrent-sandbox cap, which sends none);
- the account's gates, read at each scrape by asking the component (`operation = inspect`,
  via `host.operator.gates`): create slots,
  capacity, rate, backoff, retry budget, and the waiters by the reason they wait.
  Several `serve` processes on one Redis each report the same shared gates: aggregate
  those gauges with `max`, not `sum`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from host.serve.wakeups import RESULTS as WAKEUP_RESULTS
from host.services.http_gateway import Exchange
from provisioner.model import Outcome

if TYPE_CHECKING:
    from host.operator.gates import GateDoc
    from host.serve.hold import HeldAnswer

PREFIX = "sandbox_provisioner"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# The component call: from a few milliseconds (a queued answer) to a slow create, up to
# Temper's 120 s invocation deadline.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# The reasons a waiter can be held by (SandboxQueued `reason`), always exported so a
# drained queue reads 0 rather than vanishing.
WAIT_REASONS = ("create_slots", "rate", "capacity", "backoff", "storage")
# A held request: from one ask again a few milliseconds on to the whole window.
HOLD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0, 110.0)
KIND_RATE_LIMIT = "rate_limit"
KIND_SANDBOX_CAP = "sandbox_cap"


def outcome_reason(outcome: Outcome) -> str:
    """The `reason` label: SandboxQueued's reason, a failure's code, else `none`."""
    reason = outcome.params.get("reason")
    if isinstance(reason, str) and reason:
        return reason
    if outcome.error is not None:
        return outcome.error.code
    return "none"


def too_many_requests_kind(exchange: Exchange) -> str | None:
    response = exchange.response
    if response is None or response.status != 429:
        return None
    # E2B's limiters say when to come back; its sandbox cap cannot know, and says nothing.
    if response.header("retry-after") is None:
        return KIND_SANDBOX_CAP
    return KIND_RATE_LIMIT


class GateCollector:
    """The account's gates, read at scrape time (so a drained queue reads 0 at once)."""

    def __init__(self, read: Callable[[], GateDoc]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            f"{PREFIX}_gates_up", "1 when the gate state could be read from storage"
        )
        try:
            report = self._read()
        except Exception:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        in_use = GaugeMetricFamily(
            f"{PREFIX}_gate_in_use", "Permits held per gate", labels=["gate"]
        )
        in_use.add_metric(["create_slots"], report["create_slots"]["in_use"])
        in_use.add_metric(["capacity"], report["capacity"]["in_use"])
        yield in_use
        limit = GaugeMetricFamily(
            f"{PREFIX}_gate_limit",
            "Limit per gate (capacity: the effective limit; rate: the burst)",
            labels=["gate"],
        )
        limit.add_metric(["create_slots"], report["create_slots"]["limit"])
        limit.add_metric(["capacity"], report["capacity"]["effective_limit"])
        limit.add_metric(["rate"], report["rate"]["burst"])
        yield limit
        single = (
            (
                "rate_available",
                "Creates the rate gate would allow now",
                report["rate"]["available"],
            ),
            (
                "backoff_cooling_seconds",
                "Time left of the shared E2B cooldown",
                report["backoff"]["cooling_ms"] / 1000,
            ),
            (
                "retry_budget_tokens",
                "Retries the retry budget would pay for now",
                report["retry_budget"]["tokens"],
            ),
            ("queue_length", "Waiters in the account's queue", len(report["waiters"])),
        )
        for name, documentation, value in single:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)
        by_reason = GaugeMetricFamily(
            f"{PREFIX}_queue_waiters",
            "Waiters by the gate that holds them back (SandboxQueued reason)",
            labels=["reason"],
        )
        counts = dict.fromkeys(WAIT_REASONS, 0)
        for waiter in report["waiters"]:
            counts[waiter["reason"]] = counts.get(waiter["reason"], 0) + 1
        for reason, count in sorted(counts.items()):
            by_reason.add_metric([reason], count)
        yield by_reason


class ServeMetrics:
    def __init__(
        self,
        *,
        read_gates: Callable[[], GateDoc] | None = None,
        workers_busy: Callable[[], int] | None = None,
        held_requests: Callable[[], int] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self.invocations = self._counter(
            "invocations",
            "Invocations the component answered, by outcome action and reason",
            "action",
            "reason",
        )
        self.decision_seconds = self._histogram(
            "decision_seconds",
            "Time the component took to answer an invocation",
            LATENCY_BUCKETS,
            "action",
        )
        self.tenant_invocations = self._counter(
            "tenant_invocations",
            "Invocations the component answered, by tenant and outcome action",
            "tenant",
            "action",
        )
        self.refused = self._counter(
            "refused",
            "Requests refused before anything ran, by code (unauthorized, forbidden_tenant, "
            "rate_limited, too_large, body_timeout)",
            "code",
        )
        self.forbidden_tenant = self._counter(
            "forbidden_tenant",
            "Invocations refused 403 because the client's token does not cover the tenant",
            "client",
        )
        self.saturated = self._counter(
            "saturated", "Invocations refused with 503 because every worker was busy"
        )
        self.e2b_responses = self._counter(
            "e2b_responses", "E2B answers by method and status", "method", "status"
        )
        self.e2b_errors = self._counter(
            "e2b_errors",
            "E2B requests that got no answer, by kind (timeout, connection, denied, ...)",
            "kind",
        )
        self.e2b_429 = self._counter(
            "e2b_429",
            "E2B 429 answers by kind: rate_limit (with Retry-After) or sandbox_cap",
            "kind",
        )
        for kind in (KIND_RATE_LIMIT, KIND_SANDBOX_CAP):
            self.e2b_429.labels(kind=kind)
        self.hold_seconds = self._histogram(
            "hold_seconds",
            "Time a queued invocation was held before its answer (held answers only)",
            HOLD_BUCKETS,
        )
        self.grants_after_hold = self._counter(
            "grants_after_hold",
            "Held invocations answered with the component's grant instead of SandboxQueued",
        )
        self.wakeups = self._counter(
            "wakeups",
            "Wake-ups by result: sent, moved_on (409), denied (401/403), retried and "
            "unavailable (503), unreachable, rejected (other status), no_credential, not_stored",
            "result",
        )
        for result in WAKEUP_RESULTS:  # exported at 0, not missing, before the first
            self.wakeups.labels(result=result)
        if held_requests is not None:
            held = self._gauge(
                "held_requests", "Invocations held open now, waiting to ask the component again"
            )
            held.set_function(lambda: float(held_requests()))
        if workers_busy is not None:
            busy = self._gauge("workers_busy", "Invocation workers running a component call")
            busy.set_function(lambda: float(workers_busy()))
        if read_gates is not None:
            self.registry.register(GateCollector(read_gates))

    # Every metric is `{PREFIX}_{name}` in the service's own registry.
    def _counter(self, name: str, documentation: str, *labels: str) -> Counter:
        return Counter(f"{PREFIX}_{name}", documentation, labels, registry=self.registry)

    def _histogram(
        self, name: str, documentation: str, buckets: Sequence[float], *labels: str
    ) -> Histogram:
        return Histogram(
            f"{PREFIX}_{name}", documentation, labels, buckets=buckets, registry=self.registry
        )

    def _gauge(self, name: str, documentation: str) -> Gauge:
        return Gauge(f"{PREFIX}_{name}", documentation, registry=self.registry)

    def observe_invocation(
        self, outcome: Outcome, seconds: float, tenant: str | None = None
    ) -> None:
        self.invocations.labels(action=outcome.action, reason=outcome_reason(outcome)).inc()
        self.decision_seconds.labels(action=outcome.action).observe(seconds)
        if tenant is not None:
            self.tenant_invocations.labels(tenant=tenant, action=outcome.action).inc()

    def observe_refusal(self, code: str, client: str | None = None) -> None:
        self.refused.labels(code=code).inc()
        if code == "forbidden_tenant" and client is not None:
            self.forbidden_tenant.labels(client=client).inc()

    def observe_hold(self, answer: HeldAnswer) -> None:
        self.hold_seconds.observe(answer.held_s)
        if answer.granted_after_hold:
            self.grants_after_hold.inc()

    def observe_wakeup(self, result: str) -> None:
        self.wakeups.labels(result=result).inc()

    def observe_saturated(self) -> None:
        self.saturated.inc()

    def observe_exchange(self, exchange: Exchange) -> None:
        method = exchange.request.method.upper()
        if exchange.response is not None:
            self.e2b_responses.labels(method=method, status=str(exchange.response.status)).inc()
        elif exchange.error is not None:
            self.e2b_errors.labels(kind=exchange.error.kind.value).inc()
        kind = too_many_requests_kind(exchange)
        if kind is not None:
            self.e2b_429.labels(kind=kind).inc()

    def exposition(self, sees: Callable[[Mapping[str, str]], bool] | None = None) -> bytes:
        """The text format; reads the gates from storage, so call it off the event loop.
        `sees`: which labelled series the caller may read (None: every series)."""
        with self._lock:
            if sees is None:
                return generate_latest(self.registry)
            visible = CollectorRegistry(auto_describe=False)
            visible.register(_Visible(self.registry, sees))
            return generate_latest(visible)


class _Visible:
    """The registry's metrics with only the samples whose labels `sees` accepts."""

    def __init__(self, registry: CollectorRegistry, sees: Callable[[Mapping[str, str]], bool]):
        self._registry = registry
        self._sees = sees

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            kept = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            kept.samples = [s for s in metric.samples if self._sees(s.labels)]
            yield kept
