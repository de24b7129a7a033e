"""What the mock E2B server does: limits, latency and faults, as one immutable value.

The defaults are permissive (no limits, no latency, no faults) so that
``MockE2BConfig(api_key="k")`` behaves like an idle E2B account; scenarios such as the
incident's (Hobby plan: 20 sandboxes, 1 create/s) are set by the caller.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from harness.mocks.shared.config import MockConfig

FaultKind = Literal["status", "reset", "hang", "malformed_json", "slow_body"]
FaultRoute = Literal[
    "create",
    "kill",
    "get",
    "list",
    "timeout",
    "refresh",
    "connect",
    "pause",
    "resume",
    # The mock TemperFS's requests (harness/mocks/temperfs), which share this grammar.
    "tdata",
    "any",
]
OverloadMode = Literal["reject", "slow"]

FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)
FAULT_ROUTES: tuple[str, ...] = get_args(FaultRoute)
OVERLOAD_MODES: tuple[str, ...] = get_args(OverloadMode)

# E2B's documented plan limits: concurrent sandboxes and sandbox creations per second.
PLANS: dict[str, dict[str, Any]] = {
    "hobby": {"max_sandboxes": 20, "create_rate_per_s": 1.0},
    "pro": {"max_sandboxes": 100, "create_rate_per_s": 5.0},
}


@dataclass(frozen=True)
class FaultRule:
    """One way a request can fail, and when.

    A rule fires either by ``probability`` (drawn from the server's seeded fault stream) or
    for the route's requests numbered ``first`` to ``last`` (1-based, both included: "creates
    3 to 6 fail" is ``FaultRule(first=3, last=6)``), or both (scheduled requests, then drawn).
    With ``after_create`` a create fault answers only after the sandbox exists, so the client
    never learns the id of a sandbox that is running: the way orphans are made.
    """

    kind: FaultKind = "status"
    status: int = 503
    should_retry: bool | None = None
    probability: float | None = None
    first: int | None = None
    last: int | None = None
    route: FaultRoute = "create"
    after_create: bool = False

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")
        if self.route not in FAULT_ROUTES:
            raise ValueError(f"unknown fault route {self.route!r}; expected one of {FAULT_ROUTES}")
        if not 400 <= self.status <= 599:
            raise ValueError(f"fault status must be 4xx or 5xx, got {self.status}")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"fault probability must be in [0, 1], got {self.probability}")
        if self.first is not None and self.first < 1:
            raise ValueError("fault schedules count requests from 1")
        if self.last is not None and self.first is not None and self.last < self.first:
            raise ValueError(f"empty fault schedule {self.first}..{self.last}")
        if self.probability is None and self.first is None and self.last is None:
            raise ValueError("a fault needs a probability or a schedule (first/last)")

    def is_scheduled_for(self, ordinal: int) -> bool:
        """Whether ``ordinal`` (the route's request number) is inside this rule's schedule."""
        if self.first is None and self.last is None:
            return True
        lo = self.first if self.first is not None else 1
        hi = self.last if self.last is not None else math.inf
        return lo <= ordinal <= hi

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FaultRule:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        return cls(**dict(data))


@dataclass(frozen=True)
class Storm:
    """Every create arriving in [start_ms, end_ms) (since the mock started or was reset)
    gets a 429 whose Retry-After points at the storm's end."""

    start_ms: int
    end_ms: int

    def __post_init__(self) -> None:
        if not 0 <= self.start_ms < self.end_ms:
            raise ValueError(f"a storm needs 0 <= start_ms < end_ms, got {self}")


_FAULT_HEAD = re.compile(r"^(?P<status>[45]\d\d)(?P<retry>\+retry|-noretry)?$")
_KIND_ALIASES: dict[str, FaultKind] = {
    "reset": "reset",
    "hang": "hang",
    "malformed": "malformed_json",
    "malformed-json": "malformed_json",
    "malformed_json": "malformed_json",
    "slow-body": "slow_body",
    "slow_body": "slow_body",
}


def parse_fault(spec: str) -> FaultRule:
    """Parse the command-line form of a fault.

    ``HEAD[:OPTION]...`` where HEAD is a status (``503``), a status whose answer says
    ``Should-Retry: true`` (``503+retry``) or ``false`` (``503-noretry``), or one of
    ``reset``, ``hang``, ``malformed``, ``slow-body``; OPTIONs are ``p=0.1`` (probability),
    ``n=3-6`` / ``n=3-`` / ``n=4`` (schedule over the route's requests), ``route=create`` and
    ``after-create``. Example: ``502:n=3-6:after-create``.
    """
    head, *options = [part.strip() for part in spec.strip().split(":")]
    fields: dict[str, Any] = {}
    match = _FAULT_HEAD.match(head)
    if match:
        fields["kind"] = "status"
        fields["status"] = int(match["status"])
        retry = match["retry"]
        fields["should_retry"] = None if retry is None else retry == "+retry"
    elif head in _KIND_ALIASES:
        fields["kind"] = _KIND_ALIASES[head]
    else:
        raise ValueError(f"unknown fault {head!r} in {spec!r}")
    for option in options:
        name, _, value = option.partition("=")
        if name == "p":
            fields["probability"] = float(value)
        elif name == "n":
            lo, dash, hi = value.partition("-")
            fields["first"] = int(lo)
            fields["last"] = (int(hi) if hi else None) if dash else int(lo)
        elif name == "route":
            fields["route"] = value
        elif name == "after-create" and not value:
            fields["after_create"] = True
        else:
            raise ValueError(f"unknown fault option {option!r} in {spec!r}")
    return FaultRule(**fields)


@dataclass(frozen=True)
class MockE2BConfig(MockConfig):
    """Everything that shapes the mock's answers. Times are in the unit their name says."""

    api_key: str = "e2b_mock_key"
    seed: int = 0
    # Seeded lognormal create latency: the median, the spread (log-space sigma; 0 = fixed)
    # and a ceiling.
    create_latency_ms: float = 0.0
    create_latency_sigma: float = 0.0
    create_latency_max_ms: float | None = None
    # A uniform addition in [0, jitter] to each create's latency.
    create_latency_jitter_ms: float = 0.0
    # Route rate limit on creates (GCRA): sustained rate and burst. None = unlimited.
    create_rate_per_s: float | None = None
    create_burst: int = 1
    # Create requests in flight at once; past the cap either 429 ("reject") or wait for a
    # slot ("slow"), answering 504 after ``create_overload_timeout_ms`` if set.
    max_concurrent_creates: int | None = None
    create_overload_mode: OverloadMode = "reject"
    create_overload_timeout_ms: float | None = None
    # Concurrent sandboxes per team; a kill gives its slot back only after the lag.
    max_sandboxes: int | None = None
    kill_capacity_lag_ms: float = 0.0
    # Sandboxes other users of the account run: they count against ``max_sandboxes``.
    foreign_sandboxes: int = 0
    # Windows in which every create is answered 429 (E2B under someone else's load).
    storms: tuple[Storm, ...] = ()
    # The cap's 429 carries no Retry-After. What it says in ``Should-Retry``: e2b SDK >= 2.x
    # retries a 429 *without* that header (with backoff), so "false" keeps the SDK from
    # retrying the cap; None omits the header.
    capacity_should_retry: str | None = "false"
    # Sandbox lifetime bounds, seconds. E2B's default is 15 s (spec: NewSandbox.timeout and
    # ResumedSandbox.timeout default 15; a refresh is never shorter: infra
    # packages/api/internal/sandbox/sandboxtypes/states.go SandboxTimeoutDefault); at most
    # 24 h on Pro.
    default_timeout_s: int = 15
    max_timeout_s: int = 86_400
    # Rules; JSON objects and command-line strings are accepted too and turned into rules.
    faults: tuple[FaultRule, ...] = ()
    hang_s: float = 3600.0
    slow_body_ms: float = 2000.0
    envd_version: str = "0.2.0"
    domain: str | None = None

    def __post_init__(self) -> None:
        if not self.api_key:
            raise ValueError("api_key must not be empty")
        for name in (
            "create_latency_ms",
            "create_latency_sigma",
            "create_latency_jitter_ms",
            "kill_capacity_lag_ms",
            "foreign_sandboxes",
            "hang_s",
            "slow_body_ms",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.create_rate_per_s is not None and self.create_rate_per_s <= 0:
            raise ValueError("create_rate_per_s must be > 0 (None disables the limit)")
        if self.create_burst < 1:
            raise ValueError("create_burst must be >= 1")
        for name in ("max_concurrent_creates", "max_sandboxes"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 (None disables the limit)")
        if self.create_overload_mode not in OVERLOAD_MODES:
            raise ValueError(f"create_overload_mode must be one of {OVERLOAD_MODES}")
        if self.default_timeout_s <= 0 or self.max_timeout_s < self.default_timeout_s:
            raise ValueError("need 0 < default_timeout_s <= max_timeout_s")
        # Faults may be given as rules, JSON objects or command-line strings; storms as
        # storms or JSON objects.
        object.__setattr__(self, "faults", coerce_faults(self.faults))
        storms = tuple(s if isinstance(s, Storm) else Storm(**dict(s)) for s in self.storms)
        object.__setattr__(self, "storms", storms)

    @classmethod
    def for_plan(cls, plan: str, **changes: Any) -> MockE2BConfig:
        """An E2B plan's limits (``hobby``: 20 sandboxes, 1 create/s; ``pro``: 100, 5/s),
        then ``changes``."""
        return cls.from_preset("plan", plan, PLANS, changes)

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        data["faults"] = [rule.to_json() for rule in self.faults]
        return data


def coerce_faults(faults: Sequence[FaultRule | Mapping[str, Any] | str]) -> tuple[FaultRule, ...]:
    """Faults as rules, from rules, JSON objects or command-line strings."""
    if isinstance(faults, str):
        raise TypeError("faults must be a list, not a single string")
    rules: list[FaultRule] = []
    for item in faults:
        if isinstance(item, FaultRule):
            rules.append(item)
        elif isinstance(item, str):
            rules.append(parse_fault(item))
        else:
            rules.append(FaultRule.from_json(item))
    return tuple(rules)
