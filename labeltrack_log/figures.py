"""Band figures: per-label mean line with a std or range band over steps.

Pure functions on the matplotlib object-oriented API (``matplotlib.figure.Figure`` with an Agg
canvas): no pyplot global state, safe to use from several threads (one figure per thread) and
headless. matplotlib is imported inside the functions, so ``import labeltrack_log`` stays light.

Layouts chosen by :func:`band_figure` / :class:`BandFigure`:

* up to ``max_panels`` labels: small multiples, one panel per label with shared axes, the mean
  line, a shaded band (mean ± std, or min..max), the mean over all labels as a dashed grey
  reference and the latest count;
* more labels: a heatmap of the mean (labels x steps, every label) above panels for the
  ``worst_k`` labels with the highest latest mean, marked on the heatmap's edge;
* a single step (or a step isolated between missing ones) is drawn as a point with an error bar;
  missing steps and labels that appear late leave gaps, never lines across them.

Ownership: :func:`band_figure` returns a new figure that belongs to the caller. A
:class:`BandFigure` owns the one figure it keeps updating; copy it out (``figure_to_png``)
before the next ``draw`` if you need the old picture.

Speed: positions are computed here (no tight/constrained layout), titles are placed without
matplotlib's automatic title-position pass, only the outer panels carry ticks (the others get
the same limits and grid lines as one collection), and a reused :class:`BandFigure` only updates
artist data. For inspection and tests, artists carry gids: axes ``"panel"``, ``"heatmap"``,
``"colorbar"``; in a panel ``"mean"``, ``"band"``, ``"points"``, ``"errorbars"``,
``"reference"``, ``"grid"``; in the heatmap the image ``"heatmap"`` and the worst-row marks ``"worst"``.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from .naming import figure_file, figure_name, label_text

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .history import DenseHistory, StatsHistory

__all__ = ["BandFigure", "band_figure", "render_files", "figure_to_png", "figure_to_rgb", "BOUNDS", "SORTS"]

#: Band kinds: mean ± std, or the min..max range around the mean.
BOUNDS = {"std": "mean ± std", "range": "min–max range", "quantile": "median with quantile bands", "ci": "95% CI of the mean"}
#: Panel/row orders: labels in natural order, or the worst latest mean first.
SORTS = ("natural", "worst")

# Okabe-Ito colour-blind-safe palette.
_BLUE, _SKY, _VERMILLION, _GREY = "#0072B2", "#56B4E9", "#D55E00", "#7F7F7F"
_TEXT = "#333333"

# Layout constants, in inches (positions are computed here: no layout engine on the hot path).
_LEFT, _RIGHT, _TOP, _BOTTOM = 0.62, 0.18, 0.92, 0.48
_WGAP, _HGAP = 0.12, 0.34
_HEAT_LEFT, _HEAT_H, _HEAT_GAP, _HEAT_TITLE, _CBAR_W = 1.45, 3.6, 0.78, 0.12, 0.14
_NAME_CHARS = 24


# ----------------------------------------------------------------------- encoding
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


# ------------------------------------------------------------------- data prep
def _quantile_levels(dense: "DenseHistory") -> tuple[float, float, float, float | None, float | None]:
    """(median, outer low, outer high, inner low, inner high) levels for the "quantile" bound."""
    levels = sorted(dense.quantiles)
    median = next((q for q in levels if abs(q - 0.5) < 1e-12), None)
    if median is None or len(levels) < 3:
        raise ValueError(
            f"bound 'quantile': expected a history with the median and levels around it, got levels {levels}; "
            "track them with GroupedStats/Tracker(quantiles=(0.1, 0.25, 0.5, 0.75, 0.9))"
        )
    inner = (levels[1], levels[-2]) if len(levels) >= 5 else (None, None)
    return median, levels[0], levels[-1], inner[0], inner[1]


def _center(dense: "DenseHistory", bound: str) -> np.ndarray:
    """The line drawn per label: the median for the "quantile" bound, else the mean."""
    return dense.quantiles[_quantile_levels(dense)[0]] if bound == "quantile" else dense.mean


def _bounds(dense: "DenseHistory", bound: str) -> tuple[np.ndarray, np.ndarray]:
    if bound == "quantile":
        _, lo, hi, _, _ = _quantile_levels(dense)
        return dense.quantiles[lo], dense.quantiles[hi]
    if bound == "ci":
        return dense.ci_low, dense.ci_high
    if bound == "std":
        return dense.mean - dense.std, dense.mean + dense.std
    return dense.min, dense.max


def _last_finite(matrix: np.ndarray) -> np.ndarray:
    """Per row, the last finite value (NaN for rows without any)."""
    finite = np.isfinite(matrix)
    if matrix.shape[1] == 0:
        return np.full(matrix.shape[0], np.nan)
    last = matrix.shape[1] - 1 - np.argmax(finite[:, ::-1], axis=1)
    out = matrix[np.arange(matrix.shape[0]), last]
    return np.where(finite.any(axis=1), out, np.nan)


def _worst_order(latest: np.ndarray, higher_is_worse: bool) -> np.ndarray:
    """Row order, worst first; rows without data last (stable)."""
    key = np.where(np.isfinite(latest), -latest if higher_is_worse else latest, np.inf)
    return np.argsort(key, kind="stable")


def _column_mean(matrix: np.ndarray) -> np.ndarray:
    """Mean of the finite values of each column (NaN for a column without any), warning-free."""
    finite = np.isfinite(matrix)
    total = np.where(finite, matrix, 0.0).sum(axis=0)
    count = finite.sum(axis=0)
    return np.divide(total, count, out=np.full(matrix.shape[1], np.nan), where=count > 0)


def _pool(blocks: np.ndarray, use_max: bool) -> np.ndarray:
    """Max (or min) over axis 1 of (rows, k, cols) blocks ignoring NaN; NaN where all are NaN."""
    fill = -np.inf if use_max else np.inf
    filled = np.where(np.isfinite(blocks), blocks, fill)
    out = filled.max(axis=1) if use_max else filled.min(axis=1)
    return np.where(np.isfinite(out), out, np.nan)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of the runs of True in a 1-D bool array."""
    if not mask.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _step_text(x: float, _pos: Any = None) -> str:
    """Compact step tick text for narrow panels: 800, 2k, 12.5k, 1.2M."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.0f}"


def _short(text: str, limit: int = _NAME_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _grid(n: int) -> tuple[int, int]:
    """(ncols, nrows) of a panel grid for ``n`` panels, wider than tall, few empty slots."""
    if n <= 1:
        return 1, 1
    ncols = min(n, math.ceil(math.sqrt(n * 1.6)))
    nrows = math.ceil(n / ncols)
    return math.ceil(n / nrows), nrows


def _limits(lo: np.ndarray, hi: np.ndarray, extra: np.ndarray) -> tuple[float, float]:
    values = np.concatenate([lo.ravel(), hi.ravel(), extra.ravel()])
    values = values[np.isfinite(values)]
    if not values.size:
        return 0.0, 1.0
    a, b = float(values.min()), float(values.max())
    pad = (b - a) * 0.06 if b > a else max(abs(a) * 0.1, 0.5)
    return a - pad, b + pad


# ------------------------------------------------------------------ renderer
class _Panel:
    """The artists of one small-multiple panel, created once and updated in place."""

    def __init__(self, ax: Any, *, x_ticks: bool, y_ticks: bool) -> None:
        from matplotlib.collections import LineCollection, PolyCollection

        self.ax = ax
        self.x_ticks, self.y_ticks = x_ticks, y_ticks
        # Grid lines as one collection: panels without tick labels then need no Tick objects.
        self.grid = LineCollection([], colors="#E6E6E6", linewidths=0.6, zorder=0.5, gid="grid")
        ax.add_collection(self.grid, autolim=False)
        (self.ref,) = ax.plot([], [], color=_GREY, lw=1.0, ls=(0, (3, 2)), zorder=1, gid="reference")
        self.band = PolyCollection([], facecolors=_SKY, edgecolors="none", alpha=0.45, zorder=2, gid="band")
        ax.add_collection(self.band, autolim=False)
        # the inner band of the "quantile" bound (p25-p75), darker, over the outer one
        self.inner = PolyCollection([], facecolors=_BLUE, edgecolors="none", alpha=0.35, zorder=2.5, gid="inner-band")
        ax.add_collection(self.inner, autolim=False)
        self.bars = LineCollection([], colors=_BLUE, linewidths=1.4, zorder=3, gid="errorbars")
        ax.add_collection(self.bars, autolim=False)
        (self.line,) = ax.plot([], [], color=_BLUE, lw=1.6, zorder=4, gid="mean")
        (self.dots,) = ax.plot([], [], color=_BLUE, ls="none", marker="o", ms=3.8, zorder=5, gid="points")
        # y=1.0 turns off matplotlib's automatic title placement (a costly tight-bbox pass).
        self.title = ax.set_title("", fontsize=9, loc="left", pad=3, color=_TEXT, y=1.0, parse_math=False)
        self.count = ax.set_title("", fontsize=7.5, loc="right", pad=3.5, color=_GREY, y=1.0)

    def update(self, x: np.ndarray, y: np.ndarray, lo: np.ndarray, hi: np.ndarray, ref: np.ndarray,
               title: str, count: str, inner: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        finite = np.isfinite(y)
        has_band = finite & np.isfinite(lo) & np.isfinite(hi)
        prev = np.concatenate(([False], finite[:-1]))
        nxt = np.concatenate((finite[1:], [False]))
        iso = finite & ~prev & ~nxt
        self.line.set_data(x, y)
        self.dots.set_data(x[iso], y[iso])
        self.ref.set_data(x, ref)
        polys = []
        for a, b in _runs(has_band):
            if b - a >= 2:
                xs = x[a:b]
                polys.append(np.column_stack((np.concatenate((xs, xs[::-1])), np.concatenate((hi[a:b], lo[a:b][::-1])))))
        self.band.set_verts(polys)
        inner_polys = []
        if inner is not None:
            ilo, ihi = inner
            for a, b in _runs(finite & np.isfinite(ilo) & np.isfinite(ihi)):
                if b - a >= 2:
                    xs = x[a:b]
                    inner_polys.append(np.column_stack((np.concatenate((xs, xs[::-1])), np.concatenate((ihi[a:b], ilo[a:b][::-1])))))
        self.inner.set_verts(inner_polys)
        single = iso & has_band
        self.bars.set_segments([((xi, l), (xi, h)) for xi, l, h in zip(x[single], lo[single], hi[single])])
        self.title.set_text(title)
        self.count.set_text(count)


class _Heatmap:
    """The mean of every label over steps as an image, with a colorbar and worst-row marks."""

    def __init__(self, fig: "Figure", rect: tuple[float, float, float, float], cbar_rect: tuple[float, float, float, float],
                 below_xy: tuple[float, float]) -> None:
        import matplotlib
        from matplotlib.transforms import blended_transform_factory

        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#D9D9D9")
        self.ax = ax = fig.add_axes(rect, gid="heatmap")
        self.image = ax.imshow(np.zeros((1, 1)), aspect="auto", interpolation="nearest", cmap=cmap, gid="heatmap")
        ax.tick_params(labelsize=7, length=2, pad=1.5, colors=_TEXT)
        self.title = ax.set_title("", fontsize=9, loc="left", pad=4, color=_TEXT, y=1.0)
        (self.marks,) = ax.plot([], [], ls="none", marker="<", ms=5, color=_VERMILLION, clip_on=False, zorder=5,
                                gid="worst", transform=blended_transform_factory(ax.transAxes, ax.transData))
        self.cbar = fig.colorbar(self.image, cax=fig.add_axes(cbar_rect, gid="colorbar"))
        self.cbar.ax.tick_params(labelsize=7, length=2, pad=1.5, colors=_TEXT)
        self.below = fig.text(*below_xy, "", fontsize=9, color=_TEXT, va="bottom")
        self.log = False

    def update(self, dense: "DenseHistory", order: np.ndarray, worst: np.ndarray, texts: list[str], *,
               rows_px: float, higher_is_worse: bool, sort: str, center: np.ndarray | None = None,
               what_stat: str = "mean") -> None:
        center = dense.mean if center is None else center
        n, m = center.shape
        data = center[order]
        # More labels than pixel rows: pool blocks of k rows (keeping the worst value) so that no
        # label silently disappears between pixels; the extent still spans every label row.
        k = max(1, math.ceil(n / rows_px))
        if k > 1:
            padded = np.full((math.ceil(n / k) * k, m), np.nan)
            padded[:n] = data
            data = _pool(padded.reshape(-1, k, m), higher_is_worse)
        self.image.set_data(np.ma.masked_invalid(data))
        self.image.set_extent((-0.5, m - 0.5, n - 0.5, -0.5))
        self._color_scale(data)
        self.ax.set_xlim(-0.5, m - 0.5)
        self.ax.set_ylim(n - 0.5, -0.5)
        positions, values = _step_ticks(dense.steps, 7)
        self.ax.set_xticks(positions, [f"{int(v):,}" for v in values])
        rows = _nice_ticks(n, int(self.ax.bbox.height / 15))
        self.ax.set_yticks(rows, [_short(texts[order[r]], 18) for r in rows])
        for tick in self.ax.get_yticklabels():
            tick.set_parse_math(False)  # label names are data: "$x$" stays "$x$"
        position = np.empty(n, dtype=np.int64)
        position[order] = np.arange(n)
        self.marks.set_data(np.full(len(worst), 1.012), position[worst])
        what = f"worst latest {what_stat} first" if sort == "worst" else "natural label order"
        pooled = f"; each row shows the {'max' if higher_is_worse else 'min'} of {k} labels" if k > 1 else ""
        self.title.set_text(f"{what_stat.capitalize()} per label ({what}{pooled}); grey = no data; \u25c0 = the {len(worst)} panels below")
        self.cbar.set_label(f"{what_stat} {dense.name}{self._scale_note}", fontsize=8, color=_TEXT)
        self.below.set_text(f"The {len(worst)} labels with the {'highest' if higher_is_worse else 'lowest'} latest {what_stat}")

    def _color_scale(self, data: np.ndarray) -> None:
        vmin, vmax, log, clipped = _color_scale(data)
        if log != self.log:
            from matplotlib.colors import LogNorm, Normalize

            self.image.set_norm(LogNorm(vmin, vmax) if log else Normalize(vmin, vmax))
            self.log = log
        self.image.set_clim(vmin, vmax)
        if log:
            from matplotlib.ticker import LogLocator, StrMethodFormatter

            self.cbar.locator = LogLocator(subs=(1.0, 2.0, 5.0))
            self.cbar.formatter = StrMethodFormatter("{x:g}")
            self.cbar.minorticks_off()
        notes = (["1st-99th pct"] if clipped else []) + (["log scale"] if log else [])
        self._scale_note = f" ({', '.join(notes)})" if notes else ""


class BandFigure:
    """A band-figure renderer that keeps its Figure and axes and updates them on every draw.

    Use one per (name, mode) in a training loop: the first :meth:`draw` builds the layout, later
    calls with more steps only update line data, bands, titles and limits (the layout is rebuilt
    only when the number of panels changes). The figure it returns is the same object every
    time and belongs to this renderer.

    Args:
        bound: ``"std"`` (mean ± std) or ``"range"`` (min..max around the mean).
        label_names: label value -> display name; default: the history's ``label_names``.
        sort: ``"natural"`` (label order) or ``"worst"`` (worst latest mean first: each label is
            ranked by its last finite mean, so a label absent at the last step keeps its rank).
        max_panels: most labels drawn as small multiples; above it a heatmap of every label is
            drawn with panels for the ``worst_k`` worst labels.
        worst_k: panels shown under the heatmap.
        higher_is_worse: whether a high mean is bad (loss); False for accuracy-like metrics.
        width: figure width in inches (the height follows the layout).
        dpi: dots per inch of the canvas (and of ``figure_to_png``).

    Example:
        >>> from labeltrack_log import GroupedStats, StatsHistory
        >>> h = StatsHistory()
        >>> g = GroupedStats()
        >>> g.update([0, 0, 1, 1], [0.1, 0.3, 0.9, 1.1])
        >>> h.append(g.compute(), step=1, name="loss", mode="train")
        >>> fig = BandFigure().draw(h)
        >>> len(fig.axes)
        2
    """

    def __init__(
        self,
        *,
        bound: str = "std",
        label_names: Mapping[Any, str] | None = None,
        sort: str = "natural",
        max_panels: int = 25,
        worst_k: int = 10,
        higher_is_worse: bool = True,
        width: float = 10.0,
        dpi: float = 100.0,
    ) -> None:
        if bound not in BOUNDS:
            raise ValueError(f"bound: expected one of {list(BOUNDS)}, got {bound!r}")
        if sort not in SORTS:
            raise ValueError(f"sort: expected one of {list(SORTS)}, got {sort!r}")
        for what, value in (("max_panels", max_panels), ("worst_k", worst_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{what}: expected a positive int, got {value!r}")
        if not (isinstance(width, (int, float)) and 3 <= width <= 40):
            raise ValueError(f"width: expected inches between 3 and 40, got {width!r}")
        if not (isinstance(dpi, (int, float)) and 20 <= dpi <= 600):
            raise ValueError(f"dpi: expected a number between 20 and 600, got {dpi!r}")
        self.bound = bound
        self.label_names = dict(label_names) if label_names is not None else None
        self.sort = sort
        self.max_panels = max_panels
        self.worst_k = min(worst_k, max_panels)
        self.higher_is_worse = higher_is_worse
        self.width = float(width)
        self.dpi = float(dpi)
        self._fig: Figure | None = None
        self._signature: tuple | None = None
        self._panels: list[_Panel] = []
        self._heat: _Heatmap | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the settings only: the figure is rebuilt by the next :meth:`draw`."""
        state = self.__dict__.copy()
        state.update(_fig=None, _signature=None, _panels=[], _heat=None)
        for key in ("_header", "_info", "_ylabel"):
            state.pop(key, None)
        return state

    @property
    def figure(self) -> "Figure | None":
        """The figure drawn by the last :meth:`draw` (None before the first)."""
        return self._fig

    # ------------------------------------------------------------------ draw
    def draw(self, history: "StatsHistory", *, name: str | None = None, mode: str | None = None) -> "Figure":
        """Draw the series ``(name, mode)`` of ``history`` and return the (reused) figure.

        Raises:
            ValueError: ``name``/``mode`` unknown, or omitted while the history holds several.
        """
        dense = history.dense(name, mode)
        names = self.label_names if self.label_names is not None else history.label_names
        return self.draw_dense(dense, label_names=names)

    def draw_dense(self, dense: "DenseHistory", *, label_names: Mapping[Any, str] | None = None) -> "Figure":
        """Draw a :class:`~labeltrack_log.history.DenseHistory` (see :meth:`draw`)."""
        n = len(dense.labels)
        heatmap = n > self.max_panels
        shown = min(n, self.worst_k) if heatmap else max(n, 1)
        self._key_levels = _quantile_levels(dense) if self.bound == "quantile" else None
        signature = ("heatmap" if heatmap else "panels", shown, self._key_levels)
        if self._fig is None or signature != self._signature:
            self._build(heatmap, shown)
            self._signature = signature
        lo, hi = _bounds(dense, self.bound)
        center = _center(dense, self.bound)
        inner = None
        if self.bound == "quantile":
            _, _, _, ilo, ihi = _quantile_levels(dense)
            inner = (dense.quantiles[ilo], dense.quantiles[ihi]) if ilo is not None else None
        latest = _last_finite(center)
        worst = _worst_order(latest, self.higher_is_worse)
        order = worst if self.sort == "worst" else np.arange(n)
        texts = [label_text(lab, label_names) for lab in dense.labels.tolist()]
        x = dense.steps.astype(np.float64)
        ref = _column_mean(center)
        rows = worst[:shown] if heatmap else order[:shown]
        for slot, panel in enumerate(self._panels):
            if slot >= len(rows):
                panel.update(x, np.full(len(x), np.nan), x * np.nan, x * np.nan, ref, "(no labels)", "")
                continue
            r = rows[slot]
            title = _short(texts[r])
            if heatmap:
                title = f"{slot + 1}. {title}"
            panel.update(x, center[r], lo[r], hi[r], ref, title, self._count_text(dense, r, center),
                         None if inner is None else (inner[0][r], inner[1][r]))
        self._set_limits(x, lo[rows], hi[rows], ref)
        if self._heat is not None:
            self._heat.update(dense, order, worst[:shown], texts, rows_px=_HEAT_H * self.dpi,
                              higher_is_worse=self.higher_is_worse, sort=self.sort, center=center,
                              what_stat="median" if self.bound == "quantile" else "mean")
        self._update_header(dense, n)
        return self._fig

    @staticmethod
    def _count_text(dense: "DenseHistory", r: int, center: np.ndarray | None = None) -> str:
        if not len(dense.steps):
            return ""
        count, bad, mean = dense.count[r, -1], dense.nonfinite[r, -1], (dense.mean if center is None else center)[r, -1]
        if not np.isfinite(count):
            return "absent at last step"
        text = f"last {mean:.3g} · n={int(count):,}" if np.isfinite(mean) else f"n={int(count):,}"
        return text + (f" · {int(bad):,} non-finite" if bad else "")

    def _set_limits(self, x: np.ndarray, lo: np.ndarray, hi: np.ndarray, ref: np.ndarray) -> None:
        """One x and y scale for every panel, ticks on the outer panels, grid lines on all."""
        from matplotlib.ticker import MaxNLocator

        if len(x) == 0:
            xlim = (0.0, 1.0)
        elif x[0] == x[-1]:
            xlim = (x[0] - 1, x[-1] + 1)
        else:
            pad = (x[-1] - x[0]) * 0.03
            xlim = (x[0] - pad, x[-1] + pad)
        ylim = _limits(lo, hi, ref)
        if len(x) and x[0] == x[-1]:
            xt = x[:1]  # a single step: tick only that step
        else:
            xt = MaxNLocator(nbins=4, integer=True, min_n_ticks=1).tick_values(*xlim)
        yt = MaxNLocator(nbins=4).tick_values(*ylim)
        xt = xt[(xt >= xlim[0]) & (xt <= xlim[1])]
        yt = yt[(yt >= ylim[0]) & (yt <= ylim[1])]
        grid = [((v, ylim[0]), (v, ylim[1])) for v in xt] + [((xlim[0], v), (xlim[1], v)) for v in yt]
        for panel in self._panels:
            panel.ax.set_xlim(xlim)
            panel.ax.set_ylim(ylim)
            panel.grid.set_segments(grid)
            if panel.x_ticks:
                panel.ax.set_xticks(xt)
            if panel.y_ticks:
                panel.ax.set_yticks(yt)

    def _update_header(self, dense: "DenseHistory", n: int) -> None:
        last = f"step {int(dense.steps[-1]):,}" if len(dense.steps) else "no steps"
        self._header.set_text(f"{dense.name} · {dense.mode} — per-label {BOUNDS[self.bound]}")
        m = len(dense.steps)
        self._info.set_text(f"{n:,} label{'s' if n != 1 else ''} · {m} step{'s' if m != 1 else ''} · {last}")
        self._ylabel.set_text(dense.name)

    # ---------------------------------------------------------------- layout
    def _build(self, heatmap: bool, shown: int) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
        from matplotlib.ticker import FuncFormatter, NullLocator

        ncols, nrows = _grid(shown) if not heatmap else (min(shown, 5), math.ceil(shown / 5))
        W = self.width
        panel_w = (W - _LEFT - _RIGHT - (ncols - 1) * _WGAP) / ncols
        panel_h = float(np.clip(panel_w / 1.7, 1.25, 2.6))
        grid_h = nrows * panel_h + (nrows - 1) * _HGAP
        top_extra = _HEAT_H + _HEAT_GAP + _HEAT_TITLE if heatmap else 0.0
        H = _TOP + top_extra + grid_h + _BOTTOM
        fig = Figure(figsize=(W, H), dpi=self.dpi, facecolor="white")
        FigureCanvasAgg(fig)
        self._panels = []
        y0 = _BOTTOM + grid_h  # top edge of the grid, inches from the bottom
        for i in range(shown):
            row, col = divmod(i, ncols)
            left = _LEFT + col * (panel_w + _WGAP)
            bottom = y0 - (row + 1) * panel_h - row * _HGAP
            # Axes are not "shared" in matplotlib's sense (shared axes create ticks everywhere);
            # _set_limits gives all panels the same limits and ticks the outer ones only.
            ax = fig.add_axes((left / W, bottom / H, panel_w / W, panel_h / H), gid="panel")
            x_ticks, y_ticks = i + ncols >= shown, col == 0
            if x_ticks:
                ax.xaxis.set_major_formatter(FuncFormatter(_step_text))
            else:
                ax.xaxis.set_major_locator(NullLocator())
            if not y_ticks:
                ax.yaxis.set_major_locator(NullLocator())
            ax.tick_params(labelsize=7.5, length=2.5, pad=1.5, colors=_TEXT)
            for side in ("top", "right"):
                ax.spines[side].set_visible(False)
            self._panels.append(_Panel(ax, x_ticks=x_ticks, y_ticks=y_ticks))
        # Header: title, summary line and a three-entry key (never a per-label legend).
        self._header = fig.text(_LEFT / W, 1 - 0.22 / H, "", fontsize=11.5, weight="bold", color=_TEXT, va="top",
                                parse_math=False)
        self._info = fig.text(_LEFT / W, 1 - 0.50 / H, "", fontsize=8.5, color=_TEXT, va="top")
        handles = [
            Line2D([], [], color=_BLUE, lw=1.6, marker="o", ms=3, label="label mean"),
            Patch(facecolor=_SKY, alpha=0.45, label=BOUNDS[self.bound]),
            Line2D([], [], color=_GREY, lw=1.0, ls=(0, (3, 2)), label="mean over labels"),
        ]
        levels = getattr(self, "_key_levels", None)
        if self.bound == "quantile" and levels is not None:
            from .naming import quantile_stat

            _, lo, hi, ilo, ihi = levels
            handles = [
                Line2D([], [], color=_BLUE, lw=1.6, marker="o", ms=3, label="label median"),
                *([Patch(facecolor=_BLUE, alpha=0.35, label=f"{quantile_stat(ilo)}–{quantile_stat(ihi)}")] if ilo is not None else []),
                Patch(facecolor=_SKY, alpha=0.45, label=f"{quantile_stat(lo)}–{quantile_stat(hi)}"),
                Line2D([], [], color=_GREY, lw=1.0, ls=(0, (3, 2)), label="mean of medians"),
            ]
        key_y = 0.38 if len(handles) > 3 else 0.12  # a four-entry key goes on the summary line, clear of the title
        fig.legend(handles=handles, loc="upper right", bbox_to_anchor=(1 - _RIGHT / W, 1 - key_y / H), ncol=len(handles),
                   frameon=False, fontsize=8, handlelength=1.8, columnspacing=1.2)
        fig.text((_LEFT + (W - _LEFT - _RIGHT) / 2) / W, 0.06 / H, "step", ha="center", va="bottom", fontsize=8, color=_TEXT)
        self._ylabel = fig.text(0.08 / W, (_BOTTOM + grid_h / 2) / H, "", rotation=90, ha="left", va="center",
                                fontsize=8, color=_TEXT, parse_math=False)
        self._heat = None
        if heatmap:
            bottom = y0 + _HEAT_GAP
            width = W - _HEAT_LEFT - _RIGHT - 0.95
            self._heat = _Heatmap(
                fig,
                (_HEAT_LEFT / W, bottom / H, width / W, _HEAT_H / H),
                ((_HEAT_LEFT + width + 0.5) / W, bottom / H, _CBAR_W / W, _HEAT_H / H),
                (_LEFT / W, (bottom - 0.5) / H),
            )
        self._fig = fig


