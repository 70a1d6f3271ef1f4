#!/usr/bin/env bash
# Installs the wheels that scripts/build_wheels.sh built (WHEEL_DIR, default dist/) into a fresh virtual
# environment and runs scripts/smoke_wheel.py from a temporary directory outside the source tree, so a file
# missing from a wheel fails here. The environment reuses the machine's torch and numpy (--system-site-packages)
# and installs the wheels with --no-deps; its own attnrs takes precedence over any in the system site-packages
# (the smoke test checks where every module comes from).
#
# usage: bash scripts/smoke_wheel.sh [WHEEL_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=$(cd "${1:-dist}" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/attnrs-smoke.XXXXXX")
trap 'rm -rf "$work"' EXIT
cp scripts/smoke_wheel.py "$work/"

python3 -m venv --system-site-packages "$work/venv"
py=$work/venv/bin/python
shopt -s nullglob
whls=("$wheels"/attnrs-*.whl "$wheels"/attnrs_example_kernel-*.whl)
[ "${#whls[@]}" -eq 2 ] || { echo "expected the two wheels in $wheels, found: ${whls[*]}" >&2; exit 1; }
# --force-reinstall: the system site-packages may hold the same versions, which pip would call installed.
"$py" -m pip install --no-deps --force-reinstall --no-cache-dir "${whls[@]}"

cd "$work"
env -u PYTHONPATH "$py" smoke_wheel.py
