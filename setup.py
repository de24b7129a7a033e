"""Build hook: a wheel carries the built component, so an installed host runs anywhere.

`./build.sh` writes dist/sandbox_provisioner.wasm and dist/temper_shim.wasm; building a
wheel (`pip install .`) copies both to host/runtime/component/, where host.runtime.paths
looks first. An editable
install keeps using the checkout's dist/ directly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

DIST = Path(__file__).resolve().parent / "dist"
# The component, and the Temper shim that `simulate` runs its provisioner mode through.
BUILT = (DIST / "sandbox_provisioner.wasm", DIST / "temper_shim.wasm")


class BuildWithComponent(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / "host" / "runtime" / "component"
        target.mkdir(parents=True, exist_ok=True)
        for built in BUILT:
            if not built.is_file():
                raise SystemExit(f"{built} is missing: run ./build.sh before building a wheel")
            shutil.copyfile(built, target / built.name)


setup(
    cmdclass={"build_py": BuildWithComponent},
    # `examples/` is the one copy of the example specs; the wheel carries it as the package
    # `harness.examples`, where the installed `simulate` reads them (harness.simulator.spec).
    packages=[*find_packages(include=["provisioner*", "host*", "harness*"]), "harness.examples"],
    package_dir={"harness.examples": "examples"},
)
