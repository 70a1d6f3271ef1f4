"""Figures for ``bench --plot`` and ``show-mask --png``, drawn with matplotlib (the ``bench`` or ``plot`` extra).

Only matplotlib's object-oriented API is used (:class:`matplotlib.figure.Figure`, no pyplot), so nothing needs a
display and no global backend is chosen. The format follows the file's suffix: ``.png`` or ``.svg``. SVG text
stays text (searchable, selectable); both formats carry the figure's title in their metadata.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "INSTALL_HINT",
    "SUFFIXES",
    "PlotError",
    "check_output",
    "cpu_name",
    "new_figure",
    "plot_bench",
    "require_matplotlib",
    "save",
]

SUFFIXES = (".png", ".svg")
INSTALL_HINT = 'pip install "attnrs[bench]" (or "attnrs[plot]": matplotlib alone)'
DPI = 100


class PlotError(Exception):
    """A figure cannot be written (matplotlib missing, unknown format): the message says what to do."""


def check_output(path: str | Path, flag: str) -> Path:
    """``path`` as a Path if its suffix names a format we write; :class:`PlotError` otherwise."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise PlotError(
            f"{flag} {str(path)!r}: the format follows the file's suffix, which must be .png or .svg "
            f"(got {path.suffix or 'none'!r})"
        )
    return path


def require_matplotlib(flag: str) -> None:
    """:class:`PlotError` naming the extra to install when matplotlib cannot be imported."""
    try:
        import matplotlib
        import matplotlib.figure  # noqa: F401
    except ImportError as e:
        raise PlotError(f"{flag} needs matplotlib, which is not installed ({e}): {INSTALL_HINT}") from None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else :func:`platform.processor`."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def new_figure(width: float, height: float) -> Figure:
    require_matplotlib("plotting")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def legend_below(fig: Figure, handles: Sequence[Any], max_columns: int, columns_when_wider: int) -> None:
    """The figure's legend centred under its panels: one row of up to ``max_columns`` entries, else
    ``columns_when_wider`` columns."""
    ncol = len(handles) if len(handles) <= max_columns else columns_when_wider
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False, fontsize=9)


def save(fig: Figure, path: str | Path, title: str) -> tuple[int, int]:
    """Writes ``fig`` in the format of ``path``'s suffix, ``title`` in the file's metadata; returns (height, width)
    in pixels."""
    import matplotlib

    path = check_output(path, "output")
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "attnrs"}):
        fig.savefig(path, dpi=DPI, metadata={"Title": title})
    width, height = fig.get_size_inches() * DPI
    return round(height), round(width)


def _colors(names: Sequence[str]) -> dict[str, Any]:
    """One colour per implementation, the same in every panel; attnrs first."""
    import matplotlib

    palette = matplotlib.color_sequences["tab10"]
    ordered = sorted(dict.fromkeys(names), key=lambda n: n != "attnrs")
    return {name: palette[i % len(palette)] for i, name in enumerate(ordered)}


def _format_ms(ms: float) -> str:
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 1:
        return f"{ms:.1f} ms"
    return f"{ms:.3f} ms"


def _plain(value: float, _position: object = None) -> str:
    """Tick labels as plain numbers (0.1, 10, 1000) rather than powers of ten."""
    return f"{value:g}"