def _color_scale(data: np.ndarray) -> tuple[float, float, bool, bool]:
    """(vmin, vmax, log, clipped) of a heatmap: 1st-99th percentile when there are many cells
    (a few extreme cells must not flatten the rest), log scale for positive data spanning more
    than a decade (losses fall by orders of magnitude)."""
    finite = data[np.isfinite(data)]
    if not finite.size:
        return 0.0, 1.0, False, False
    clipped = finite.size > 200
    lo, hi = (np.percentile(finite, [1, 99]) if clipped else (finite.min(), finite.max()))
    lo, hi = float(lo), float(hi)
    log = lo > 0 and hi / lo > 10
    if hi <= lo:
        hi = lo + (abs(lo) * 1e-6 or 1e-6)
    return lo, hi, log, clipped


def _step_ticks(steps: np.ndarray, most: int) -> tuple[np.ndarray, np.ndarray]:
    """Column positions and values of round step ticks for a heatmap whose columns are steps."""
    from matplotlib.ticker import MaxNLocator

    first, last = float(steps[0]), float(steps[-1])
    if last <= first:
        return np.zeros(1), steps[:1]
    values = MaxNLocator(nbins=most, integer=True, min_n_ticks=2).tick_values(first, last)
    values = values[(values >= first) & (values <= last)]
    if not values.size:
        values = np.array([first, last])
    return np.interp(values, steps.astype(np.float64), np.arange(len(steps), dtype=np.float64)), values


