"""The one reader of the integration config: every key, its default, bounds and meaning.

`SETTINGS` is the single definition of the keys the component reads (besides `operation`,
which `provisioner.invocation` reads to pick the operation). The defaults are the field
defaults of `SandboxSettings` and `AdmissionConfig`; the tables of docs/contract.md and
docs/admission.md are checked against this module by the tests, and hosts that need a
default import it from here.

`read_config` runs once per invocation and parses only the keys the config holds: a field
the config does not name keeps its default without being parsed or copied (the two
settings classes keep their defaults as class attributes, see `_sparse`). Every key present
is still validated for every operation, so an out-of-range value is `invalid_config`
whatever the operation, before any state changes.

Times in the config are seconds unless the key ends in `_ms`.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from provisioner.failures import FailureCode
from provisioner.model import ProvisionerError

_DAY_MS = 24 * 3600 * 1000

# Whitespace, query or fragment have no place in an API base URL.
_URL_FORBIDDEN = re.compile(r"[\s?#]")
# E2B template ids and aliases: letters, digits and a few separators.
_TEMPLATE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


# The old sandbox_provisioner's TemperFS base when `temper_api_url` is unusable
# (`temper_api_url` in its lib.rs: empty, blank or an unresolved `{secret:...}` template).
DEFAULT_TEMPER_API_URL = "http://127.0.0.1:3000"
# Temper resolves `{secret:name}` templates into the config before the invocation; one that
# is still there named a secret the tenant does not have.
UNRESOLVED_SECRET = "{secret:"
TEMPERFS_MODES = ("auto", "on", "off")
API_KEY_SOURCES = ("config", "host", "none")


def unresolved(value: str) -> bool:
    """Blank, or a `{secret:...}` template Temper could not resolve: the old module's test
    for a missing `e2b_api_key` or `temper_api_url`."""
    return not value.strip() or UNRESOLVED_SECRET in value


@dataclass(frozen=True)
class SandboxSettings:
    """What to create, and where; and the old module's static URL and TemperFS setup."""

    api_url: str = "https://api.e2b.app"
    template_id: str = "base"
    sandbox_timeout_s: int = 3600
    create_timeout_ms: int = 60_000
    request_timeout_ms: int = 15_000
    static_url: str = ""
    temper_api_url: str = DEFAULT_TEMPER_API_URL
    temperfs: str = "auto"
    api_key_source: str = "host"
    # Derived (not a key): whether the conversation storage is set up, see `_read_sandbox`.
    temperfs_enabled: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> SandboxSettings:
        """Only the sandbox keys (a bad value raises ProvisionerError("invalid_config"))."""
        return _read_sandbox(config)


