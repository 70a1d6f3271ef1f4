"""Progress bars for the long commands (``bench``, ``models``, ``demo``, ``benchmarks/*.py``).

One library draws them: tqdm. transformers depends on it, and every long command needs transformers, so it adds
nothing to install; it writes to stderr and leaves stdout (the tables) clean. Bars are drawn only when stderr is a
terminal: redirected or piped runs (CI logs, ``> results.txt``) get no bar and no carriage returns. Without tqdm,
:func:`progress` yields the items plainly.

    bar = progress(cases, "bench", unit="case")
    for case in bar:
        bar.note(case.name)  # what runs now, after the bar
        echo(f"{case.name} ...")  # printed above the bar, not through it
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sized
from typing import Any, Generic, TypeVar

__all__ = ["Progress", "echo", "progress"]

T = TypeVar("T")


def _bars_enabled() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class Progress(Generic[T]):
    """An iterable over ``items`` drawing a bar on stderr while it runs (see :func:`progress`)."""

    def __init__(self, items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> None:
        self._items = items
        self._bar: Any = None
        if _bars_enabled():
            try:
                from tqdm import tqdm
            except ImportError:
                return
            if total is None and isinstance(items, Sized):
                total = len(items)
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)

    def __iter__(self) -> Iterator[T]:
        try:
            for item in self._items:
                yield item
                if self._bar is not None:
                    self._bar.update(1)
        finally:
            self.close()

    def note(self, text: str) -> None:
        """Shows ``text`` (what runs now) after the bar."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Progress[T]:
    """``items`` with a progress bar on stderr named ``desc``, drawn only when stderr is a terminal.

    Print the results of the loop with :func:`echo` so that lines go above the bar rather than through it."""
    return Progress(items, desc, total, unit)


def echo(*parts: object, sep: str = " ", end: str = "\n", flush: bool = True) -> None:
    """``print(*parts)`` to stdout that keeps an active progress bar intact (always flushed: ``flush`` is
    accepted for print's signature)."""
    text = sep.join(str(p) for p in parts)
    try:
        from tqdm import tqdm
    except ImportError:
        print(text, end=end, flush=True)
        return
    tqdm.write(text, file=sys.stdout, end=end)
    sys.stdout.flush()
