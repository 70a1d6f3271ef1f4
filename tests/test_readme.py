"""Every Python snippet in README.md and in docs/*.md runs as written (each block on its own, in a fresh interpreter, so that what
one registers cannot leak into other tests), so the README cannot drift from the API. A block that cannot run here says so in an HTML comment on the line before it:
``<!-- not run: <reason> -->``; the test lists the reasons, so a skipped block is visible, never silent."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"(?:<!-- not run: (?P<reason>.*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def _blocks() -> list[tuple[str, str, str | None]]:
    """``(where, code, reason not run)`` of every Python block, ``where`` as ``file:line``."""
    found = []
    for doc in DOCUMENTS:
        text = doc.read_text()
        where = doc.relative_to(ROOT)
        found += [(f"{where}:{text[: m.start()].count(chr(10)) + 1}", m["code"], m["reason"]) for m in _BLOCK.finditer(text)]
    return found


def test_the_readme_has_python_snippets() -> None:
    assert sum(where.startswith("README.md:") for where, _, _ in _blocks()) >= 4


@pytest.mark.parametrize(("where", "code", "reason"), _blocks(), ids=[b[0] for b in _blocks()])
def test_snippet_runs(where: str, code: str, reason: str | None, tmp_path: Path) -> None:
    if reason is not None:
        pytest.skip(f"{where} is marked not run: {reason}")
    script = tmp_path / "snippet.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, f"{where} failed:\n{result.stderr[-3000:]}"
