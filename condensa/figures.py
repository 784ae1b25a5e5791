"""Figures drawn straight to files, without pyplot.

matplotlib's `Figure` renders through its own Agg canvas when saved, so the library never switches
the global backend (`matplotlib.use("Agg")` inside a notebook stopped its own inline figures
from showing after a training run) and never keeps figures alive in pyplot's registry.
"""

from __future__ import annotations

from pathlib import Path


def new_figure(rows: int = 1, cols: int = 1, *, figsize: tuple[float, float], squeeze: bool = True):
    """A figure and its axes, as `plt.subplots` returns them, with no pyplot state."""
    from matplotlib.figure import Figure  # lazy: importing matplotlib costs about a second

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=squeeze)


def save_figure(fig, path: str | Path, *, tight: bool = True) -> Path:
    """Writes the figure (PNG at 110 dpi), making the folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight" if tight else None)
    return path
