"""Smoke test of the installed wheels of attnrs and of the example plugin (scripts/smoke_wheel.sh runs it in a fresh
virtual environment, from a directory outside the source tree): what a user gets from ``pip install`` works, and
a file missing from a wheel fails here.

Checks that both packages come from this environment (not the system site-packages, which may hold other
installs of them), the compiled module is the release build, the type information and licence files are
installed, the metadata is complete, attention matches torch's SDPA, the plugin is found through its entry point,
and ``python -m attnrs info`` runs.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import attnrs_example_kernel
import torch
import torch.nn.functional as F

import attnrs
from attnrs import _attnrs

PREFIX = Path(sys.prefix).resolve()
LICENCES = {"LICENSE-MIT", "LICENSE-APACHE"}


def check(condition: object, message: str) -> None:
    if not condition:
        sys.exit(f"smoke test failed: {message}")


def in_prefix(path: str | None) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(PREFIX)


def check_installed_here() -> None:
    check(sys.prefix != sys.base_prefix, f"not run in a virtual environment ({sys.prefix})")
    for module in (attnrs, _attnrs, attnrs_example_kernel):
        check(in_prefix(module.__file__), f"{module.__name__} is {module.__file__}, not from {PREFIX}")
    for src in ("python/attnrs", "examples/native_kernel"):
        check(not any((Path(p) / src).exists() for p in sys.path if p), f"a source tree is on sys.path: {sys.path}")


def check_package_files() -> None:
    package = Path(attnrs.__file__).parent
    for name in ("py.typed", "_attnrs.pyi"):
        check((package / name).is_file(), f"{name} is not installed in {package}")
    check(Path(_attnrs.__file__).name.endswith(".abi3.so"), f"not an abi3 module: {_attnrs.__file__}")
    check(not hasattr(_attnrs, "_test_capsule"), "the compiled module is a test-hooks build, not the release one")


def check_distribution(name: str, *classifiers: str) -> None:
    dist = importlib.metadata.distribution(name)
    check(in_prefix(str(dist.locate_file(""))), f"the distribution {name} is not the one in {PREFIX}")
    files = {f.name for f in dist.files or () if "licenses" in f.parts and Path(str(f.locate())).is_file()}
    check(LICENCES <= files, f"{name}: licence files missing from its .dist-info: {sorted(LICENCES - files)}")
    meta = dist.metadata
    check(meta["License-Expression"] == "MIT OR Apache-2.0", f"{name}: License-Expression {meta['License-Expression']}")
    check(meta.get_all("Project-URL"), f"{name}: no Project-URL")
    check(meta["Keywords"], f"{name}: no keywords")
    readme_type = meta["Description-Content-Type"] or ""
    readme = (dist.read_text("METADATA") or "").partition("\n\n")[2]  # the body after the headers
    check(readme_type.startswith("text/markdown") and readme.strip(), f"{name}: no readme ({readme_type!r})")
    missing = set(classifiers) - set(meta.get_all("Classifier") or ())
    check(not missing, f"{name}: classifiers missing: {sorted(missing)}")


def check_attention() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 33, 16, generator=gen) for _ in range(3))
    for causal in (False, True):
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        for backend in ("auto", "example"):
            out = attnrs.attention(q, k, v, is_causal=causal, backend=backend)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=f"{backend} causal={causal}")


def check_plugin() -> None:
    kernels = attnrs.native_kernels()
    check("example" in kernels, f"the example plugin is not found through its entry point: {list(kernels)}")
    check(kernels["example"]["origin"] == "plugin 'example' (ABI v1)", f"origin {kernels['example']['origin']}")
    check(not attnrs.plugin_errors(), f"plugin errors: {attnrs.plugin_errors()}")
    (ep,) = importlib.metadata.entry_points(group="attnrs.kernels", name="example")
    check(ep.dist is not None and ep.dist.name == "attnrs-example-kernel", f"entry point from {ep.dist}")


def check_cli() -> None:
    for command in ([sys.executable, "-m", "attnrs", "info"], [str(Path(sys.executable).with_name("attnrs")), "info"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        check(result.returncode == 0 and result.stdout.strip(), f"{command}: {result.returncode}\n{result.stderr}")
    print(result.stdout.strip())


def main() -> None:
    check_installed_here()
    check_package_files()
    check_distribution(
        "attnrs",
        "Typing :: Typed",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.13",
        "Operating System :: POSIX :: Linux",
    )
    check_distribution("attnrs-example-kernel", "Programming Language :: Rust")
    check_plugin()
    check_attention()
    check_cli()
    print(f"smoke test passed: attnrs {attnrs.__version__} from {Path(attnrs.__file__).parent}")


if __name__ == "__main__":
    main()
