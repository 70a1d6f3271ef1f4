"""The package's shape: no module of attnrs imports, directly or through others, a module that imports it back.

Every import counts, at module level or inside a function, ``TYPE_CHECKING`` blocks included, and importing
``attnrs.a.b`` also counts as importing the package ``attnrs.a`` (Python runs its ``__init__`` first), except
for the importing module's own ancestors (a package's modules always run with their package imported).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import attnrs

PACKAGE = Path(attnrs.__file__).parent


def _modules(root: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported_names(name: str, path: Path) -> Iterator[str]:
    """Every dotted name ``name`` imports (``from x import y`` yields ``x`` and ``x.y``)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (with the packages those live in)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target in _imported_names(name, path):
            while target and target not in modules:  # an attribute of a module: the module
                target = target.rpartition(".")[0]
            while target:  # the module, and the packages Python imports on the way to it
                if target != name and not name.startswith(target + "."):
                    graph[name].add(target)
                target = target.rpartition(".")[0]
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(PACKAGE)
    assert len(graph) > 20, sorted(graph)  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_check_finds_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("def f():\n    from .sub.b import g\n")  # a function-level import counts
    (pkg / "sub" / "__init__.py").write_text("from .b import g\n")
    (pkg / "sub" / "b.py").write_text("from ..a import f\ng = 1\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.a"]
    (pkg / "a.py").write_text("x = 1\n")
    assert find_cycle(import_graph(pkg)) is None


def test_every_module_says_what_it_owns() -> None:
    modules = _modules(PACKAGE)
    undocumented = [name for name, path in modules.items() if ast.get_docstring(ast.parse(path.read_text())) is None]
    assert undocumented == []