@dataclass(frozen=True)
class AdmissionConfig:
    """Admission control's settings (see `SETTINGS` for each key's meaning)."""

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
        """Only the admission keys (a bad value raises ProvisionerError("invalid_config"))."""
        return _read_admission(config)

    def check_relations(self) -> None:
        """Every parser bounds its own value; only the relations between settings remain."""
        if self.backoff_base_ms > self.backoff_cap_ms:
            _invalid("backoff_base_ms must not exceed backoff_cap_ms")
        if self.poll_min_ms > self.poll_max_ms:
            _invalid("poll_min_ms must not exceed poll_max_ms")
        if self.max_sandboxes_per_tenant is not None and (
            self.max_sandboxes_per_tenant > self.max_sandboxes
        ):
            _invalid("max_sandboxes_per_tenant must not exceed max_sandboxes")


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the integration config says, read once per invocation."""

    sandbox: SandboxSettings
    admission: AdmissionConfig
    # The named resource gates (`resource.<name>.<limit>`), by name.
    resources: dict[str, ResourceGate] = field(default_factory=dict)


def read_config(config: Mapping[str, str]) -> Config:
    """Read and validate every key present; ProvisionerError("invalid_config") on a bad one.
    Unknown keys are refused first, then sandbox keys are checked, then admission keys in
    config order, then the relations between admission settings, then the resource gates."""
    check_keys(config)
    return Config(_read_sandbox(config), _read_admission(config), read_resources(config))


# Keys the guest reads outside the settings table: the operation, and a resource gate's
# name and the actions its answers are named by (provisioner/resources/operations.py).
OPERATION_KEYS = frozenset(
    {"operation", "resource", "granted_action", "queued_action", "settled_action",
     "released_action"}
)  # fmt: skip
# Keys of the integration config that are not the component's, accepted without a word:
# Temper's per-invocation budgets (crates/temper-server/src/state/dispatch/wasm/
# dispatch.rs), the shim's own two (shim/temper_shim.wat) and serve's hold window
# (`hold_ms`); serve drops its and the shim's before the component runs anyway.
FOREIGN_KEYS = frozenset(
    {"timeout_secs", "max_fuel", "max_memory", "max_response_bytes", "provisioner_url",
     "provisioner_token", "hold_ms"}
)  # fmt: skip


def check_keys(config: Mapping[str, str]) -> None:
    """Refuse a key nobody reads (a typo such as `create_slot` would otherwise be ignored
    and its default used), naming the nearest known key. `resource.*` keys are checked by
    `read_resources`."""
    known = SETTINGS_BY_KEY.keys() | OPERATION_KEYS
    for key in config:
        if key in known or key in FOREIGN_KEYS or key.startswith(RESOURCE_PREFIX):
            continue
        nearest = difflib.get_close_matches(key, sorted(known | FOREIGN_KEYS), n=1, cutoff=0.6)
        hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
        _refuse(f"unknown config key {key[:80]!r}{hint}")


# ---------------------------------------------------------------------------- the table

Section = Literal["sandbox", "admission", "host"]


@dataclass(frozen=True, slots=True)
class Setting:
    """One config key: where its value goes, how it is parsed and bounded, what it means.
    `blank_is_default`: an empty value means the default (else it is parsed, and refused)."""

    key: str
    section: Section
    field: str
    parse: Callable[[str], Any]
    meaning: str
    blank_is_default: bool = True

    @property
    def default(self) -> Any:
        """The field's default, in the field's unit (milliseconds for a `_s` key whose
        field ends in `_ms`)."""
        if self.section == "host":
            return None  # read by the host only; the guest never sees the value
        owner = SandboxSettings if self.section == "sandbox" else AdmissionConfig
        return getattr(owner, self.field)


def _invalid(message: str) -> None:
    raise ProvisionerError(
        FailureCode.INVALID_CONFIG, f"admission config: {message}", retryable=False
    )


def _refuse(message: str) -> None:
    raise ProvisionerError(FailureCode.INVALID_CONFIG, message)


# Sandbox parsers: their messages predate the admission ones and are kept as they were.


def _api_url(raw: str) -> str:
    api_url = raw.strip().rstrip("/")
    if not api_url.startswith(("https://", "http://")) or _URL_FORBIDDEN.search(api_url):
        _refuse("e2b_api_url must be an http(s) URL without query or fragment")
    return api_url


def _temper_api_url(raw: str) -> str:
    if UNRESOLVED_SECRET in raw:
        return DEFAULT_TEMPER_API_URL
    url = raw.strip().rstrip("/")
    if not url.startswith(("https://", "http://")) or _URL_FORBIDDEN.search(url):
        _refuse("temper_api_url must be an http(s) URL without query or fragment")
    return url


def _static_url(raw: str) -> str:
    # An unresolved template is no URL: the old module would have answered it verbatim.
    return "" if UNRESOLVED_SECRET in raw else raw.strip()


def _choice(key: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            _refuse(f"{key} must be one of {', '.join(choices)}, got {raw[:40]!r}")
        return value

    return parse


def _template_id(raw: str) -> str:
    template_id = raw.strip()
    if not _TEMPLATE_ID.fullmatch(template_id):
        _refuse(
            "template_id must be 1-128 letters, digits or ._:/-, starting with a letter or digit"
        )
    return template_id


def _bounded_int(key: str, low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            _refuse(f"{key} must be an integer, got {raw[:40]!r}")
            raise  # unreachable: keeps the type checker sure `value` is bound
        if not low <= value <= high:
            _refuse(f"{key} must be between {low} and {high}, got {value}")
        return value

    return parse


# Admission parsers.


def _number(key: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        _invalid(f"{key} must be a number, got {raw!r}")
        raise  # unreachable: keeps the type checker sure `value` is bound
    if not math.isfinite(value):
        _invalid(f"{key} must be finite, got {raw!r}")
    return value


def _positive_int(key: str, upper: int, scale: float = 1.0) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = _number(key, raw) * scale
        if value <= 0:
            _invalid(f"{key} must be positive, got {raw!r}")
        if value > upper:
            _invalid(f"{key} must be at most {upper / scale:g}, got {raw!r}")
        if scale == 1.0 and value != int(value):
            _invalid(f"{key} must be a whole number, got {raw!r}")
        return max(1, round(value))

    return parse


def _positive_float(key: str, upper: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = _number(key, raw)
        if value <= 0 or value > upper:
            _invalid(f"{key} must be above 0 and at most {upper:g}, got {raw!r}")
        return value

    return parse


def _non_negative_float(key: str, upper: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = _number(key, raw)
        if value < 0 or value > upper:
            _invalid(f"{key} must be between 0 and {upper:g}, got {raw!r}")
        return value

    return parse


def _optional_positive_int(key: str, upper: int) -> Callable[[str], int | None]:
    inner = _positive_int(key, upper)

    def parse(raw: str) -> int | None:
        if raw.lower() in ("none", "null", "off", "unlimited"):
            return None
        return inner(raw)

    return parse


def _sandbox(key: str, field: str, parse: Callable[[str], Any], meaning: str) -> Setting:
    # The URL and the template refuse an empty value; the numbers take it as the default.
    blank = parse not in (_api_url, _template_id)
    return Setting(key, "sandbox", field, parse, meaning, blank_is_default=blank)


def _admission(
    key: str, parse: Callable[[str], Any], meaning: str, field: str | None = None
) -> Setting:
    return Setting(key, "admission", field or key, parse, meaning)


def _seconds(key: str, field: str, meaning: str) -> Setting:
    return _admission(key, _positive_int(key, _DAY_MS, 1000), meaning, field)


def _millis(key: str, meaning: str) -> Setting:
    return _admission(key, _positive_int(key, _DAY_MS), meaning)


SETTINGS: tuple[Setting, ...] = (
    _sandbox(
        "e2b_api_url",
        "api_url",
        _api_url,
        "the E2B API base (the host's allow-list must agree)",
    ),
    # The old module's name; `template_id` (listed after it) wins when both are set.
    _sandbox(
        "e2b_template_id", "template_id", _template_id, "the same, as the old module names it"
    ),
    _sandbox("template_id", "template_id", _template_id, "the E2B template"),
    _sandbox(
        "sandbox_timeout_s",
        "sandbox_timeout_s",
        _bounded_int("sandbox_timeout_s", 1, 86_400),
        "the sandbox's E2B timeout; also its capacity lease",
    ),
    _sandbox(
        "create_timeout_ms",
        "create_timeout_ms",
        _bounded_int("create_timeout_ms", 1_000, 110_000),
        "how long one create request may take",
    ),
    _sandbox(
        "request_timeout_ms",
        "request_timeout_ms",
        _bounded_int("request_timeout_ms", 500, 60_000),
        "list and kill requests",
    ),
    _sandbox(
        "sandbox_url",
        "static_url",
        _static_url,
        "static mode: answer SandboxReady with this URL, no E2B (entity field first, then"
        " this, then the trigger param)",
    ),
    _sandbox(
        "temper_api_url",
        "temper_api_url",
        _temper_api_url,
        "the TemperFS base for the conversation storage (blank or an unresolved"
        " `{secret:` template: the default, as the old module)",
    ),
    _sandbox(
        "temperfs",
        "temperfs",
        _choice("temperfs", TEMPERFS_MODES),
        "conversation storage: `auto` (when the config names `temper_api_url`), `on`, `off`",
    ),
    _sandbox(
        "e2b_api_key_source",
        "api_key_source",
        _choice("e2b_api_key_source", API_KEY_SOURCES),
        "written by the host: where the E2B key it attaches comes from (`config`, `host`),"
        " or `none`, which fails a provision that needs E2B",
    ),
    Setting(
        "e2b_api_key",
        "host",
        "e2b_api_key",
        str,
        "the E2B API key: the host takes it out of the config (blank or an unresolved"
        " `{secret:` template counts as missing; the host's `E2B_API_KEY` is the fallback)",
    ),
    _admission(
        "create_slots", _positive_int("create_slots", 1_000), "concurrent E2B creates per account"
    ),
    _admission(
        "create_rate_per_s",
        _positive_float("create_rate_per_s", 1_000),
        "creates per second per account (E2B Hobby: 1/s, Pro: 5/s)",
    ),
    _admission(
        "create_burst",
        _positive_int("create_burst", 1_000),
        "creates allowed back to back before the rate applies",
    ),
    _admission(
        "max_sandboxes",
        _positive_int("max_sandboxes", 100_000),
        "running sandboxes per account (E2B Hobby: 20, Pro: 100)",
    ),
    _admission(
        "max_sandboxes_per_tenant",
        _optional_positive_int("max_sandboxes_per_tenant", 100_000),
        "running sandboxes per tenant (none: no per-tenant cap)",
    ),
    _seconds(
        "queue_timeout_s", "queue_timeout_ms", "longest a waiter may queue before queue_timeout"
    ),
    _millis("queue_timeout_ms", "the same, in milliseconds"),
    # The Temper [admission] block's spelling.
    _seconds("queue_timeout_seconds", "queue_timeout_ms", "the same, as Temper spells it"),
    _seconds(
        "waiter_ttl_s",
        "waiter_ttl_ms",
        "a waiter that stops asking drops out this long after its last poll is due",
    ),
    _millis("waiter_ttl_ms", "the same, in milliseconds"),
    _seconds(
        "create_lease_s",
        "create_lease_ms",
        "a create slot's lease: longer than an invocation (120 s) can live",
    ),
    _millis("create_lease_ms", "the same, in milliseconds"),
    _millis("backoff_base_ms", "shared exponential backoff (full jitter): its base"),
    _millis("backoff_cap_ms", "shared exponential backoff: its cap"),
    _admission(
        "retry_budget",
        _non_negative_float("retry_budget", 1_000_000),
        "retry tokens the account may bank",
    ),
    _admission(
        "retry_ratio",
        _non_negative_float("retry_ratio", 100),
        "tokens earned by each first-attempt create",
    ),
    _admission(
        "retry_refill_per_s",
        _non_negative_float("retry_refill_per_s", 1e4),
        "tokens earned per second regardless",
    ),
    _admission(
        "max_create_attempts",
        _positive_int("max_create_attempts", 1_000),
        "creates per waiter before retry_budget_exhausted",
    ),
    _admission(
        "capacity_grow_after",
        _positive_int("capacity_grow_after", 1_000_000),
        "successes in a row before a shrunk capacity grows by one",
    ),
    _millis("poll_min_ms", "the shortest retry_after_ms a waiter is given"),
    _millis("poll_max_ms", "the longest retry_after_ms a waiter is given"),
    _millis("create_latency_ms", "create latency assumed until one has been observed (ETAs)"),
    _millis(
        "reservation_claim_ms",
        "how long a permit reserved for a waiter stays its own once claimable; then it "
        "passes to the next waiter",
    ),
    _admission(
        "cas_retries", _positive_int("cas_retries", 1_000), "compare-and-swap attempts per decision"
    ),
)

SETTINGS_BY_KEY: dict[str, Setting] = {setting.key: setting for setting in SETTINGS}
_SANDBOX_SETTINGS = tuple(s for s in SETTINGS if s.section == "sandbox")

_T = TypeVar("_T")


def _sparse(cls: type[_T], values: dict[str, Any]) -> _T:
    """An instance of a frozen settings dataclass holding only `values`; every other field
    reads its default from the class. This runs on every invocation, and the generated
    frozen `__init__` (one `object.__setattr__` per field) cost more guest fuel than the
    parsing itself."""
    instance = object.__new__(cls)
    instance.__dict__.update(values)
    return instance


def _read_sandbox(config: Mapping[str, str]) -> SandboxSettings:
    values: dict[str, Any] = {}
    for setting in _SANDBOX_SETTINGS:
        raw = config.get(setting.key)
        if raw is None or (setting.blank_is_default and raw.strip() == ""):
            continue
        values[setting.field] = setting.parse(raw)
    # TemperFS setup: `on`, `off`, or (`auto`) when the config names `temper_api_url` at all
    # (the old module always did it; a config without the key is a deployment that has no
    # TemperFS, such as this project's simulations).
    mode = values.get("temperfs", SandboxSettings.temperfs)
    if mode == "on" or (mode == "auto" and "temper_api_url" in config):
        values["temperfs_enabled"] = True
    return _sparse(SandboxSettings, values)


def _read_admission(config: Mapping[str, str]) -> AdmissionConfig:
    values: dict[str, Any] = {}
    for key, raw in config.items():
        setting = SETTINGS_BY_KEY.get(key)
        if setting is None or setting.section != "admission":
            continue
        text = str(raw).strip()
        if text == "":
            continue
        values[setting.field] = setting.parse(text)
    built = _sparse(AdmissionConfig, values)
    built.check_relations()
    return built


# ------------------------------------------------------------------ resource gates
#
# Named resource gates are declared with keys `resource.<name>.<limit>`: the name is
# dynamic, so their entries in the table are patterns (`RESOURCE_SETTINGS`, one per
# `<limit>`), read by the same `read_config` as every other key. A key that starts with
# `resource.` but names no known limit, or a name outside `RESOURCE_NAME`, is refused:
# a misspelt limit must not silently leave a gate open.

RESOURCE_PREFIX = "resource."
# Lower-case, so that `resource.LLM.rpm` and `resource.llm.rpm` cannot name two gates.
RESOURCE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_PER_MINUTE_MAX = 1e9


@dataclass(frozen=True)
class ResourceGate:
    """One named resource gate: any combination of concurrent permits, a request rate and
    token rates, each also capped per tenant (`tenant_*`). Rates are per minute; a burst
    of None means one minute's worth (the provider's own bucket, see docs/admission.md).
    `queue_timeout_ms` None means the admission setting's."""

    name: str
    concurrency: int | None = None
    rpm: float | None = None
    itpm: float | None = None
    otpm: float | None = None
    rpm_burst: float | None = None
    itpm_burst: float | None = None
    otpm_burst: float | None = None
    tenant_concurrency: int | None = None
    tenant_rpm: float | None = None
    tenant_itpm: float | None = None
    tenant_otpm: float | None = None
    tenant_rpm_burst: float | None = None
    tenant_itpm_burst: float | None = None
    tenant_otpm_burst: float | None = None
    lease_ms: int = 600_000
    queue_timeout_ms: int | None = None
    # The longest a waiter waits while the gate grants no one (None: no such limit).
    stall_timeout_ms: int | None = None

    def check_relations(self) -> None:
        pairs = [("concurrency", "tenant_concurrency")]
        pairs += [(rate, f"tenant_{rate}") for rate in ("rpm", "itpm", "otpm")]
        for account, tenant in pairs:
            whole, share = getattr(self, account), getattr(self, tenant)
            if whole is not None and share is not None and share > whole:
                _refuse(
                    f"resource.{self.name}.{tenant} must not exceed resource.{self.name}.{account}"
                )
        for rate in ("rpm", "itpm", "otpm", "tenant_rpm", "tenant_itpm", "tenant_otpm"):
            if getattr(self, f"{rate}_burst") is not None and getattr(self, rate) is None:
                _refuse(
                    f"resource.{self.name}.{rate}_burst is set without resource.{self.name}.{rate}"
                )
        limits = ("concurrency", "rpm", "itpm", "otpm")
        if all(getattr(self, f) is None and getattr(self, f"tenant_{f}") is None for f in limits):
            _refuse(
                f"resource {self.name!r} declares no limit (set resource.{self.name}.concurrency, "
                "rpm, itpm, otpm or a tenant_ one)"
            )


