"""The product (package `host`) never imports the harness (package `harness`): not at the
top of a module, not lazily inside a function, not through `importlib`. And of the guest
(package `provisioner`) it imports only the contract's types and the native runtime's
entry point: it reads the guest's state by asking the guest (`operation = inspect`), so
host and component versions stay apart."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ROOT / "host"
HARNESS = "harness"
# The contract the host shares with the guest: the invocation and outcome model, the ports'
# types and the failure codes.
GUEST_CONTRACT = ("provisioner.model", "provisioner.ports", "provisioner.failures")
# The guest's entry point, which only the native runtime calls.
GUEST_ENTRY = "provisioner.app"
NATIVE_RUNTIME = "host.runtime.native"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """Every module `source` names in an import, anywhere in its tree, with its line."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            found += [
                (node.lineno, f"{name}.{alias.name}" if name else alias.name)
                for alias in node.names
            ]
        elif (
            isinstance(node, ast.Call)
            and (
                (
                    isinstance(node.func, ast.Name)
                    and node.func.id in {"__import__", "import_module"}
                )
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def harness_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    return [
        f"line {line}: {name}"
        for line, name in imported_modules(source, module, is_package)
        if name == HARNESS or name.startswith(HARNESS + ".")
    ]


def product_modules() -> list[Path]:
    return sorted(path for path in PRODUCT.rglob("*.py") if "__pycache__" not in path.parts)


def product_violations(check: Callable[[str, str, bool], list[str]]) -> dict[str, list[str]]:
    """What `check` finds in each product module, by path (modules where it finds nothing are
    left out)."""
    modules = product_modules()
    # The walk must see the product, or the checks pass on nothing.
    assert PRODUCT / "cli" / "main.py" in modules and len(modules) > 50
    return {
        str(path.relative_to(ROOT)): found
        for path in modules
        if (found := check(path.read_text(), module_name(path), path.name == "__init__.py"))
    }


def test_no_product_module_imports_the_harness() -> None:
    assert product_violations(harness_imports) == {}


@pytest.mark.parametrize(
    "source",
    [
        "import harness.simulator\n",
        "from harness.mocks.e2b import MockE2BServer\n",
        "from harness import cli\n",
        "def run() -> None:\n    from harness.multihost import soak\n",
        "import importlib\nimportlib.import_module('harness.temper_abi')\n",
        "from ... import harness\n",
    ],
)
def test_the_check_sees_every_form_of_import(source: str) -> None:
    """Bug caught: a lazy or relative import of the harness slipping past the walk."""
    assert harness_imports(source, "host.serve.app") != []


def test_the_check_leaves_product_imports_alone() -> None:
    source = "from host.cli.options import fail\nfrom . import harness_like\nimport host\n"
    assert harness_imports(source, "host.serve.app") == []


def guest_internals(source: str, module: str, is_package: bool = False) -> list[str]:
    """Imports of the guest beyond its contract (and, outside the native runtime, its entry
    point)."""
    allowed = GUEST_CONTRACT + ((GUEST_ENTRY,) if module == NATIVE_RUNTIME else ())
    return [
        f"line {line}: {name}"
        for line, name in imported_modules(source, module, is_package)
        if (name == "provisioner" or name.startswith("provisioner."))
        and not any(name == ok or name.startswith(ok + ".") for ok in allowed)
    ]


def test_the_product_imports_only_the_guests_contract_and_entry_point() -> None:
    assert product_violations(guest_internals) == {}


@pytest.mark.parametrize(
    ("source", "module", "bad"),
    [
        ("from provisioner.gates.view import GateView\n", "host.operator.gates", True),
        ("def f() -> None:\n    from provisioner import config\n", "host.serve.app", True),
        ("import provisioner.e2b\n", "host.serve.metrics", True),
        ("from provisioner.app import run\n", "host.serve.app", True),
        ("from provisioner.app import run\n", NATIVE_RUNTIME, False),
        ("from provisioner.model import Outcome\n", "host.serve.app", False),
        ("from provisioner.ports import Entry, Scope\n", "host.storage.base", False),
    ],
)
def test_the_guest_check_tells_the_contract_from_the_internals(
    source: str, module: str, bad: bool
) -> None:
    """Bug caught: an import of the guest's internals (a gate document's decoder, its config
    reader) slipping past the walk, or the contract flagged."""
    assert (guest_internals(source, module) != []) is bad