def _nice_ticks(n: int, most: int) -> np.ndarray:
    """Tick positions 0, s, 2s, ... below ``n`` with s a 1-2-5 number, at most ``most`` + 1 ticks."""
    if n <= 1:
        return np.zeros(1, dtype=np.int64)
    raw = max(1.0, (n - 1) / max(most, 1))
    base = 10 ** math.floor(math.log10(raw))
    step = next(f * base for f in (1, 2, 5, 10) if f * base >= raw)
    return np.arange(0, n, int(step), dtype=np.int64)


# --------------------------------------------------------------- public funcs
def band_figure(
    history: "StatsHistory",
    *,
    name: str | None = None,
    mode: str | None = None,
    bound: str = "std",
    label_names: Mapping[Any, str] | None = None,
    sort: str = "natural",
    max_panels: int = 25,
    worst_k: int = 10,
    higher_is_worse: bool = True,
    width: float = 10.0,
    dpi: float = 100.0,
) -> "Figure":
    """Draw the per-label band figure of one (name, mode) series of ``history``.

    ``name``/``mode`` may be omitted when the history holds only one. Returns a new
    ``matplotlib.figure.Figure`` (Agg canvas, no pyplot) owned by the caller. See
    :class:`BandFigure` for the arguments and the layouts; reuse a ``BandFigure`` when drawing the
    same series again and again (it is several times cheaper than a fresh figure).

    Raises:
        ValueError: bad ``bound``/``sort``/sizes, or an unknown or ambiguous ``name``/``mode``.

    Example:
        >>> from labeltrack_log import GroupedStats, StatsHistory
        >>> h = StatsHistory()
        >>> g = GroupedStats()
        >>> for step in range(1, 4):
        ...     g.update([0, 1, 1], [1.0 / step, 2.0, 2.5])
        ...     h.append(g.compute(), step=step, name="loss", mode="eval")
        ...     g.reset()
        >>> fig = band_figure(h, bound="range", label_names={0: "cat", 1: "dog"})
        >>> [ax.get_title(loc="left") for ax in fig.axes]
        ['cat', 'dog']
    """
    renderer = BandFigure(
        bound=bound, label_names=label_names, sort=sort, max_panels=max_panels, worst_k=worst_k,
        higher_is_worse=higher_is_worse, width=width, dpi=dpi,
    )
    return renderer.draw(history, name=name, mode=mode)


