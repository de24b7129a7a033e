"""Tenants files for the serve tests: two tenants' clients, an operator, Temper credentials."""

from __future__ import annotations

import hashlib
from pathlib import Path

T1_TOKEN = "tenant-one-token-0123456789"
T2_TOKEN = "tenant-two-token-0123456789"
OPERATOR_TOKEN = "operator-token-0123456789"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def client_toml(token: str, tenant: str, name: str | None = None) -> str:
    """A `[[client]]` table: the token's hash, the one tenant it may act for, its name."""
    named = "" if name is None else f'name = "{name}"\n'
    return f'\n[[client]]\ntoken_sha256 = "{sha(token)}"\ntenants = ["{tenant}"]\n{named}'


def tenants_toml(*, extra: str = "") -> str:
    clients = (
        client_toml(T1_TOKEN, "t1", "client-one")
        + client_toml(T2_TOKEN, "t2", "client-two")
        + client_toml(OPERATOR_TOKEN, "*", "ops")
    )
    return f"""{clients}
[[temper]]
tenant = "t1"
token = "temper-api-t1"
{extra}
"""


def write_tenants(path: Path, *, extra: str = "") -> Path:
    path.write_text(tenants_toml(extra=extra))
    return path
