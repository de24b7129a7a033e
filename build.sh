#!/usr/bin/env bash
# Builds dist/sandbox_provisioner.wasm: the provisioner guest compiled to a WebAssembly
# component that imports only this project's WIT interfaces (no wasi:*), and
# dist/temper_shim.wasm, the core module that lets Temper reach `sandbox-provisioner serve`.
#
#   ./build.sh           build (skipped when the inputs have not changed)
#   ./build.sh --force   rebuild whatever the stamp says
#
# Environment: PYTHON (default python3) creates .venv when it is missing.
set -euo pipefail
cd "$(dirname "$0")"

force=0
[ "${1:-}" = "--force" ] && force=1

die() { echo "build.sh: $*" >&2; exit 1; }

# One build at a time: pytest-xdist's workers each run build.sh from a session fixture, and
# two unlocked runs race on build/guest and dist/*.tmp (one fails with "cannot stat
# dist/sandbox_provisioner.wasm.tmp", erroring every component test of its worker). The
# one that waited then finds the stamp up to date and returns at once.
command -v flock >/dev/null 2>&1 || die "flock not found (it comes with util-linux)"
mkdir -p build
exec 9>build/.lock
flock 9

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: install Python 3.11 or set PYTHON"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is older than 3.11"
    echo "build.sh: creating .venv"
    "$PYTHON" -m venv .venv || die "could not create .venv (is the venv module installed?)"
fi

# Install the project (and its build and test tools) when the venv lacks them or
# pyproject.toml or setup.py changed since the last install (harness.examples, mapped onto
# examples/ by setup.py, is importable only through the editable install's finder).
install_stamp=.venv/.sandbox-provisioner-install
if [ ! -f "$install_stamp" ] || [ pyproject.toml -nt "$install_stamp" ] \
    || [ setup.py -nt "$install_stamp" ] \
    || ! .venv/bin/python -c 'import harness.examples, host, provisioner' 2>/dev/null; then
    echo "build.sh: installing the project into .venv"
    .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
    .venv/bin/python -m pip install --quiet -e '.[build,test]' || die "pip install failed"
    touch "$install_stamp"
fi
[ -x .venv/bin/componentize-py ] || die "componentize-py is missing from .venv (pip install -e '.[build]')"

# The Temper shim (shim/temper_shim.wat): a core module assembled with wasmtime-py's
# wat2wasm, so it needs nothing beyond the venv. Rebuilt when its source is newer.
shim_out=dist/temper_shim.wasm
if [ "$force" = 1 ] || [ ! -f "$shim_out" ] || [ shim/temper_shim.wat -nt "$shim_out" ]; then
    mkdir -p dist
    .venv/bin/python -c 'import sys, wasmtime; open(sys.argv[2], "wb").write(wasmtime.wat2wasm(open(sys.argv[1]).read()))' \
        shim/temper_shim.wat "$shim_out.tmp" || die "could not assemble shim/temper_shim.wat"
    mv "$shim_out.tmp" "$shim_out"
    echo "build.sh: wrote $shim_out ($(stat -c %s "$shim_out") bytes)"
fi

out=dist/sandbox_provisioner.wasm
stamp=dist/.inputs.sha256
inputs_hash=$( {
    .venv/bin/componentize-py --version
    find wit provisioner -type f \( -name '*.wit' -o -name '*.py' \) -not -path '*/__pycache__/*' \
        | LC_ALL=C sort | xargs sha256sum
} | sha256sum | cut -d' ' -f1)

if [ "$force" = 0 ] && [ -f "$out" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs_hash" ]; then
    echo "build.sh: $out is up to date"
    exit 0
fi

# Bundle a clean copy of the guest: everything under -p ends up in the component.
stage=build/guest
rm -rf "$stage"
mkdir -p "$stage" dist
tar --exclude='__pycache__' --exclude='*.pyc' -cf - provisioner | tar -xf - -C "$stage"

echo "build.sh: componentizing (about 10 s)"
.venv/bin/componentize-py -d wit -w sandbox-provisioner componentize provisioner.component \
    -p "$stage" -o "$out.tmp" --stub-wasi
mv "$out.tmp" "$out"
echo "$inputs_hash" > "$stamp"
size=$(stat -c %s "$out")
echo "build.sh: wrote $out ($((size / 1024)) KiB)"
