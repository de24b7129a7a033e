"""Who may call `serve`, and for which tenants: the `--tenants` file (docs/tenancy.md).

    [[client]]
    token_sha256 = "<hex sha-256 of the token>"
    tenants = ["t1", "t2"]     # or ["*"] for an operator
    name = "optional label for logs and metrics"

    [[temper]]                 # the credential serve uses to call Temper's API for a tenant
    tenant = "t1"
    token = "..."              # or token_file = "/path/to/file" (exactly one of the two)

The file holds digests of the clients' tokens, never the tokens, so a leaked file does not
let anyone call the service. A presented token is hashed and its digest compared with every
client's digest in constant time. `$SANDBOX_PROVISIONER_TOKEN` is one more client, an
operator (`["*"]`), so a one-tenant set-up needs no file.

`TenantAccess.reload` re-reads the file (on SIGHUP); a file that no longer parses keeps
the clients and credentials in force and says why.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

LOG = logging.getLogger("sandbox_provisioner.serve")
ALL_TENANTS = "*"
_SHA256_HEX = r"^[0-9a-fA-F]{64}$"


class TenantsFileError(ValueError):
    """The tenants file cannot be used (unreadable, not TOML, or not the schema)."""


# -- the file's schema ---------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class ClientEntry(_Strict):
    token_sha256: str = Field(pattern=_SHA256_HEX)
    tenants: tuple[str, ...] = Field(min_length=1)
    name: str | None = Field(default=None, min_length=1, max_length=100)

    @model_validator(mode="after")
    def _tenants_are_names_or_all(self) -> Self:
        if any(not tenant for tenant in self.tenants):
            raise ValueError("a tenant name cannot be empty")
        if ALL_TENANTS in self.tenants and len(self.tenants) > 1:
            raise ValueError(f'"{ALL_TENANTS}" (every tenant) stands alone')
        return self


class TemperEntry(_Strict):
    tenant: str = Field(min_length=1)
    token: SecretStr | None = None
    token_file: Path | None = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Self:
        if (self.token is None) == (self.token_file is None):
            raise ValueError("give exactly one of token and token_file")
        return self


class TenantsFile(_Strict):
    client: tuple[ClientEntry, ...] = ()
    temper: tuple[TemperEntry, ...] = ()

    @model_validator(mode="after")
    def _no_repeats(self) -> Self:
        digests = [c.token_sha256.lower() for c in self.client]
        if len(set(digests)) != len(digests):
            raise ValueError("two [[client]] entries have the same token_sha256")
        tenants = [t.tenant for t in self.temper]
        if len(set(tenants)) != len(tenants):
            raise ValueError("two [[temper]] entries name the same tenant")
        return self


# -- what the service uses -----------------------------------------------------------------


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Client:
    """A caller the service knows: the tenants it may act for (None: every tenant)."""

    name: str
    tenants: frozenset[str] | None

    @property
    def operator(self) -> bool:
        return self.tenants is None

    def covers(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants


@dataclass(frozen=True)
class _Config:
    clients: tuple[tuple[bytes, Client], ...]
    temper: Mapping[str, str]


class TenantAccess:
    """The clients and the per-tenant Temper credentials in force; thread-safe (a reload
    swaps one reference)."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        operator_token: str | None = None,
        log: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.path = path
        self._operator_token = operator_token or None
        self._log = log or (lambda line: LOG.info(json.dumps(line, sort_keys=True)))
        self._config = self._load()  # raises TenantsFileError: the service cannot start

    def log_to(self, log: Callable[[dict[str, Any]], None]) -> None:
        self._log = log

    @classmethod
    def single_operator(cls, token: str) -> TenantAccess:
        """One operator client: `$SANDBOX_PROVISIONER_TOKEN` with no tenants file."""
        return cls(None, operator_token=token)

    def _load(self) -> _Config:
        clients: list[tuple[bytes, Client]] = []
        temper: dict[str, str] = {}
        if self.path is not None:
            parsed = read_tenants_file(self.path)
            for entry in parsed.client:
                digest = bytes.fromhex(entry.token_sha256)
                tenants = None if entry.tenants == (ALL_TENANTS,) else frozenset(entry.tenants)
                name = entry.name or f"sha256:{entry.token_sha256.lower()[:12]}"
                clients.append((digest, Client(name, tenants)))
            temper = {entry.tenant: _credential(entry) for entry in parsed.temper}
        if self._operator_token is not None:
            clients.append((token_digest(self._operator_token), Client("operator", None)))
        if not clients:
            raise TenantsFileError(f"{self.path}: no [[client]], and no operator token")
        return _Config(tuple(clients), temper)

    def reload(self) -> bool:
        """Re-reads the file; on any error keeps what is in force. True when it changed."""
        try:
            config = self._load()
        except TenantsFileError as error:
            self._log(
                {"event": "tenants_reload_failed", "path": str(self.path), "error": str(error)}
            )
            return False
        self._config = config
        self._log(
            {
                "event": "tenants_reloaded",
                "path": str(self.path),
                "clients": len(config.clients),
                "temper_credentials": len(config.temper),
            }
        )
        return True

    def authenticate(self, presented: str) -> Client | None:
        """The client whose token this is, or None. Every digest is compared, in constant
        time, so the answer's timing says nothing about which (or whether one) matched."""
        digest = token_digest(presented)
        found: Client | None = None
        for known, client in self._config.clients:
            if hmac.compare_digest(digest, known):
                found = client
        return found

    def temper_credential(self, tenant: str) -> str | None:
        """The token `serve` presents to Temper's API on behalf of `tenant`."""
        return self._config.temper.get(tenant)

    @property
    def clients(self) -> Iterable[Client]:
        return tuple(client for _, client in self._config.clients)


def _credential(entry: TemperEntry) -> str:
    if entry.token is not None:
        return entry.token.get_secret_value()
    assert entry.token_file is not None
    try:
        text = entry.token_file.read_text().strip()
    except OSError as error:
        raise TenantsFileError(
            f"[[temper]] {entry.tenant}: cannot read token_file: {error.strerror}"
        ) from None
    if not text:
        raise TenantsFileError(f"[[temper]] {entry.tenant}: token_file {entry.token_file} is empty")
    return text


def read_tenants_file(path: Path) -> TenantsFile:
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as error:
        raise TenantsFileError(f"{path}: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise TenantsFileError(f"{path}: not TOML: {error}") from None
    try:
        return TenantsFile.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in error.errors()
        )
        raise TenantsFileError(f"{path}: {problems}") from None


__all__ = [
    "ALL_TENANTS",
    "Client",
    "TenantAccess",
    "TenantsFile",
    "TenantsFileError",
    "read_tenants_file",
    "token_digest",
]
