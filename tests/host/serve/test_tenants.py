"""The --tenants file: its schema, token lookup, Temper credentials and reloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from host.serve.tenants import TenantAccess, TenantsFileError
from tests.host.serve.tenancy_support import (
    OPERATOR_TOKEN,
    T1_TOKEN,
    T2_TOKEN,
    sha,
    tenants_toml,
    write_tenants,
)


def test_each_token_maps_to_its_client_and_an_unknown_one_to_none(tmp_path: Path) -> None:
    access = TenantAccess(write_tenants(tmp_path / "t.toml"))
    one, two, ops = (access.authenticate(t) for t in (T1_TOKEN, T2_TOKEN, OPERATOR_TOKEN))
    assert one is not None and one.name == "client-one" and one.covers("t1")
    assert not one.covers("t2") and not one.operator
    assert two is not None and two.covers("t2") and not two.covers("t1")
    assert ops is not None and ops.operator and ops.covers("t1") and ops.covers("anyone")
    assert access.authenticate("") is None
    assert access.authenticate(T1_TOKEN + "x") is None
    assert access.authenticate(sha(T1_TOKEN)) is None  # the digest is not the token


def test_the_environment_token_is_one_more_operator(tmp_path: Path) -> None:
    access = TenantAccess(write_tenants(tmp_path / "t.toml"), operator_token="env-token")
    env = access.authenticate("env-token")
    assert env is not None and env.operator
    assert access.authenticate(T1_TOKEN) is not None
    alone = TenantAccess.single_operator("env-token")
    assert alone.authenticate("env-token") == env
    assert alone.authenticate(T1_TOKEN) is None


def test_temper_credentials_come_per_tenant_from_a_value_or_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "t2.token"
    secret.write_text("temper-api-t2\n")
    path = write_tenants(
        tmp_path / "t.toml", extra=f'[[temper]]\ntenant = "t2"\ntoken_file = "{secret}"\n'
    )
    access = TenantAccess(path)
    assert access.temper_credential("t1") == "temper-api-t1"
    assert access.temper_credential("t2") == "temper-api-t2"
    assert access.temper_credential("t3") is None


@pytest.mark.parametrize(
    ("extra", "complaint"),
    [
        ('surprise = "field"', "Extra inputs are not permitted"),
        ('[[temper]]\ntenant = "t9"', "exactly one of token and token_file"),
        ('[[temper]]\ntenant = "t9"\ntoken = "a"\ntoken_file = "/x"', "exactly one"),
        ('[[temper]]\ntenant = "t1"\ntoken = "again"', "same tenant"),
        ('[[temper]]\ntenant = "t9"\ntoken_file = "/nonexistent/t9"', "cannot read token_file"),
        ('[[client]]\ntoken_sha256 = "abc"\ntenants = ["t1"]', "String should match pattern"),
        (f'[[client]]\ntoken_sha256 = "{sha("x")}"\ntenants = ["*", "t1"]', "stands alone"),
        (f'[[client]]\ntoken_sha256 = "{sha("x")}"\ntenants = []', "at least 1"),
        (f'[[client]]\ntoken_sha256 = "{sha(T1_TOKEN)}"\ntenants = ["t3"]', "same token_sha256"),
        (f'[[client]]\ntoken_sha256 = "{sha("x")}"\ntenants = ["t1"]\nrole = "x"', "Extra"),
        ("[[client]\n", "not TOML"),
    ],
)
def test_a_file_off_the_schema_is_refused_with_the_reason(
    tmp_path: Path, extra: str, complaint: str
) -> None:
    path = tmp_path / "t.toml"
    path.write_text(tenants_toml() + extra + "\n")
    with pytest.raises(TenantsFileError, match=complaint) as refused:
        TenantAccess(path)
    assert "temper-api-t1" not in str(refused.value)  # a credential never reaches a message


def test_a_file_with_no_client_and_no_operator_token_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[[temper]]\ntenant = "t1"\ntoken = "x"\n')
    with pytest.raises(TenantsFileError, match="no \\[\\[client\\]\\]"):
        TenantAccess(path)
    assert TenantAccess(path, operator_token="op").temper_credential("t1") == "x"


def test_a_reload_takes_a_good_file_and_keeps_the_old_clients_over_a_bad_one(
    tmp_path: Path,
) -> None:
    lines: list[dict[str, Any]] = []
    path = write_tenants(tmp_path / "t.toml")
    access = TenantAccess(path, log=lines.append)
    path.write_text(
        tenants_toml().replace("client-one", "renamed")
        + f'\n[[client]]\ntoken_sha256 = "{sha("new")}"\ntenants = ["t3"]\n'
    )
    assert access.reload()
    new = access.authenticate("new")
    assert new is not None and new.covers("t3") and new.name == f"sha256:{sha('new')[:12]}"
    one = access.authenticate(T1_TOKEN)
    assert one is not None and one.name == "renamed"
    assert lines[-1]["event"] == "tenants_reloaded" and lines[-1]["clients"] == 4

    path.write_text(tenants_toml() + 'typo_field = "x"\n')
    assert not access.reload()
    assert access.authenticate("new") is not None  # still the last good clients
    assert lines[-1]["event"] == "tenants_reload_failed"
    assert "typo_field" in lines[-1]["error"]
    path.unlink()
    assert not access.reload()
    assert access.authenticate(T2_TOKEN) is not None
