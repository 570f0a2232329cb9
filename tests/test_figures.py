"""Band figures: layouts, what the artists hold, reuse, PNG output, render_files and the CLI."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labeltrack_log import StatsHistory
from labeltrack_log.figures import BandFigure, band_figure, figure_to_png, figure_to_rgb, render_files
from labeltrack_log.history import FILE_COLUMNS

from tables import table  # noqa: E402  (tests/ is on sys.path, see conftest.py)


# ----------------------------------------------------------------- helpers


def history_from(means: np.ndarray, steps=None, name="ce", mode="eval", std=None) -> StatsHistory:
    """A history whose dense mean equals ``means`` (labels x steps, NaN = label absent)."""
    h = StatsHistory()
    n, m = means.shape
    steps = list(range(1, m + 1)) if steps is None else steps
    for j, step in enumerate(steps):
        present = ~np.isnan(means[:, j])
        labels = np.arange(n)[present]
        s = None if std is None else std[present, j]
        h.append(table(labels, means[present, j], std=s), step=step, name=name, mode=mode)
    return h


def panels(fig):
    return [ax for ax in fig.axes if ax.get_gid() == "panel"]


def artist(ax, gid):
    found = [a for a in ax.get_children() if a.get_gid() == gid]
    assert len(found) == 1, f"expected one artist with gid {gid!r}, got {len(found)}"
    return found[0]


def band_ys(ax):
    """(upper, lower) y values of each band polygon, in x order."""
    out = []
    for path in artist(ax, "band").get_paths():
        v = path.vertices
        k = len(v) // 2
        out.append((v[:k, 0], v[:k, 1], v[k:2 * k, 1][::-1]))
    return out


def titles(fig):
    return [ax.get_title(loc="left") for ax in panels(fig)]


def decode(png: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(png))
    img.load()
    return img


# ----------------------------------------------------------------- layouts
def test_few_labels_one_panel_each_with_mean_line_band_and_count():
    means = np.array([[1.0, 0.8, 0.6, 0.5], [2.0, 1.9, 1.7, 1.6], [0.5, 0.4, 0.35, 0.3]])
    std = np.array([[0.1, 0.2, 0.1, 0.05], [0.3, 0.3, 0.2, 0.2], [0.0, 0.1, 0.1, 0.1]])
    fig = band_figure(history_from(means, steps=[10, 20, 30, 40], std=std))
    axes = panels(fig)
    assert len(fig.axes) == len(axes) == 3  # no heatmap, no colorbar
    assert titles(fig) == ["0", "1", "2"]
    for i, ax in enumerate(axes):
        line = artist(ax, "mean")
        np.testing.assert_array_equal(line.get_xdata(), [10, 20, 30, 40])
        np.testing.assert_array_equal(line.get_ydata(), means[i])
        ((x, upper, lower),) = band_ys(ax)
        np.testing.assert_allclose(upper, means[i] + std[i])
        np.testing.assert_allclose(lower, means[i] - std[i])
        assert ax.get_title(loc="right") == f"last {means[i, -1]:.3g} · n=10"
        np.testing.assert_allclose(artist(ax, "reference").get_ydata(), means.mean(axis=0))
    # shared axes: one scale for every panel, covering every band
    ylims = {ax.get_ylim() for ax in axes}
    assert len(ylims) == 1
    lo, hi = ylims.pop()
    assert lo <= (means - std).min() and hi >= (means + std).max()
    assert {ax.get_xlim() for ax in axes} == {axes[0].get_xlim()}
    # ticks on the outer panels only; grid lines at the same tick positions in every panel
    assert len(axes[0].get_yticks()) >= 2 and len(axes[1].get_yticks()) == len(axes[2].get_yticks()) == 0
    for ax in axes:
        segments = artist(ax, "grid").get_segments()
        assert sorted(s[0][1] for s in segments if s[0][1] == s[1][1]) == sorted(axes[0].get_yticks().tolist())
    # header and a three-entry key, never a per-label legend
    assert len(fig.legends) == 1 and len(fig.legends[0].get_texts()) == 3
    assert any("ce · eval — per-label mean ± std" == t.get_text() for t in fig.texts)


def test_range_bound_uses_min_and_max():
    means = np.array([[1.0, 0.5, 0.25]])
    h = history_from(means)
    fig = band_figure(h, bound="range")
    ((_, upper, lower),) = band_ys(panels(fig)[0])
    d = h.dense()
    np.testing.assert_allclose(upper, d.max[0])
    np.testing.assert_allclose(lower, d.min[0])
    np.testing.assert_allclose(upper - means[0], 0.2)  # table(): max = mean + 2 std, not mean + std
    assert fig.legends[0].get_texts()[1].get_text() == "min–max range"


def test_many_labels_heatmap_of_all_plus_worst_k_panels():
    rng = np.random.default_rng(0)
    means = rng.uniform(0.1, 1.0, (40, 6))
    means[[7, 33, 21], :] += [[3.0], [2.0], [1.0]]  # three hard labels
    fig = band_figure(history_from(means), worst_k=4)
    gids = sorted(ax.get_gid() for ax in fig.axes)
    assert gids == ["colorbar", "heatmap", "panel", "panel", "panel", "panel"]
    heat = next(ax for ax in fig.axes if ax.get_gid() == "heatmap")
    image = artist(heat, "heatmap")
    np.testing.assert_array_equal(np.ma.getdata(image.get_array()), means)  # every label, natural order
    order = np.argsort(-means[:, -1])
    assert titles(fig) == [f"{k + 1}. {lab}" for k, lab in enumerate(order[:4])]
    assert titles(fig)[:3] == ["1. 7", "2. 33", "3. 21"]
    for ax, lab in zip(panels(fig), order[:4]):
        np.testing.assert_array_equal(artist(ax, "mean").get_ydata(), means[lab])
    marks = artist(heat, "worst")
    assert sorted(marks.get_ydata().tolist()) == sorted(order[:4].tolist())  # rows marked on the heatmap
    assert len(fig.legends) == 1 and len(fig.legends[0].get_texts()) == 3


def test_threshold_switches_layout():
    means = np.tile(np.linspace(1, 0.5, 5), (25, 1))
    assert len(panels(band_figure(history_from(means)))) == 25
    fig = band_figure(history_from(np.vstack([means, means[:1]])))
    assert len(panels(fig)) == 10 and any(ax.get_gid() == "heatmap" for ax in fig.axes)
    assert len(panels(band_figure(history_from(means), max_panels=5, worst_k=3))) == 3


def test_more_labels_than_pixel_rows_pools_rows_keeping_the_worst():
    rng = np.random.default_rng(1)
    means = rng.uniform(0.0, 1.0, (1000, 3))
    means[501, 2] = 9.0
    fig = band_figure(history_from(means), dpi=100)
    heat = next(ax for ax in fig.axes if ax.get_gid() == "heatmap")
    data = np.ma.getdata(artist(heat, "heatmap").get_array())
    k = int(np.ceil(1000 / data.shape[0]))
    assert k > 1 and data.shape == (int(np.ceil(1000 / k)), 3)
    np.testing.assert_array_equal(data[0], means[:k].max(axis=0))
    assert data[501 // k, 2] == 9.0  # an outlier label is never lost between pixels
    assert titles(fig)[0] == "1. 501"


def test_single_step_draws_points_with_error_bars():
    h = StatsHistory()
    h.append(table(["cat", "dog"], [0.5, 1.5], std=[0.2, 0.4]), step=7, name="ce", mode="eval")
    fig = band_figure(h)
    assert titles(fig) == ["cat", "dog"]
    for ax, mean, std in zip(panels(fig), [0.5, 1.5], [0.2, 0.4]):
        dots = artist(ax, "points")
        assert dots.get_xdata().tolist() == [7] and dots.get_ydata().tolist() == [mean]
        (segment,) = artist(ax, "errorbars").get_segments()
        np.testing.assert_allclose(segment, [[7, mean - std], [7, mean + std]])
        assert band_ys(ax) == []  # no band polygon for a single point
        lo, hi = ax.get_xlim()
        assert lo < 7 < hi
    assert panels(fig)[0].get_xticks().tolist() == [7]  # no ticks at steps that do not exist


def test_nan_steps_leave_gaps_not_lines():
    nan = np.nan
    means = np.array([[1.0, 0.9, nan, nan, 0.6, nan, 0.4, 0.3], [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]])
    h = StatsHistory()
    for j in range(means.shape[1]):
        count = [0 if np.isnan(means[0, j]) else 10, 10]  # label 0 present with only non-finite values
        h.append(table([0, 1], means[:, j], count=count, nonfinite=[3 if count[0] == 0 else 0, 0]),
                 step=j + 1, name="ce", mode="eval")
    ax = panels(band_figure(h))[0]
    y = artist(ax, "mean").get_ydata()
    assert np.isnan(y[[2, 3, 5]]).all()  # matplotlib breaks a line at NaN
    runs = [x.tolist() for x, _, _ in band_ys(ax)]
    assert runs == [[1, 2], [7, 8]]  # bands only over runs of real data
    assert artist(ax, "points").get_xdata().tolist() == [5]  # isolated step: a point with an error bar
    assert len(artist(ax, "errorbars").get_segments()) == 1
    h.append(table([0, 1], [nan, 0.2], count=[0, 10], nonfinite=[4, 0]), step=9, name="ce", mode="eval")
    ax = panels(band_figure(h))[0]
    assert ax.get_title(loc="right") == "n=0 · 4 non-finite"


def test_label_appearing_late():
    nan = np.nan
    means = np.array([[1.0, 0.8, 0.6, 0.5], [nan, nan, 2.0, 1.5]])
    fig = band_figure(history_from(means, steps=[100, 200, 300, 400]))
    late = panels(fig)[1]
    y = artist(late, "mean").get_ydata()
    assert np.isnan(y[:2]).all() and y[2:].tolist() == [2.0, 1.5]
    ((x, _, _),) = band_ys(late)
    assert x.tolist() == [300, 400]
    # the reference is the mean over the labels with data at each step
    np.testing.assert_allclose(artist(late, "reference").get_ydata(), [1.0, 0.8, 1.3, 1.0])
    # a label absent at the last step says so
    means2 = np.array([[1.0, 0.8], [0.5, nan]])
    assert panels(band_figure(history_from(means2)))[1].get_title(loc="right") == "absent at last step"
    # in the heatmap a late label's missing cells are masked (drawn grey)
    wide = np.vstack([np.tile([1.0, 0.9, 0.8], (30, 1)), [[nan, nan, 3.0]]])
    fig = band_figure(history_from(wide))
    heat = next(ax for ax in fig.axes if ax.get_gid() == "heatmap")
    arr = artist(heat, "heatmap").get_array()
    assert arr.mask[30].tolist() == [True, True, False] and not arr.mask[:30].any()
    assert titles(fig)[0] == "1. 30"


def test_label_names_in_titles_from_argument_or_history():
    means = np.array([[1.0, 0.5], [2.0, 1.0], [0.3, 0.2]])
    h = history_from(means)
    assert titles(band_figure(h, label_names={0: "cat", 2: "a very long class name that goes on"})) == [
        "cat", "1", "a very long class name …"]
    h.label_names = {1: "dog"}
    assert titles(band_figure(h)) == ["0", "dog", "2"]
    assert titles(band_figure(h, label_names={})) == ["0", "1", "2"]  # explicit mapping wins


def test_sort_by_worst_uses_the_last_finite_mean_and_higher_is_worse_flag():
    means = np.array([[1.0, 0.2], [0.5, 0.9], [2.0, np.nan], [0.1, 0.5]])
    h = history_from(means)
    assert titles(band_figure(h, sort="worst")) == ["2", "1", "3", "0"]
    assert titles(band_figure(h, sort="worst", higher_is_worse=False)) == ["0", "3", "1", "2"]
    for ax, lab in zip(panels(band_figure(h, sort="worst")), [2, 1, 3, 0]):
        np.testing.assert_array_equal(artist(ax, "mean").get_ydata(), means[lab])


# ------------------------------------------------------------------- reuse
def test_band_figure_renderer_reuses_figure_and_axes():
    rng = np.random.default_rng(2)
    means = rng.uniform(0, 1, (5, 6))
    renderer = BandFigure()
    assert renderer.figure is None
    fig1 = renderer.draw(history_from(means[:, :3]))
    axes1 = list(fig1.axes)
    fig2 = renderer.draw(history_from(means))
    assert fig2 is fig1 and fig2.axes == axes1
    for ax, row in zip(panels(fig2), means):
        np.testing.assert_array_equal(artist(ax, "mean").get_ydata(), row)
    assert any(t.get_text().endswith("6 steps · step 6") for t in fig2.texts)
    # more labels than max_panels: the layout is rebuilt once, then reused again
    big = rng.uniform(0, 1, (30, 6))
    fig3 = renderer.draw(history_from(big))
    assert fig3 is not fig1 and any(ax.get_gid() == "heatmap" for ax in fig3.axes)
    big[4, -1] = 50.0
    fig4 = renderer.draw(history_from(big))
    assert fig4 is fig3 and titles(fig4)[0] == "1. 4"
    assert decode(figure_to_png(fig4)).size == decode(figure_to_png(band_figure(history_from(big)))).size


def test_band_figure_renderer_pickles_without_its_figure():
    import pickle

    renderer = BandFigure(bound="range", sort="worst", worst_k=3)
    h = history_from(np.array([[1.0, 0.5], [2.0, 1.5]]))
    renderer.draw(h)
    copy = pickle.loads(pickle.dumps(renderer))
    assert copy.figure is None and (copy.bound, copy.sort, copy.worst_k) == ("range", "worst", 3)
    assert titles(copy.draw(h)) == ["1", "0"]


# ------------------------------------------------------------- PNG output
def test_png_and_rgb_have_the_figure_size_and_stay_small():
    rng = np.random.default_rng(3)
    fig = band_figure(history_from(rng.uniform(0, 1, (10, 20))), dpi=100)
    w, h = fig.get_size_inches() * 100
    png = figure_to_png(fig)
    img = decode(png)
    assert img.format == "PNG" and img.size == (round(w), round(h))
    assert figure_to_rgb(fig).shape == (round(h), round(w), 3)
    assert len(png) <= 300 * 1024
    rgb = np.asarray(img.convert("RGB"))
    assert (rgb != 255).any(axis=2).mean() > 0.05  # something was drawn
    big = figure_to_png(band_figure(history_from(rng.uniform(0, 1, (1000, 20)))))
    assert len(big) <= 300 * 1024 and decode(big).size[0] == 1000


def test_rendering_in_threads_matches_serial_rendering():
    rng = np.random.default_rng(4)
    histories = [history_from(rng.uniform(0, 1, (n, 8))) for n in (3, 12, 40, 7)]
    serial = [figure_to_png(band_figure(h)) for h in histories]
    results: list[bytes | None] = [None] * len(histories)

    def work(i: int) -> None:
        results[i] = figure_to_png(band_figure(histories[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(histories))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == serial


def test_no_pyplot_and_matplotlib_only_when_drawing():
    code = (
        "import sys, numpy as np\n"
        "import labeltrack_log, labeltrack_log.figures\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported too early'\n"
        "from labeltrack_log import StatsHistory, StatsTable\n"
        "h = StatsHistory(); h.append(StatsTable([0], [1], [0.5], [0.0], [0.5], [0.5], [0]), step=1, name='m', mode='train')\n"
        "labeltrack_log.figures.figure_to_png(labeltrack_log.figures.band_figure(h))\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# ------------------------------------------------------------ bad arguments
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bound": "foo"}, r"bound: expected one of \['std', 'range', 'quantile', 'ci'\], got 'foo'"),
        ({"sort": "random"}, r"sort: expected one of \['natural', 'worst'\], got 'random'"),
        ({"max_panels": 0}, r"max_panels: expected a positive int, got 0"),
        ({"worst_k": 2.5}, r"worst_k: expected a positive int, got 2.5"),
        ({"dpi": 5000}, r"dpi: expected a number between 20 and 600, got 5000"),
        ({"name": "loss"}, r"name: expected one of \['ce', 'acc'\], got 'loss'"),
        ({"name": "ce", "mode": "test"}, r"mode: expected one of \['train', 'eval'\] for name 'ce', got 'test'"),
        ({}, r"several names, expected one of \['ce', 'acc'\], got None"),
        ({"name": "ce"}, r"'ce' has several modes, expected one of \['train', 'eval'\]"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(kwargs, match):
    h = StatsHistory()
    for name, mode in (("ce", "train"), ("ce", "eval"), ("acc", "eval")):
        h.append(table([0], [1.0]), step=1, name=name, mode=mode)
    with pytest.raises(ValueError, match=match):
        band_figure(h, **kwargs)


# ------------------------------------------------------ render_files / CLI
def write_stats_csv(path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(FILE_COLUMNS)
        for mode in ("train", "eval"):
            for step in (100, 200, 300):
                for label, name in ((0, "cat"), (1, "dog"), (2, "bird")):
                    mean = (label + 1) / step * 100
                    w.writerow([1.7e9, "ce", mode, step, label, name, 20, mean, 0.1, mean - 0.2, mean + 0.3, 0])


def test_render_files_writes_one_png_per_name_and_mode(tmp_path):
    src = tmp_path / "stats.csv"
    write_stats_csv(src)
    written = render_files(src, tmp_path / "out" / "figs", bound="range")
    assert [p.name for p in written] == ["ce_range_band_train_step_300.png", "ce_range_band_eval_step_300.png"]
    for p in written:
        img = decode(p.read_bytes())
        assert img.size == (1000, img.size[1]) and img.size[1] > 200
    only = render_files(src, tmp_path / "one", mode="eval")
    assert [p.name for p in only] == ["ce_std_band_eval_step_300.png"]
    with pytest.raises(ValueError, match=r"mode: expected one of \['train', 'eval'\], got 'test'"):
        render_files(src, tmp_path / "x", mode="test")
    with pytest.raises(ValueError, match=r"name: expected one of \['ce'\], got 'acc'"):
        render_files(src, tmp_path / "x", name="acc")
    with pytest.raises(ValueError, match=r"bound: expected one of"):
        render_files(src, tmp_path / "x", bound="foo")


def test_cli_render_subprocess(tmp_path):
    src = tmp_path / "stats.csv"
    write_stats_csv(src)
    out = tmp_path / "pngs"
    cmd = [sys.executable, "-m", "labeltrack_log.cli", "render", str(src), "-o", str(out), "--mode", "train"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.split()
    png = Path(line)
    assert png == out / "ce_std_band_train_step_300.png" and sorted(out.iterdir()) == [png]
    assert decode(png.read_bytes()).format == "PNG"
    bad = subprocess.run(cmd[:-1] + ["nope"], capture_output=True, text=True, timeout=180)
    assert bad.returncode == 2 and "mode: expected one of ['train', 'eval'], got 'nope'" in bad.stderr


@pytest.mark.parametrize("n_labels", [3, 40])
def test_dollar_signs_in_names_are_text_not_mathtext(n_labels):
    names = {0: "$\\foo$", 1: "cost $5", 2: "a_b^c"}
    means = np.linspace(1.0, 2.0, n_labels * 3).reshape(n_labels, 3)
    fig = band_figure(history_from(means, name="ce $x^"), label_names=names, max_panels=25)
    assert decode(figure_to_png(fig)).size[0] > 0  # mathtext would raise ParseFatalException here
    shown = titles(fig) + [t.get_text() for ax in fig.axes for t in ax.get_yticklabels()]
    assert any("$\\foo$" in t for t in shown)