def render_files(
    path: str | Path,
    output_dir: str | Path,
    bound: str = "std",
    name: str | None = None,
    mode: str | None = None,
) -> list[Path]:
    """Re-render band figures from a CSVSink/JSONLSink file: one PNG per (name, mode).

    Files are named like :class:`~labeltrack_log.sinks.files.ImageDirSink` names the figure of the
    last step, ``<name>_<bound>_band_<mode>_step_<step>.png`` (built by
    :func:`~labeltrack_log.naming.figure_name` and :func:`~labeltrack_log.naming.figure_file`), inside
    ``output_dir``, which is created if needed. ``name``/``mode`` restrict the output;
    None means every name/mode in the file.

    Returns:
        The written paths.

    Raises:
        ValueError: bad ``bound``, a file without rows, or an unknown name/mode (listing the choices).
        FileNotFoundError: ``path`` does not exist.
    """
    from .history import StatsHistory

    if bound not in BOUNDS:
        raise ValueError(f"bound: expected one of {list(BOUNDS)}, got {bound!r}")
    history = StatsHistory.from_file(path)
    if not len(history):
        raise ValueError(f"{path}: expected rows written by CSVSink or JSONLSink, got none")
    modes = history.modes(name)  # raises for an unknown name, listing the names
    if mode is not None and mode not in modes:
        raise ValueError(f"mode: expected one of {modes}, got {mode!r}")
    pairs = [(n, m) for n, m in history if (name is None or n == name) and (mode is None or m == mode)]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for n, m in pairs:
        fig = band_figure(history, name=n, mode=m, bound=bound)
        target = out / figure_file(figure_name(n, bound), m, history.steps(n, m)[-1])
        target.write_bytes(figure_to_png(fig))
        written.append(target)
    return written
