"""Tenants files for the serve tests: two tenants' clients, an operator, Temper credentials."""

from __future__ import annotations

import hashlib
from pathlib import Path

T1_TOKEN = "tenant-one-token-0123456789"
T2_TOKEN = "tenant-two-token-0123456789"
OPERATOR_TOKEN = "operator-token-0123456789"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def tenants_toml(*, extra: str = "") -> str:
    return f"""
[[client]]
token_sha256 = "{sha(T1_TOKEN)}"
tenants = ["t1"]
name = "client-one"

[[client]]
token_sha256 = "{sha(T2_TOKEN)}"
tenants = ["t2"]
name = "client-two"

[[client]]
token_sha256 = "{sha(OPERATOR_TOKEN)}"
tenants = ["*"]
name = "ops"

[[temper]]
tenant = "t1"
token = "temper-api-t1"
{extra}
"""


def write_tenants(path: Path, *, extra: str = "") -> Path:
    path.write_text(tenants_toml(extra=extra))
    return path
