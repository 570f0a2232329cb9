"""Band figures: per-label mean line with a std or range band over steps.

Pure functions on the matplotlib object-oriented API (``matplotlib.figure.Figure`` with an Agg
canvas): no pyplot global state, safe in threads and headless. The caller owns returned figures.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["figure_to_png", "figure_to_rgb"]


def figure_to_png(figure: "Figure", dpi: float | None = None) -> bytes:
    """Render ``figure`` to PNG bytes."""
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=dpi if dpi is not None else figure.dpi)
    return buf.getvalue()


def figure_to_rgb(figure: "Figure") -> np.ndarray:
    """Render ``figure`` to an RGB ``uint8`` array of shape (height, width, 3)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
