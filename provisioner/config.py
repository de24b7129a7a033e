"""The integration config: every key once in `KEYS` (type, bounds, aliases, field), read by
`read_config`; a key's default is its field's default in the typed object. A bad
value is `invalid_config` for every operation, before any state changes; the rules every
key follows are in docs/gates.md ("Outside `gates/`").
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, TypeVar

from provisioner.failures import FailureCode
from provisioner.model import ProvisionerError, unresolved

# The old module's TemperFS base when `temper_api_url` is blank or an unresolved template.
DEFAULT_TEMPER_API_URL = "http://127.0.0.1:3000"
_URL_FORBIDDEN = re.compile(r"[\s?#]")
_TEMPLATE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_DAY_S = 86_400.0
_NONE_WORDS = ("none", "null", "off", "unlimited")


@dataclass(frozen=True)
class SandboxSettings:
    api_url: str = "https://api.e2b.app"
    template_id: str = "base"
    sandbox_timeout_s: int = 3600
    create_timeout_ms: int = 60_000
    request_timeout_ms: int = 15_000
    static_url: str = ""
    temper_api_url: str = DEFAULT_TEMPER_API_URL
    temperfs: str = "auto"
    api_key_source: str = "host"
    temperfs_enabled: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> SandboxSettings:
        values = _read("sandbox", config)
        # `auto`: a config without `temper_api_url` is a deployment without TemperFS.
        mode = values.get("temperfs", cls.temperfs)
        if mode == "on" or (mode == "auto" and "temper_api_url" in config):
            values["temperfs_enabled"] = True
        return _sparse(cls, values)


@dataclass(frozen=True)
class AdmissionConfig:
    create_slots: int = 4
    create_rate_per_s: float = 1.0
    create_burst: int = 1
    max_sandboxes: int = 20
    max_sandboxes_per_tenant: int | None = None
    queue_timeout_ms: int = 1_800_000
    waiter_ttl_ms: int = 60_000
    create_lease_ms: int = 150_000
    backoff_base_ms: int = 500
    backoff_cap_ms: int = 30_000
    retry_budget: float = 10.0
    retry_ratio: float = 0.2
    retry_refill_per_s: float = 0.1
    max_create_attempts: int = 6
    capacity_grow_after: int = 5
    poll_min_ms: int = 200
    poll_max_ms: int = 15_000
    create_latency_ms: int = 3_000
    reservation_claim_ms: int = 10_000
    cas_retries: int = 16

    @property
    def rate_interval_ms(self) -> float:
        return 1000.0 / self.create_rate_per_s

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> AdmissionConfig:
        return _sparse(cls, _read("admission", config))


# Resource gates: a limit per (kind, scope); rates are per minute.
KINDS = ("concurrency", "rpm", "itpm", "otpm")
RATE_KINDS = KINDS[1:]
ACCOUNT, TENANT = "account", "tenant"
_SCOPE_PREFIX = {ACCOUNT: "", TENANT: "tenant_"}


@dataclass(frozen=True, slots=True)
class Limit:
    """Permits held at once, or units per minute with a burst (None: one minute's worth)."""

    amount: float
    burst: float | None = None


@dataclass(frozen=True)
class ResourceGate:
    """A named resource gate: a `Limit` per declared (kind, scope); `queue_timeout_ms` None
    means the admission setting's."""

    name: str
    limits: dict[tuple[str, str], Limit] = field(default_factory=dict)
    lease_ms: int = 600_000
    queue_timeout_ms: int | None = None
    stall_timeout_ms: int | None = None

    def permits(self, scope: str) -> int | None:
        limit = self.limits.get(("concurrency", scope))
        return None if limit is None else int(limit.amount)

    def rates(self) -> Iterator[tuple[str, str, Limit]]:
        """Every declared rate, account first, each as rpm, itpm, otpm (the order of reasons)."""
        for scope in (ACCOUNT, TENANT):
            for kind in RATE_KINDS:
                limit = self.limits.get((kind, scope))
                if limit is not None:
                    yield kind, scope, limit

    def key(self, kind: str, scope: str) -> str:
        return f"{RESOURCE_PREFIX}{self.name}.{_SCOPE_PREFIX[scope]}{kind}"


@dataclass(frozen=True, slots=True)
class Config:
    sandbox: SandboxSettings
    admission: AdmissionConfig
    resources: dict[str, ResourceGate] = field(default_factory=dict)


def read_config(config: Mapping[str, str]) -> Config:
    check_keys(config)
    sandbox = SandboxSettings.from_config(config)
    admission = AdmissionConfig.from_config(config)
    # A create slot whose lease ends before its request gives up: a late Created answer could
    # then find the entity granted a second create.
    if admission.create_lease_ms <= sandbox.create_timeout_ms:
        _refuse(
            f"create_lease_s ({admission.create_lease_ms} ms) must be longer than "
            f"create_timeout_ms ({sandbox.create_timeout_ms} ms)"
        )
    return Config(sandbox, admission, read_resources(config))


# ---------------------------------------------------------------------------- the table

Section = Literal["sandbox", "admission", "host", "resource"]
Type = Literal["int", "real", "positive", "duration", "text"]


def _refuse(message: str) -> NoReturn:
    raise ProvisionerError(FailureCode.INVALID_CONFIG, message)


def _show(number: float) -> str:
    return str(int(number)) if number == int(number) else f"{number:g}"


@dataclass(frozen=True, slots=True)
class Key:
    """One config key. Bounds are inclusive, in the key's unit (a `duration`: above 0, at
    most `high` seconds). `at_most`/`requires`: a key this one must not exceed/must come with."""

    name: str
    section: Section
    type: Type
    low: float = 1
    high: float = _DAY_S
    aliases: tuple[str, ...] = ()
    field: str = ""  # the typed object's field; the name (in ms) when not given
    parse: Callable[[str, str], Any] | None = None
    blank_ok: bool = True
    nullable: bool = False
    at_most: str | None = None
    requires: str | None = None

    def __post_init__(self) -> None:
        field = self.field or self.name
        if self.type == "duration" and self.name.endswith("_s"):
            # Named in seconds: also spelled, and always held, in milliseconds.
            field = self.field or self.name[:-2] + "_ms"
            object.__setattr__(self, "aliases", (field, *self.aliases))
        object.__setattr__(self, "field", field)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def default(self) -> Any:
        return getattr(_OWNERS.get(self.section), self.field, None)

    def read(self, key: str, raw: str) -> Any:
        """`raw` spelled as `key` (a name or alias, with any prefix); the cheap checks first."""
        if self.parse is not None:
            return self.parse(key, raw)
        text = raw.strip()
        if self.nullable and text.lower() in _NONE_WORDS:
            return None
        try:
            value = float(text)
        except ValueError:
            _refuse(f"{key} must be a number, got {raw[:40]!r}")
        millis = self.type == "duration" and key.endswith("_ms")
        whole = self.type == "int" or millis
        high = self.high * 1000 if millis else self.high
        above_zero = self.type in ("positive", "duration")
        if (value > 0 if above_zero else value >= self.low) and value <= high:
            if self.type == "duration" and not millis:
                return max(1, round(value * 1000))  # seconds, kept in milliseconds
            if not whole:
                return value
            if value.is_integer():
                return int(value)
        got = f", got {raw[:40]!r}"
        if not math.isfinite(value):
            _refuse(f"{key} must be a finite number{got}")
        if whole and not value.is_integer():
            _refuse(f"{key} must be an integer{got}")
        low = "above 0" if above_zero else f"at least {_show(self.low)}"
        _refuse(f"{key} must be {low} and at most {_show(high)}{got}")


def _url(key: str, raw: str) -> str:
    url = raw.strip().rstrip("/")
    if not url.startswith(("https://", "http://")) or _URL_FORBIDDEN.search(url):
        _refuse(f"{key} must be an http(s) URL without query or fragment")
    return url


def _temper_url(key: str, raw: str) -> str:
    return DEFAULT_TEMPER_API_URL if unresolved(raw) else _url(key, raw)


def _static_url(key: str, raw: str) -> str:
    return "" if unresolved(raw) else raw.strip()


def _template_id(key: str, raw: str) -> str:
    template_id = raw.strip()
    if not _TEMPLATE_ID.fullmatch(template_id):
        _refuse(f"{key} must be 1-128 letters, digits or ._:/-, starting with a letter or digit")
    return template_id


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(key: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            _refuse(f"{key} must be one of {', '.join(choices)}, got {raw[:40]!r}")
        return value

    return parse


def _resource_rows() -> Iterator[Key]:
    for prefix in _SCOPE_PREFIX.values():
        yield Key(f"{prefix}concurrency", "resource", "int", high=1e6,
                  at_most="concurrency" if prefix else None)  # fmt: skip
        for kind in RATE_KINDS:
            yield Key(prefix + kind, "resource", "positive", high=1e9,
                      at_most=kind if prefix else None)  # fmt: skip
            yield Key(f"{prefix}{kind}_burst", "resource", "real", high=1e9,
                      requires=prefix + kind)  # fmt: skip


# What each key means, as users read it: docs/contract.md and docs/admission.md (their
# tables and this one name the same keys and defaults: tests/guest/test_config_definition.py).
KEYS: tuple[Key, ...] = (
    Key("e2b_api_url", "sandbox", "text", field="api_url", parse=_url, blank_ok=False),
    Key("template_id", "sandbox", "text", aliases=("e2b_template_id",), parse=_template_id,
        blank_ok=False),
    Key("sandbox_timeout_s", "sandbox", "int", high=86_400),
    Key("create_timeout_ms", "sandbox", "int", low=1_000, high=110_000),
    Key("request_timeout_ms", "sandbox", "int", low=500, high=60_000),
    Key("sandbox_url", "sandbox", "text", field="static_url", parse=_static_url),
    Key("temper_api_url", "sandbox", "text", parse=_temper_url),
    Key("temperfs", "sandbox", "text", parse=_choice("auto", "on", "off")),
    # Written by the host (where the E2B key it attaches comes from); the key itself, the
    # host takes out of the config.
    Key("e2b_api_key_source", "sandbox", "text", field="api_key_source",
        parse=_choice("config", "host", "none")),
    Key("e2b_api_key", "host", "text"),
    Key("create_slots", "admission", "int", high=1_000),
    Key("create_rate_per_s", "admission", "positive", high=1_000),
    Key("create_burst", "admission", "int", high=1_000),
    Key("max_sandboxes", "admission", "int", high=100_000),
    Key("max_sandboxes_per_tenant", "admission", "int", high=100_000, nullable=True,
        at_most="max_sandboxes"),
    Key("queue_timeout_s", "admission", "duration", aliases=("queue_timeout_seconds",)),
    Key("waiter_ttl_s", "admission", "duration"),
    Key("create_lease_s", "admission", "duration"),
    Key("backoff_base_ms", "admission", "duration", at_most="backoff_cap_ms"),
    Key("backoff_cap_ms", "admission", "duration"),
    Key("retry_budget", "admission", "real", low=0, high=1e6),
    Key("retry_ratio", "admission", "real", low=0, high=100),
    Key("retry_refill_per_s", "admission", "real", low=0, high=1e4),
    Key("max_create_attempts", "admission", "int", high=1_000),
    Key("capacity_grow_after", "admission", "int", high=1e6),
    Key("poll_min_ms", "admission", "duration", at_most="poll_max_ms"),
    Key("poll_max_ms", "admission", "duration"),
    Key("create_latency_ms", "admission", "duration"),
    Key("reservation_claim_ms", "admission", "duration"),
    Key("cas_retries", "admission", "int", high=1_000),
    *_resource_rows(),
    Key("lease_s", "resource", "duration"),
    Key("queue_timeout_s", "resource", "duration"),
    Key("stall_timeout_s", "resource", "duration"),
)  # fmt: skip

KEYS_BY_NAME: dict[str, Key] = {
    name: row for row in KEYS if row.section != "resource" for name in row.names
}
_OWNERS: dict[str, type] = {
    "sandbox": SandboxSettings, "admission": AdmissionConfig, "resource": ResourceGate
}  # fmt: skip
# Per section: each spelling's row, in the table's order (precedence, which bad key is
# reported first), and the rows that name another key.
_ROWS = {
    section: {name: row for row in KEYS if row.section == section for name in row.names}
    for section in _OWNERS
}
_RELATED = {
    section: tuple(row for row in KEYS if row.section == section and (row.at_most or row.requires))
    for section in _OWNERS
}
_LIMITS = _ROWS["resource"]

_T = TypeVar("_T")


def _sparse(cls: type[_T], values: dict[str, Any]) -> _T:
    """A frozen settings object holding only `values` (the others read the class defaults):
    the generated frozen `__init__` costs more guest fuel than the parsing."""
    instance = object.__new__(cls)
    instance.__dict__.update(values)
    return instance


def _read(section: str, config: Mapping[str, str], prefix: str = "") -> dict[str, Any]:
    """The fields `config` sets in `section`; every spelling present is validated."""
    values: dict[str, Any] = {}
    for name, row in _ROWS[section].items():
        raw = config.get(name)
        if raw is None or (row.blank_ok and not str(raw).strip()):
            continue
        values.setdefault(row.field, row.read(prefix + name, str(raw)))
    _check_relations(section, values, prefix)
    return values


def _check_relations(section: str, values: dict[str, Any], prefix: str) -> None:
    owner = _OWNERS[section]
    for row in _RELATED[section]:
        if row.field not in values and row.at_most not in values:
            continue
        if row.at_most is not None:
            value = values.get(row.field, getattr(owner, row.field, None))
            bound = values.get(row.at_most, getattr(owner, row.at_most, None))
            if value is not None and bound is not None and value > bound:
                _refuse(f"{prefix}{row.name} must not exceed {prefix}{row.at_most}")
        if row.requires is not None and values.get(row.requires) is None:
            _refuse(f"{prefix}{row.name} is set without {prefix}{row.requires}")


# ------------------------------------------------------------ unknown keys, resource gates

# Keys read outside the table (provisioner/gates/resource.py).
OPERATION_KEYS = frozenset(
    {"operation", "resource", "granted_action", "queued_action", "settled_action",
     "released_action"}
)  # fmt: skip
# Not the component's, accepted silently: Temper's budgets, the shim's two, serve's `hold_ms`.
FOREIGN_KEYS = frozenset(
    {"timeout_secs", "max_fuel", "max_memory", "max_response_bytes", "provisioner_url",
     "provisioner_token", "hold_ms"}
)  # fmt: skip
_ACCEPTED = KEYS_BY_NAME.keys() | OPERATION_KEYS | FOREIGN_KEYS
RESOURCE_PREFIX = "resource."
# Lower-case: `resource.LLM.rpm` and `resource.llm.rpm` cannot name two gates.
RESOURCE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def check_keys(config: Mapping[str, str]) -> None:
    """Refuse a key nobody reads (a typo would silently keep the default), naming the nearest."""
    for key in config:
        if key in _ACCEPTED or key.startswith(RESOURCE_PREFIX):
            continue
        nearest = difflib.get_close_matches(key, sorted(_ACCEPTED), n=1, cutoff=0.6)
        hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
        _refuse(f"unknown config key {key[:80]!r}{hint}")


def read_resources(config: Mapping[str, str]) -> dict[str, ResourceGate]:
    """The declared resource gates by name; a misspelt limit must not leave a gate open."""
    declared: dict[str, dict[str, str]] = {}
    for key, raw in config.items():
        if not key.startswith(RESOURCE_PREFIX):
            continue
        name, dot, limit = key[len(RESOURCE_PREFIX) :].partition(".")
        if not dot or not RESOURCE_NAME.fullmatch(name):
            _refuse(
                f"{key[:80]!r} is not resource.<name>.<limit> with a name of 1-32 lower-case "
                "letters, digits, _ or -, starting with a letter"
            )
        if limit not in _LIMITS:
            _refuse(f"{key[:80]!r}: unknown limit {limit[:40]!r} (one of {', '.join(_LIMITS)})")
        declared.setdefault(name, {})[limit] = raw
    gates: dict[str, ResourceGate] = {}
    for name, limits in sorted(declared.items()):
        values = _read("resource", limits, f"{RESOURCE_PREFIX}{name}.")
        if not values:
            continue
        found: dict[tuple[str, str], Limit] = {}
        for scope, prefix in _SCOPE_PREFIX.items():
            for kind in KINDS:
                amount = values.pop(prefix + kind, None)
                if amount is not None:
                    found[kind, scope] = Limit(amount, values.pop(f"{prefix}{kind}_burst", None))
        if not found:
            _refuse(
                f"resource {name!r} declares no limit (set resource.{name}.concurrency, "
                "rpm, itpm, otpm or a tenant_ one)"
            )
        gates[name] = ResourceGate(name, found, **values)
    return gates
