"""Building the probe guest (tests/guests/probe): a misbehaving component for containment
tests and the benchmarks' empty-call floor.

The build is cached under a name derived from the hash of its inputs (componentize-py's
version, wit/ and the probe's sources), so repeated test runs reuse the artefact; a file
lock keeps concurrent test processes from building it twice at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from host.runtime.paths import cache_dir as default_cache_dir

ROOT = Path(__file__).resolve().parents[2]
PROBE_SOURCE = ROOT / "tests" / "guests" / "probe"
WIT_DIR = ROOT / "wit"
WORLD = "sandbox-provisioner"
APP_MODULE = "probe_app"


def _componentize_py() -> str:
    beside = Path(sys.executable).with_name("componentize-py")
    found = str(beside) if beside.is_file() else shutil.which("componentize-py")
    if found is None:
        raise FileNotFoundError("componentize-py is not installed (pip install -e '.[build]')")
    return found


def _sources() -> list[Path]:
    wit = sorted(WIT_DIR.rglob("*.wit"))
    probe = sorted(p for p in PROBE_SOURCE.rglob("*.py") if "__pycache__" not in p.parts)
    return wit + probe


def inputs_digest(tool: str | None = None) -> str:
    tool = tool or _componentize_py()
    version = subprocess.run(
        [tool, "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    digest = hashlib.sha256(version.encode())
    for path in _sources():
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def build_probe_component(cache_dir: Path | None = None) -> Path:
    """The probe component's path, built when no artefact for the current inputs exists."""
    tool = _componentize_py()
    directory = cache_dir or default_cache_dir() / "probe"
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"probe-{inputs_digest(tool)[:24]}.wasm"
    if target.is_file():
        return target
    with open(directory / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():  # another process built it while this one waited
            return target
        with tempfile.TemporaryDirectory(prefix=".build-", dir=directory) as scratch:
            stage = Path(scratch) / "src"
            stage.mkdir()
            # Everything under -p is bundled: stage only the sources.
            for source in PROBE_SOURCE.glob("*.py"):
                shutil.copy2(source, stage / source.name)
            output = Path(scratch) / "probe.wasm"
            result = subprocess.run(
                [
                    tool,
                    "-d",
                    str(WIT_DIR),
                    "-w",
                    WORLD,
                    "componentize",
                    APP_MODULE,
                    "-p",
                    str(stage),
                    "-o",
                    str(output),
                    "--stub-wasi",
                ],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise RuntimeError(
                    f"componentize-py failed for the probe:\n{result.stdout}\n{result.stderr}"
                )
            os.replace(output, target)
    return target


__all__ = ["build_probe_component", "inputs_digest"]