def _bars(ax: Axes, cases: Sequence[tuple[str, Mapping[str, float]]], colors: Mapping[str, Any]) -> None:
    """Horizontal bars of median time, one group per case; peers are annotated with peer / attnrs."""
    y, ticks, labels = 0.0, [], []
    every = [ms for _, rows in cases for ms in rows.values() if ms > 0] or [1.0]
    for case, rows in cases:
        names = sorted(rows, key=lambda n: n != "attnrs")
        start = y
        for name in names:
            ms = rows[name]
            ax.barh(y, ms, height=0.8, color=colors[name], edgecolor="white", linewidth=0.5)
            text = _format_ms(ms)
            if name != "attnrs" and "attnrs" in rows:
                text += f"  {ms / rows['attnrs']:.2f}x"
            ax.annotate(text, (ms, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7.5)
            y += 1
        ticks.append((start + y - 1) / 2)
        labels.append(case)
        y += 0.8  # a gap between cases
    ax.set_yticks(ticks, labels, fontsize=9)
    ax.set_ylim(y - 0.8 - 0.5, -0.7)  # top to bottom, as the table prints
    ax.tick_params(axis="y", length=0)
    low, high = min(every), max(every)
    if high / low > 20:
        from matplotlib.ticker import LogLocator

        ax.set_xscale("log")
        ax.set_xlim(low / 2, high * 6)  # room for the labels after the longest bar
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5) if high / low < 1e3 else (1,)))
    else:
        ax.set_xlim(0, high * 1.35)
    ax.xaxis.set_major_formatter(_plain)
    ax.set_xlabel("median time per call, ms (shorter is faster); peers: time / attnrs time")
    ax.grid(axis="x", which="major", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title("per case", fontsize=11)


def _scaling(
    ax: Axes, title: str, curves: Mapping[str, Sequence[tuple[int, float]]], colors: Mapping[str, Any]
) -> None:
    from matplotlib.ticker import LogLocator

    lengths: set[int] = set()
    if curves.get("attnrs"):  # a dotted L^2 slope through attnrs's shortest point, to read the others against
        first, last = min(curves["attnrs"]), max(curves["attnrs"])
        ax.plot(
            [first[0], last[0]],
            [first[1], first[1] * (last[0] / first[0]) ** 2],
            linestyle=":",
            color="0.45",
            linewidth=1.2,
        )
    for name in sorted(curves, key=lambda n: n != "attnrs"):
        points = sorted(curves[name])
        lengths.update(p[0] for p in points)
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o",
            markersize=4,
            color=colors[name],
            linewidth=2.2 if name == "attnrs" else 1.4,
            label=name,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted(lengths), [str(n) for n in sorted(lengths)])
    ax.minorticks_off()
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(_plain)
    ax.set_xlabel("sequence length (Q = K)")
    ax.set_ylabel("median time, ms")
    ax.grid(which="major", alpha=0.3)
    ax.set_title(title, fontsize=11)


def plot_bench(
    path: str | Path,
    cases: Sequence[tuple[str, Mapping[str, float]]],
    scaling: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    title: str,
) -> tuple[int, int]:
    """One figure of a ``bench`` run: per-case bars (``cases``: label -> implementation -> ms) and, for each mask in
    ``scaling`` with two lengths or more (mask -> implementation -> [(length, ms)]), a log-log panel of time
    against length. Returns the picture's (height, width) in pixels."""
    scaled = {mask: curves for mask, curves in scaling.items() if len({p[0] for c in curves.values() for p in c}) > 1}
    n_bars = sum(len(rows) for _, rows in cases)
    height = max(6.0, 0.2 * n_bars + 0.25 * len(cases) + 2.0)
    fig = new_figure(15.0 if scaled else 9.5, height)
    names = [n for _, rows in cases for n in rows] + [n for c in scaled.values() for n in c]
    colors = _colors(names)
    if scaled:
        grid = fig.add_gridspec(len(scaled), 2, width_ratios=[1.5, 1])
        _bars(fig.add_subplot(grid[:, 0]), cases, colors)
        for row, (mask, curves) in enumerate(scaled.items()):
            _scaling(fig.add_subplot(grid[row, 1]), f"scaling: {mask} (log-log)", curves, colors)
    else:
        _bars(fig.add_subplot(), cases, colors)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Patch | Line2D] = [Patch(color=colors[n], label=n) for n in colors]
    if scaled:
        handles.append(Line2D([], [], linestyle=":", color="0.45", label="∝ L² (scaling panels)"))
    legend_below(fig, handles, 8, 5)
    fig.suptitle(title, fontsize=11)
    return save(fig, path, title)
