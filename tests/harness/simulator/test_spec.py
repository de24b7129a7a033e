"""The spec reader: the examples load, the package ships them from examples/, and every key
Temper would reject (or this executor would not run) is refused with a clear message."""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from harness.simulator.spec import (
    SpecError,
    load_spec,
    packaged_spec,
    packaged_spec_text,
    parse_spec,
)
from provisioner.config import AdmissionConfig, SandboxSettings

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ("temper_agent.ioa.toml", "curation_job.ioa.toml")
SHIPPED = (*EXAMPLES, "llm_gated_agent.ioa.toml")
MINIMAL = """
[automaton]
name = "Thing"
states = ["A", "B"]
initial = "A"

[[state]]
name = "n"
type = "counter"
initial = 0

[[action]]
name = "Go"
kind = "input"
from = ["A"]
to = "B"
params = ["x"]
effect = ["n += 1"]
"""


@pytest.mark.parametrize("name", SHIPPED)
def test_each_example_ships_as_the_packaged_spec(name: str) -> None:
    """Bug caught: `simulate` unable to find an example once installed, or reading a file
    other than the example (the wheel carries examples/ as `harness.examples`)."""
    assert resources.files("harness.examples").joinpath(name).read_bytes() == (
        (ROOT / "examples" / name).read_bytes()
    )
    assert packaged_spec_text(name) == (ROOT / "examples" / name).read_text()
    assert packaged_spec(name).name == load_spec(ROOT / "examples" / name).name


def test_the_examples_have_no_second_copy_in_the_package() -> None:
    """Bug caught: a stale copy of an example shipped beside the simulator, which
    `packaged_spec` could read instead of examples/."""
    copies = resources.files("harness.simulator") / "specs"
    assert [n for n in SHIPPED if copies.joinpath(n).is_file()] == []


def test_an_unknown_packaged_spec_is_refused() -> None:
    with pytest.raises(SpecError, match=r"no packaged spec named 'nope\.ioa\.toml'"):
        packaged_spec("nope.ioa.toml")


def test_the_old_example_is_gone() -> None:
    """Bug caught: the old-syntax example left behind for someone to load into Temper."""
    assert not (ROOT / "examples" / "curation_job.toml").exists()