@dataclass(frozen=True, slots=True)
class ResourceSetting:
    """The pattern entry for every key `resource.<name>.<limit>`."""

    limit: str
    field: str
    parse: Callable[[str, str], Any]
    default: str
    meaning: str

    def key(self, name: str = "<name>") -> str:
        return f"{RESOURCE_PREFIX}{name}.{self.limit}"


def _resource_number(key: str, raw: str, upper: float, *, whole: bool, scale: float = 1.0) -> float:
    try:
        value = float(raw)
    except ValueError:
        _refuse(f"{key} must be a number, got {raw[:40]!r}")
        raise  # unreachable: keeps the type checker sure `value` is bound
    if not math.isfinite(value) or value <= 0:
        _refuse(f"{key} must be a positive finite number, got {raw[:40]!r}")
    if value > upper:
        _refuse(f"{key} must be at most {upper:g}, got {raw[:40]!r}")
    if whole and value != int(value):
        _refuse(f"{key} must be a whole number, got {raw[:40]!r}")
    return value * scale


def _count(key: str, raw: str) -> int:
    return int(_resource_number(key, raw, 1_000_000, whole=True))


def _per_minute(key: str, raw: str) -> float:
    return _resource_number(key, raw, _PER_MINUTE_MAX, whole=False)


def _burst(key: str, raw: str) -> float:
    value = _resource_number(key, raw, _PER_MINUTE_MAX, whole=False)
    if value < 1:
        _refuse(f"{key} must be at least 1, got {raw[:40]!r}")
    return value


