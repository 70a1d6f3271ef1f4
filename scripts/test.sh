#!/usr/bin/env bash
# Installs attnrs with its test extras and the example kernel plugin (examples/native_kernel, its own wheel),
# and runs every test: Rust (core and ABI crates, no Python needed), the stub check of the compiled module, and
# pytest. This is the README's test command; .ci/run calls it. The install enables the cargo feature "test-hooks"
# (the test-only entry points of attnrs._attnrs, absent from release builds) through maturin's PEP 517 build-args.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install ".[test]" --config-settings=build-args="--features test-hooks"
python3 -m pip install ./examples/native_kernel
export ATTNRS_REQUIRE_EXAMPLE_KERNEL=1 # tests/test_native.py fails instead of skipping without the plugin
cargo test --workspace --exclude attnrs-py
cargo test -p attnrs-py --features test-hooks --lib # the bindings' own Rust tests (mask operand); links libpython
python3 -m mypy.stubtest attnrs._attnrs
status=0
python3 -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests" >&2
fi
exit "$status"
