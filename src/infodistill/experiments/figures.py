"""The experiments' figure set-up: a matplotlib figure on its own Agg canvas, saved atomically as a PNG.

The figures are not registered with pyplot, so none stays open and the process's matplotlib backend is not
touched. matplotlib is imported when the first figure is made, not when an experiment module is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from infodistill.files import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100


def new_figure(width: float, height: float) -> Figure:
    """A ``width`` x ``height`` inch figure (100 dpi, constrained layout) drawn on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: Path) -> None:
    """Write ``figure`` to ``path`` as a PNG (atomically: a reader never sees half a file), then clear it."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    figure.clear()
