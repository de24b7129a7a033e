"""Build hook: a wheel carries the built component, so an installed host runs anywhere.

`./build.sh` writes dist/sandbox_provisioner.wasm; building a wheel (`pip install .`)
copies it to host/runtime/component/, where host.runtime.paths looks first. An editable
install keeps using the checkout's dist/ directly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

COMPONENT = Path(__file__).resolve().parent / "dist" / "sandbox_provisioner.wasm"


class BuildWithComponent(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        if not COMPONENT.is_file():
            raise SystemExit(f"{COMPONENT} is missing: run ./build.sh before building a wheel")
        target = Path(self.build_lib) / "host" / "runtime" / "component"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(COMPONENT, target / COMPONENT.name)


setup(cmdclass={"build_py": BuildWithComponent})
