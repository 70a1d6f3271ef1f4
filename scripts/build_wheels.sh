#!/usr/bin/env bash
# Builds the release wheels of attnrs and of the example kernel plugin (examples/native_kernel) into OUT_DIR
# (default dist/, git-ignored) and checks them with `auditwheel show`:
#   - manylinux: zig links against an old glibc (ATTNRS_MANYLINUX, default manylinux_2_17; the host's own linker
#     would tie the wheel to the host's glibc, 2.34+ for the pthread symbols that moved into libc);
#   - abi3: one wheel for every CPython >= 3.10 (pyo3's abi3-py310), tagged cp310-abi3;
#   - release features only (no test-hooks), licence files in the .dist-info.
# scripts/smoke_wheel.sh installs the wheels into a fresh virtual environment and tests them from outside the
# source tree. The build tools are pinned (as CI pins ruff and mypy); ATTNRS_WHEEL_TOOLS=skip uses those on PATH.
#
# usage: bash scripts/build_wheels.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${1:-dist}
mkdir -p "$out"
out=$(cd "$out" && pwd)
compat=${ATTNRS_MANYLINUX:-manylinux_2_17}

if [ "${ATTNRS_WHEEL_TOOLS:-}" != skip ]; then
    python3 -m pip install "maturin==1.16.0" "ziglang==0.17.1" "auditwheel==6.8.2"
fi

# The example's licence files are copies (a wheel takes licence files from under its own project directory).
for f in LICENSE-MIT LICENSE-APACHE; do
    cmp "$f" "examples/native_kernel/$f" || { echo "examples/native_kernel/$f differs from $f" >&2; exit 1; }
done

rm -f "$out"/attnrs-*.whl "$out"/attnrs_example_kernel-*.whl
# Both builds share the workspace's target dir (the example's own, examples/native_kernel/target, for the
# plugin): a second run recompiles nothing.
python3 -m maturin build --release --zig --compatibility "$compat" --out "$out"
python3 -m maturin build --release --zig --compatibility "$compat" --out "$out" \
    --manifest-path examples/native_kernel/Cargo.toml

status=0
for pattern in "attnrs-*-cp310-abi3-*.whl" "attnrs_example_kernel-*-cp310-abi3-*.whl"; do
    # shellcheck disable=SC2086 # the pattern is meant to expand
    set -- "$out"/$pattern
    if [ "$#" -ne 1 ] || [ ! -f "$1" ]; then
        echo "expected one wheel $pattern in $out, found: $(ls "$out")" >&2
        status=1
        continue
    fi
    whl=$1
    echo "== $(basename "$whl")"
    case "$whl" in
        *"${compat}_x86_64"*) ;;
        *) echo "not tagged ${compat}_x86_64" >&2; status=1 ;;
    esac
    if python3 -m auditwheel --version >/dev/null 2>&1; then
        report=$(python3 -m auditwheel show "$whl") || { status=1; report=""; }
        echo "$report"
        # auditwheel names the most compatible tag the wheel's symbols allow; it must be (at least) the one built.
        if ! grep -q "${compat}_x86_64" <<<"$report"; then
            echo "auditwheel does not find $(basename "$whl") consistent with ${compat}_x86_64" >&2
            status=1
        fi
    else
        echo "auditwheel is not installed: not checked" >&2
    fi
    python3 - "$whl" <<'EOF' || status=1
import sys, zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
missing = [f for f in ("LICENSE-MIT", "LICENSE-APACHE") if f"{dist_info}/licenses/{f}" not in names]
if missing:
    sys.exit(f"licence files missing from {dist_info}: {missing}")
print(f"licence files: {dist_info}/licenses/LICENSE-MIT, LICENSE-APACHE")
EOF
done
[ "$status" -eq 0 ] && echo "wheels in $out: $(cd "$out" && ls ./*.whl | tr '\n' ' ')"
exit "$status"