def _keys(value: Any, prefix: str, out: set[str]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            path = f"{prefix}.{key}" if prefix else key
            if key in ("config", "args", "max_concurrent_actions"):
                out.add(path)
                continue
            _keys(inner, path, out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for entry in value:
            _keys(entry, prefix, out)
    else:
        out.add(prefix)


def test_examples_readme_lists_every_key_with_its_temper_type_and_file() -> None:
    """Acceptance of issue 12: every key of both example specs is listed in
    examples/README.md with the Temper type and the file that accepts it."""
    readme = (ROOT / "examples" / "README.md").read_text()
    table = {}
    for line in readme.splitlines():
        match = re.match(r"\|\s*`([a-z_.\[\]]+)`\s*\|([^|]*)\|([^|]*)\|", line)
        if match:
            table[match.group(1).replace("[]", "")] = (match.group(2), match.group(3))
    keys: set[str] = set()
    for name in EXAMPLES:
        _keys(tomllib.loads((ROOT / "examples" / name).read_text()), "", keys)
    missing = sorted(k for k in keys if k not in table)
    assert not missing, f"keys not in examples/README.md: {missing}"
    for key in keys:
        temper_type, where = table[key]
        assert temper_type.strip() and ".rs" in where, key


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_configs_are_valid_component_config(name: str) -> None:
    """Bug caught: a key or value the component would answer with invalid_config."""
    spec = packaged_spec(name)
    operations = set()
    for _action, trigger in spec.triggers():
        assert trigger.module == "sandbox_provisioner"
        config = {k: v for k, v in trigger.config if not v.startswith("{secret:")}
        SandboxSettings.from_config(config)
        AdmissionConfig.from_config(config)
        operations.add(config["operation"])
    assert operations == {"provision", "release"}


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_way_into_failed_or_out_of_a_sandbox_releases_it(name: str) -> None:
    """Bug caught: a job that fails or completes without triggering the release, leaving
    its sandbox (and its admission permit) behind."""
    spec = packaged_spec(name)
    way_out = {"Releasing", "Failing", "FailingRetried", "Failed"}
    checked = []
    for action in spec.actions:
        # From outside the way out (the answers that confirm a release move within it).
        entering = {action.target(s) for s in action.sources if s not in way_out}
        if entering & way_out:
            operations = {t.config_value("operation") for t in action.triggers}
            assert "release" in operations, action.name
            checked.append(action.name)
    assert checked, f"{name} has no action into Failed or Releasing: nothing was checked"


def test_a_minimal_spec_reads() -> None:
    spec = parse_spec(MINIMAL)
    go = spec.action("Go")
    assert go is not None and go.params == ("x",) and go.effects[0].op == "+="
    assert spec.initial_fields() == {"n": 0}


TRIGGER = '\n[[action.triggers]]\nname = "p"\nkind = "wasm"\nmodule = "m"\n'
TIMER = '[[state_timeout]]\nstate = "B"\nafter_seconds = 5\non_timeout = "Go"\n'

# Sections Temper rejects, or that this executor does not run (one silently ignored would
# run here but not in Temper, or here without the part that changes its behaviour).
SECTIONS: list[tuple[str, str]] = [
    (
        MINIMAL + '[[integration]]\nname = "p"\ntrigger = "p"\n',
        "[[integration]] is no longer supported: declare the call as an [[action.triggers]]",
    ),
    (MINIMAL + '[[bogus]]\nname = "x"\n', "unknown section 'bogus'"),
    (
        MINIMAL + '[[webhook]]\nname = "w"\n',
        "[webhook] is valid Temper but this executor does not run",
    ),
]
# Action and state keys: Temper's deny_unknown_fields and typed initials, mirrored.
ACTION_AND_STATE_KEYS: list[tuple[str, str]] = [
    (
        MINIMAL.replace('effect = ["n += 1"]', 'effect = [{ type = "increment", var = "n" }]', 1),
        "effect tables ({ type = ... }) are the old syntax",
    ),
    (
        MINIMAL.replace('to = "B"', 'to = "B"\ncolour = "red"', 1),
        "unknown key `colour` (Temper rejects it",
    ),
    (
        MINIMAL.replace('to = "B"', 'to = "B"\nguard = "n < 3"', 1),
        "`guard` is valid Temper but this executor",
    ),
    (
        MINIMAL.replace("initial = 0", 'initial = "0"', 1),
        "a counter starts at a value such as `initial = 0`",
    ),
    (
        MINIMAL.replace('effect = ["n += 1"]', 'effect = ["n = params.y"]', 1),
        "params.y is not a declared parameter",
    ),
    (MINIMAL.replace('from = ["A"]', 'from = ["Z"]', 1), "'Z' is not a declared state"),
    (
        MINIMAL.replace('kind = "input"', 'kind = "inbound"', 1),
        "kind: Input should be 'input', 'internal'",
    ),
    (
        MINIMAL.replace('initial = "A"', 'initial = "A"\nstrict_action_params = true', 1),
        "[automaton] strict_action_params: true is not run by this executor",
    ),
]
# Trigger keys: katagami's `timeout_secs` written on the trigger itself (Temper reads it
# from config), retired keys, or keys of another trigger kind.
TRIGGER_KEYS: list[tuple[str, str]] = [
    (
        MINIMAL + TRIGGER + 'to_state = "B"\n',
        "`to_state` is no longer a key; write the status into the guard",
    ),
    (MINIMAL + TRIGGER + 'target_action = "X"\n', "target_action do not belong to kind = 'wasm'"),
    (MINIMAL + TRIGGER + 'timeout_secs = "300"\n', "unknown key `timeout_secs`"),
    (MINIMAL + TRIGGER + 'on_success = "Nope"\n', "'Nope' is not a declared action"),
    (
        MINIMAL + TRIGGER + "config = { timeout_secs = 300 }\n",
        "config.timeout_secs: Input should be a valid string, found 300",
    ),
]
TIMER_AND_ADMISSION_KEYS: list[tuple[str, str]] = [
    (
        MINIMAL + TIMER + 'params = { error_message = "x" }\n',
        "`params` is no longer a key; write `args`",
    ),
    (MINIMAL + TIMER.replace('"B"', '"C"'), "not a declared state"),
    (MINIMAL + TIMER + 'reset_on = ["Nope"]\n', "reset_on 'Nope' is not a declared action"),
    # Temper's validator: a budget of no fires, or a timer due at once, is refused.
    (MINIMAL + TIMER + "max_occurrences = 0\n", "max_occurrences must be >= 1"),
    (
        MINIMAL + TIMER.replace("after_seconds = 5", "after_seconds = 0"),
        "after_seconds must be > 0",
    ),
    (
        MINIMAL + '[admission]\nmax_concurrent_actions = { "Nope" = 2 }\n',
        "'Nope' is not a declared",
    ),
    (MINIMAL + "[admission]\nqueue_length = 2\n", "unknown key `queue_length`"),
]


@pytest.mark.parametrize(
    ("text", "message"),
    [*SECTIONS, *ACTION_AND_STATE_KEYS, *TRIGGER_KEYS, *TIMER_AND_ADMISSION_KEYS],
)
def test_what_temper_rejects_or_this_executor_does_not_run_is_refused(
    text: str, message: str
) -> None:
    """Bug caught: a spec that Temper would reject, or that this executor would not run as
    written, accepted here (each group above says how)."""
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec(text)


ROUTE = '\n[[action.triggers.failure_routes]]\ncategory = "permanent"\naction = "Go"\n'


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (MINIMAL.replace('initial = "A"', 'initial = "A"\ncolour = 1', 1), "[automaton]"),
        (MINIMAL.replace("initial = 0", "initial = 0\ncolour = 1", 1), "state 'n'"),
        (MINIMAL.replace('to = "B"', 'to = "B"\ncolour = 1', 1), "action 'Go'"),
        (
            MINIMAL.replace('params = ["x"]', 'params = [{ name = "x", colour = 1 }]', 1),
            "action 'Go' params 'x'",
        ),
        (MINIMAL + TRIGGER + "colour = 1\n", "action 'Go' triggers 'p'"),
        (MINIMAL + TRIGGER + ROUTE + "colour = 1\n", "action 'Go' triggers 'p' failure_routes #1"),
        (MINIMAL + TIMER + "colour = 1\n", "state_timeout 'B'"),
        (MINIMAL + "[admission]\ncolour = 1\n", "[admission]"),
    ],
)
def test_every_table_refuses_an_unknown_key_naming_it_and_where(text: str, where: str) -> None:
    """Bug caught: a table of the schema that lets an unknown key through (Temper's
    deny_unknown_fields), or a refusal that does not say which key, or in which entry."""
    with pytest.raises(SpecError) as refused:
        parse_spec(text, source="s.toml")
    assert str(refused.value) == (
        f"s.toml: {where}: unknown key `colour` (Temper rejects it: deny_unknown_fields)"
    )
