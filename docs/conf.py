"""Sphinx configuration of the attnrs documentation: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.

Pages are Markdown (MyST), so ``tests/test_readme.py`` runs their Python blocks as it runs the README's; the API
reference is autodoc of the installed (or ``PYTHONPATH``) ``attnrs``, whose docstrings are reStructuredText with
Sphinx roles. The mask pictures are drawn at build time by ``python -m attnrs show-mask --png`` into
``docs/_generated/`` (git-ignored), so the docs show whatever the command line draws.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import attnrs

DOCS = Path(__file__).resolve().parent
GENERATED = DOCS / "_generated"

project = "attnrs"
author = "the attnrs authors"
copyright = "the attnrs authors, MIT OR Apache-2.0"
release = attnrs.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_generated", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"  # types in the signature; the docstrings describe the parameters
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

intersphinx_mapping = {"python": ("https://docs.python.org/3", None)} if os.environ.get("ATTNRS_DOCS_ONLINE") else {}

html_theme = "furo"
html_title = f"attnrs {release}"
html_static_path = ["_static"]
html_css_files = ["attnrs.css"]

# The pictures of the masks page: (file name, show-mask expression, length), drawn by the command line.
MASK_PICTURES = [
    ("causal", "causal()", 256),
    ("sliding_window", "sliding_window(64)", 256),
    ("chunked", "chunked(64)", 256),
    ("documents", "document(torch.arange(256) // 80) & causal()", 256),
    ("prefix_lm", "prefix_lm([96])", 256),
]

# One child process runs ``python -m attnrs show-mask EXPR --length N --png PATH`` for every picture through the
# command line's entry point (the same argument parsing and drawing code), so torch is imported once, not once per
# picture (several seconds each on a 2-core machine).
_SHOW_MASKS = """
import contextlib, io, json, sys
from attnrs.cli import main
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()):
        status = main(argv)
    if status != 0:
        sys.exit(f"python -m attnrs {' '.join(argv)} exited with {status}")
"""


def show_mask_commands(pictures: list[tuple[str, str, int]] = MASK_PICTURES) -> list[list[str]]:
    """The ``show-mask`` argument lists that write ``_generated/mask_<name>.png``."""
    return [
        [
            "show-mask",
            expression,
            "--length",
            str(length),
            "--block",
            str(max(1, length // 16)),
            "--png",
            str(GENERATED / f"mask_{name}.png"),
        ]
        for name, expression, length in pictures
    ]


def draw_mask_pictures(pictures: list[tuple[str, str, int]] = MASK_PICTURES) -> None:
    """Draws the pictures with the command line; a failure stops the build with the command's error."""
    GENERATED.mkdir(exist_ok=True)
    commands = show_mask_commands(pictures)
    result = subprocess.run(
        [sys.executable, "-c", _SHOW_MASKS, json.dumps(commands)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"drawing the mask pictures failed ({result.returncode}):\n{result.stderr}")


def setup(app: object) -> None:
    draw_mask_pictures()