def _resource_seconds(key: str, raw: str) -> int:
    return max(1, round(_resource_number(key, raw, _DAY_MS / 1000, whole=False, scale=1000)))


def _resource_millis(key: str, raw: str) -> int:
    return int(_resource_number(key, raw, _DAY_MS, whole=True))


def _rate_settings(prefix: str, scope: str) -> tuple[ResourceSetting, ...]:
    what = {"rpm": "requests", "itpm": "input tokens", "otpm": "output tokens"}
    rows: list[ResourceSetting] = []
    for rate, unit in what.items():
        rows.append(
            ResourceSetting(
                f"{prefix}{rate}",
                f"{prefix}{rate}",
                _per_minute,
                "none",
                f"{unit} per minute {scope}",
            )
        )
        rows.append(
            ResourceSetting(
                f"{prefix}{rate}_burst",
                f"{prefix}{rate}_burst",
                _burst,
                f"the {prefix}{rate} value",
                f"{unit} that may go back to back {scope} before the rate applies",
            )
        )
    return tuple(rows)


RESOURCE_SETTINGS: tuple[ResourceSetting, ...] = (
    ResourceSetting(
        "concurrency",
        "concurrency",
        _count,
        "none",
        "permits held at once (calls in flight, active sessions)",
    ),
    *_rate_settings("", "across the account"),
    ResourceSetting(
        "tenant_concurrency",
        "tenant_concurrency",
        _count,
        "none",
        "permits one tenant may hold at once",
    ),
    *_rate_settings("tenant_", "for one tenant"),
    ResourceSetting(
        "lease_s",
        "lease_ms",
        _resource_seconds,
        "600",
        "a permit's lease: a holder that neither settles, releases nor asks again "
        "loses it after this long",
    ),
    ResourceSetting(
        "lease_ms", "lease_ms", _resource_millis, "600000", "the same, in milliseconds"
    ),
    ResourceSetting(
        "queue_timeout_s",
        "queue_timeout_ms",
        _resource_seconds,
        "the queue_timeout_s value",
        "longest a waiter may queue at this gate",
    ),
    ResourceSetting(
        "queue_timeout_ms",
        "queue_timeout_ms",
        _resource_millis,
        "the queue_timeout_ms value",
        "the same, in milliseconds",
    ),
    ResourceSetting(
        "stall_timeout_s",
        "stall_timeout_ms",
        _resource_seconds,
        "none",
        "longest a waiter may queue while the gate grants no one (a stuck gate)",
    ),
    ResourceSetting(
        "stall_timeout_ms",
        "stall_timeout_ms",
        _resource_millis,
        "none",
        "the same, in milliseconds",
    ),
)
RESOURCE_SETTINGS_BY_LIMIT: dict[str, ResourceSetting] = {s.limit: s for s in RESOURCE_SETTINGS}


