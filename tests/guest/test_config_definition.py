"""provisioner.config is the one definition of the config keys: the config tables and the
list of failure codes in docs/contract.md and docs/admission.md must agree with it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.config import FOREIGN_KEYS, KEYS, AdmissionConfig, Key, read_config
from provisioner.failures import FailureCode
from provisioner.model import ProvisionerError

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _docs_text() -> str:
    return "\n".join((DOCS / name).read_text() for name in ("contract.md", "admission.md"))


def _tables(text: str) -> Iterator[list[list[str]]]:
    """Every markdown table of `text`, as rows of cells (the header first, no rule row)."""
    table: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):
                table.append(cells)
        elif table:
            yield table
            table = []


def documented(first_header: str) -> dict[str, str]:
    """Each key named in the first column of the tables whose header is `first_header`,
    `default`, ..., with the default its row states (`a / b` or `a, b` by position when the
    row names several keys, else one for all)."""
    found: dict[str, str] = {}
    for table in _tables(_docs_text()):
        if table[0][:2] != [first_header, "default"]:
            continue
        for cells in table[1:]:
            names = re.findall(r"`([a-z0-9_]+)`", cells[0])
            defaults = [d.strip("`") for d in re.split(r"\s+/\s+|,\s+", cells[1])]
            if len(defaults) == 1:
                defaults *= len(names)
            assert len(names) == len(defaults), cells
            for name, default in zip(names, defaults, strict=True):
                assert name not in found, f"{name} is documented twice"
                found[name] = default
    return found


def shown(row: Key, name: str) -> str:
    """A row's default as the docs show it for the spelling `name`: a duration in that
    spelling's unit, a missing default as `none`."""
    value = row.default
    if value is None:
        return "none"
    if row.type == "duration" and not name.endswith("_ms"):
        value /= 1000
    return str(value)


def _same(documented_default: str, code_default: str) -> bool:
    try:
        return float(documented_default) == float(code_default)
    except ValueError:
        return documented_default == code_default


@pytest.mark.parametrize(
    ("header", "sections", "extra"),
    [
        # Read outside KEYS (config.OPERATION_KEYS): the operation, and the release's name.
        ("key", ("sandbox", "admission", "host"), {"operation", "released_action"}),
        ("`<limit>`", ("resource",), set()),
    ],
)
def test_the_docs_tables_name_every_key_with_its_default_and_no_other(
    header: str, sections: tuple[str, ...], extra: set[str]
) -> None:
    # Catches: a key (or an alias) added, renamed or dropped in KEYS but not in the docs
    # (or the reverse), and a default changed on one side only.
    docs = documented(header)
    rows = [row for row in KEYS if row.section in sections]
    in_code = {name: shown(row, name) for row in rows for name in row.names}
    assert set(docs) - extra == set(in_code)
    for name, default in in_code.items():
        assert _same(docs[name], default), f"{name}: docs {docs[name]!r}, code {default!r}"


def test_the_docs_list_the_foreign_keys_and_no_other() -> None:
    (table,) = [t for t in _tables(_docs_text()) if t[0] == ["key", "read by"]]
    listed = {name for cells in table[1:] for name in re.findall(r"`([a-z_]+)`", cells[0])}
    assert listed == FOREIGN_KEYS


def test_the_readme_lists_every_failure_code_and_no_other() -> None:
    # Catches: a code produced somewhere but undocumented, or a documented code nobody makes.
    text = _docs_text()
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
