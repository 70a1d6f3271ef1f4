"""Every Python snippet in README.md runs as written (each block on its own, in a fresh interpreter, so that what
one registers cannot leak into other tests), so the README cannot drift from the API. A block that cannot run here says so in an HTML comment on the line before it:
``<!-- not run: <reason> -->``; the test lists the reasons, so a skipped block is visible, never silent."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"(?:<!-- not run: (?P<reason>.*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def _blocks() -> list[tuple[int, str, str | None]]:
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 1, m["code"], m["reason"]) for m in _BLOCK.finditer(text)]


def test_the_readme_has_python_snippets() -> None:
    assert len(_blocks()) >= 4


@pytest.mark.parametrize(("line", "code", "reason"), _blocks(), ids=[f"README.md:{b[0]}" for b in _blocks()])
def test_readme_snippet_runs(line: int, code: str, reason: str | None, tmp_path: Path) -> None:
    if reason is not None:
        pytest.skip(f"README.md:{line} is marked not run: {reason}")
    script = tmp_path / f"README_line_{line}.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, f"README.md:{line} failed:\n{result.stderr[-3000:]}"