def read_resources(config: Mapping[str, str]) -> dict[str, ResourceGate]:
    """Every resource gate the config declares, by name (ProvisionerError("invalid_config")
    on a bad key or value)."""
    values: dict[str, dict[str, Any]] = {}
    for key, raw in config.items():
        if not key.startswith(RESOURCE_PREFIX):
            continue
        name, dot, limit = key[len(RESOURCE_PREFIX) :].partition(".")
        if not dot or not RESOURCE_NAME.fullmatch(name):
            _refuse(
                f"{key[:80]!r} is not resource.<name>.<limit> with a name of 1-32 lower-case "
                "letters, digits, _ or -, starting with a letter"
            )
        setting = RESOURCE_SETTINGS_BY_LIMIT.get(limit)
        if setting is None:
            known = ", ".join(RESOURCE_SETTINGS_BY_LIMIT)
            _refuse(f"{key[:80]!r}: unknown limit {limit[:40]!r} (one of {known})")
            raise AssertionError("unreachable")
        text = str(raw).strip()
        if text == "":
            continue
        values.setdefault(name, {})[setting.field] = setting.parse(key, text)
    gates = {name: ResourceGate(name, **fields) for name, fields in sorted(values.items())}
    for gate in gates.values():
        gate.check_relations()
    return gates
