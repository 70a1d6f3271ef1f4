"""Every Python snippet in README.md and in docs/*.md runs as written (each block on its own, in a fresh process, so that what
one registers cannot leak into other tests), so the README cannot drift from the API. Each block runs in a fork of
one interpreter that has only imported torch, transformers and attnrs (what a fresh interpreter would do first): the
same state as a new ``python snippet.py``, without paying those imports' seconds for every block. A block that cannot run here says so in an HTML comment on the line before it:
``<!-- not run: <reason> -->``; the test lists the reasons, so a skipped block is visible, never silent."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
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
        found += [
            (f"{where}:{text[: m.start()].count(chr(10)) + 1}", m["code"], m["reason"]) for m in _BLOCK.finditer(text)
        ]
    return found


def test_the_readme_has_python_snippets() -> None:
    assert sum(where.startswith("README.md:") for where, _, _ in _blocks()) >= 4


# The fork server: reads a script path per line, runs each script in a forked child (cwd its directory, stdout and
# stderr into files beside it, as `python script.py` would run it) and answers the child's exit status.
_SERVER = r"""
import os, runpy, signal, sys, traceback
import torch, transformers, attnrs

for line in sys.stdin:
    script = line.strip()
    pid = os.fork()
    if pid == 0:
        os.chdir(os.path.dirname(script))
        for fd, name in ((1, "stdout.txt"), (2, "stderr.txt")):
            os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = [script]
        status = 0
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    signal.alarm(300)  # a block that hangs fails its test instead of the session
    _, status = os.waitpid(pid, 0)
    signal.alarm(0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


@pytest.fixture(scope="module")
def fork_server() -> Iterator[subprocess.Popen[str]]:
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    yield server
    assert server.stdin is not None
    server.stdin.close()
    server.wait(timeout=60)
    assert server.stdout is not None
    server.stdout.close()


@pytest.mark.parametrize(("where", "code", "reason"), _blocks(), ids=[b[0] for b in _blocks()])
def test_snippet_runs(
    where: str, code: str, reason: str | None, tmp_path: Path, fork_server: subprocess.Popen[str]
) -> None:
    if reason is not None:
        pytest.skip(f"{where} is marked not run: {reason}")
    script = tmp_path / "snippet.py"
    script.write_text(code)
    assert fork_server.stdin is not None and fork_server.stdout is not None
    fork_server.stdin.write(f"{script}\n")
    answer = fork_server.stdout.readline()
    assert answer, "the fork server died"
    stderr = (tmp_path / "stderr.txt").read_text()
    assert int(answer) == 0, f"{where} failed (exit {answer.strip()}):\n{stderr[-3000:]}"
