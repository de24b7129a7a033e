"""Where the host finds its component and keeps its state and compile cache.

Each location can be set by an environment variable; otherwise the platform's own
directories are used (platformdirs: XDG on Linux), so an installed `sandbox-provisioner`
works from any directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "sandbox-provisioner"
COMPONENT_ENV = "SANDBOX_PROVISIONER_COMPONENT"
STATE_ENV = "SANDBOX_PROVISIONER_STATE"
CACHE_ENV = "SANDBOX_PROVISIONER_CACHE"

# What ./build.sh writes in a source checkout.
BUILT_COMPONENT = Path(__file__).resolve().parents[2] / "dist" / "sandbox_provisioner.wasm"
# Where a wheel carries it (setup.py copies the built component in at build time).
PACKAGED_COMPONENT = Path(__file__).resolve().parent / "component" / "sandbox_provisioner.wasm"
# The Temper shim (a core module), built and carried the same way.
BUILT_SHIM = BUILT_COMPONENT.parent / "temper_shim.wasm"
PACKAGED_SHIM = PACKAGED_COMPONENT.parent / "temper_shim.wasm"


def default_component() -> Path:
    """`$SANDBOX_PROVISIONER_COMPONENT`, else the installed package's copy, else the
    checkout's build output."""
    configured = os.environ.get(COMPONENT_ENV)
    if configured:
        return Path(configured)
    if PACKAGED_COMPONENT.is_file():
        return PACKAGED_COMPONENT
    return BUILT_COMPONENT


def default_shim() -> Path:
    """The installed package's copy of the Temper shim, else the checkout's build output."""
    return PACKAGED_SHIM if PACKAGED_SHIM.is_file() else BUILT_SHIM


def state_dir() -> Path:
    configured = os.environ.get(STATE_ENV)
    if configured:
        return Path(configured)
    return Path(platformdirs.user_state_dir(APP_NAME, appauthor=False))


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))
