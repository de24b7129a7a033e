"""provisioner.config is the one definition of the config keys: the config tables and the
list of failure codes in docs/contract.md and docs/admission.md must agree with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from provisioner.config import SETTINGS, SETTINGS_BY_KEY, AdmissionConfig, read_config
from provisioner.failures import FailureCode
from provisioner.model import ProvisionerError

DOCS = Path(__file__).resolve().parents[2] / "docs"


class _Docs:
    """The config reference: docs/contract.md, then docs/admission.md."""

    @staticmethod
    def read_text() -> str:
        return "\n".join((DOCS / name).read_text() for name in ("contract.md", "admission.md"))


README = _Docs()
_ROW = re.compile(r"^\| (`[^|]+`) \| ([^|]+) \| [^|]+ \|$")


def readme_defaults() -> dict[str, str]:
    """Each key named in a README table row, with the default that row states for it."""
    found: dict[str, str] = {}
    for line in README.read_text().splitlines():
        match = _ROW.match(line.strip())
        if match is None:
            continue
        keys = re.findall(r"`([a-z0-9_]+)`", match.group(1))
        if not keys:  # a table of something else (file sizes, ...) with three columns
            continue
        defaults = [d.strip().strip("`") for d in re.split(r"\s*[/,]\s*(?![/])", match.group(2))]
        if len(defaults) == 1 and len(keys) > 1:
            defaults = defaults * len(keys)
        if match.group(2).startswith(("`https://", "`http://")):
            defaults = [match.group(2).strip().strip("`")]
        assert len(keys) == len(defaults), line
        found.update(zip(keys, defaults, strict=True))
    return found


def shown(key: str) -> float | str | None:
    """A setting's default in the key's unit (seconds for a `_s` key of a `_ms` field)."""
    setting = SETTINGS_BY_KEY[key]
    value = setting.default
    if key.endswith(("_s", "_seconds")) and setting.field.endswith("_ms"):
        return float(value) / 1000
    assert value is None or isinstance(value, float | int | str)
    return value


def test_every_readme_default_is_the_definitions_default() -> None:
    # Catches: a default changed in the code but not in the README (or the reverse).
    documented = readme_defaults()
    documented.pop("operation")
    assert documented, "no config table found in the README"
    for key, text in documented.items():
        assert key in SETTINGS_BY_KEY, f"the README documents {key}, which nothing reads"
        value = shown(key)
        if value is None:
            assert text == "none", key
        elif isinstance(value, str):
            assert text == value, key
        else:
            assert float(text) == float(value), f"{key}: README {text}, code {value}"


def test_every_setting_is_documented_under_some_key() -> None:
    # Catches: a new setting nobody can find in the README.
    documented = {SETTINGS_BY_KEY[key].field for key in readme_defaults() if key != "operation"}
    assert {setting.field for setting in SETTINGS} == documented


def test_the_readme_lists_every_failure_code_and_no_other() -> None:
    # Catches: a code produced somewhere but undocumented, or a documented code nobody makes.
    text = README.read_text()
    paragraph = text[text.index("Failure codes:") : text.index("Provision creates with")]
    listed = set(re.findall(r"`([a-z0-9_]+)`", paragraph))
    assert listed == {code.value for code in FailureCode}


def test_a_config_that_names_nothing_reads_as_the_defaults() -> None:
    read = read_config({})
    assert read.admission == AdmissionConfig()
    assert read.sandbox.api_url == "https://api.e2b.app"
    assert read.sandbox.template_id == "base"


def test_only_the_named_fields_change_and_the_rest_keep_their_defaults() -> None:
    # Catches: the sparse construction leaking a value into the class (shared by every
    # later invocation in the same instance) or losing a default.
    first = read_config({"create_slots": "7", "sandbox_timeout_s": "60"})
    assert first.admission.create_slots == 7
    assert first.sandbox.sandbox_timeout_s == 60
    assert first.admission.max_sandboxes == AdmissionConfig().max_sandboxes
    again = read_config({})
    assert again.admission.create_slots == 4
    assert again.sandbox.sandbox_timeout_s == 3600
    assert first.admission != again.admission
    assert read_config({"create_slots": "7"}).admission == AdmissionConfig(create_slots=7)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"template_id": "", "create_slots": "0"}, "template_id"),
        ({"create_slots": "0", "sandbox_timeout_s": "0"}, "sandbox_timeout_s"),
        ({"max_sandboxes": "5", "max_sandboxes_per_tenant": "6"}, "max_sandboxes_per_tenant"),
    ],
)
def test_sandbox_keys_are_judged_before_admission_keys(
    config: dict[str, str], fragment: str
) -> None:
    # Catches: the one reader changing which of two bad keys is reported.
    with pytest.raises(ProvisionerError) as refused:
        read_config(config)
    assert refused.value.failure.code == FailureCode.INVALID_CONFIG
    assert fragment in refused.value.failure.message
