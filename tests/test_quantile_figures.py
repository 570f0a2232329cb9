"""The "quantile" bound (issue 13): median line, inner p25-p75 and outer p10-p90 bands, the heatmap
of medians above the panel limit, clear errors without quantiles, Tracker and CLI."""

from __future__ import annotations

import subprocess
import sys

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from labeltrack_log import ConfigError, GroupedStats, StatsHistory, Tracker  # noqa: E402
from labeltrack_log.figures import band_figure, render_files  # noqa: E402
from labeltrack_log.sinks.files import ImageDirSink, JSONLSink  # noqa: E402

LEVELS = (0.1, 0.25, 0.5, 0.75, 0.9)


def quantile_history(labels: int = 4, steps: int = 5, seed: int = 0, levels=LEVELS) -> StatsHistory:
    rng = np.random.default_rng(seed)
    h = StatsHistory()
    for step in range(1, steps + 1):
        g = GroupedStats(quantiles=levels)
        y = np.concatenate([np.arange(labels), rng.integers(0, labels, 60 * labels)])
        g.update(y, rng.lognormal(-step * 0.1 + 0.05 * y, 1.0))
        h.append(g.compute(), step=step, name="ce", mode="eval")
    return h


def artist(ax, gid):
    found = [a for a in ax.get_children() if a.get_gid() == gid]
    assert len(found) == 1, f"expected one artist with gid {gid!r}, got {len(found)}"
    return found[0]


def band(ax, gid):
    (path,) = artist(ax, gid).get_paths()
    v = path.vertices
    k = len(v) // 2
    return v[:k, 1], v[k : 2 * k, 1][::-1]  # upper, lower


def test_median_line_and_both_bands_come_from_the_quantiles():
    h = quantile_history()
    dense = h.dense("ce", "eval")
    fig = band_figure(h, bound="quantile", sort="natural")
    panels = [ax for ax in fig.axes if ax.get_gid() == "panel"]
    assert len(panels) == 4
    for r, ax in enumerate(panels):
        np.testing.assert_array_equal(artist(ax, "mean").get_ydata(), dense.quantiles[0.5][r])
        hi, lo = band(ax, "band")
        np.testing.assert_array_equal(hi, dense.quantiles[0.9][r])
        np.testing.assert_array_equal(lo, dense.quantiles[0.1][r])
        ihi, ilo = band(ax, "inner-band")
        np.testing.assert_array_equal(ihi, dense.quantiles[0.75][r])
        np.testing.assert_array_equal(ilo, dense.quantiles[0.25][r])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["label median", "p25–p75", "p10–p90", "mean of medians"]
    assert fig.texts[0].get_text().endswith("median with quantile bands")


def test_three_levels_draw_one_band_and_other_bounds_no_inner_band():
    h = quantile_history(levels=(0.05, 0.5, 0.95))
    fig = band_figure(h, bound="quantile")
    ax = next(ax for ax in fig.axes if ax.get_gid() == "panel")
    assert artist(ax, "inner-band").get_paths() == []
    assert [t.get_text() for t in fig.legends[0].get_texts()][1] == "p5–p95"
    fig = band_figure(quantile_history(), bound="std")
    ax = next(ax for ax in fig.axes if ax.get_gid() == "panel")
    assert artist(ax, "inner-band").get_paths() == []


def test_heatmap_shows_medians_above_the_panel_limit():
    h = quantile_history(labels=30, steps=3)
    dense = h.dense("ce", "eval")
    fig = band_figure(h, bound="quantile", worst_k=4)
    heat = next(ax for ax in fig.axes if ax.get_gid() == "heatmap")
    np.testing.assert_array_equal(np.ma.getdata(artist(heat, "heatmap").get_array()), dense.quantiles[0.5])
    assert heat.get_title(loc="left").startswith("Median per label (")
    worst = np.argsort(-dense.quantiles[0.5][:, -1], kind="stable")[:4]
    panels = [ax for ax in fig.axes if ax.get_gid() == "panel"]
    for ax, r in zip(panels, worst):
        np.testing.assert_array_equal(artist(ax, "mean").get_ydata(), dense.quantiles[0.5][r])


def test_quantile_bound_without_quantiles_is_a_clear_error():
    g = GroupedStats()
    g.update([0, 1], [1.0, 2.0])
    h = StatsHistory()
    h.append(g.compute(), step=1, name="ce", mode="eval")
    with pytest.raises(ValueError, match=r"bound 'quantile': expected a history with the median.*quantiles=\(0.1"):
        band_figure(h, bound="quantile")
    with pytest.raises(ConfigError, match="bounds: 'quantile' draws the median"):
        Tracker("ce", sinks=[], bounds=("quantile",))
    with pytest.raises(ConfigError, match="expected quantiles with 0.5"):
        Tracker("ce", sinks=[], bounds="quantile", quantiles=(0.1, 0.9))


def test_tracker_draws_the_quantile_figure(tmp_path):
    sink = ImageDirSink(tmp_path / "img")
    tr = Tracker("ce", sinks=[sink], bounds=("quantile", "std"), quantiles=LEVELS, figures="epoch")
    rng = np.random.default_rng(1)
    for step in (1, 2):
        tr.update(rng.integers(0, 3, 200), rng.gamma(1.0, 1.0, 200), mode="eval")
        tr.end_epoch(step)
    tr.close()
    names = sorted(p.name for p in sink.written)
    assert "ce_quantile_band_eval_step_2.png" in names and "ce_std_band_eval_step_2.png" in names


def test_cli_render_bound_quantile(tmp_path):
    src = tmp_path / "stats.jsonl"
    with JSONLSink(src) as sink:
        for step, table in quantile_history(steps=3).items("ce", "eval"):
            sink.log_stats(table, step=step, name="ce", mode="eval")
    out = tmp_path / "pngs"
    cmd = [sys.executable, "-m", "labeltrack_log.cli", "render", str(src), "-o", str(out), "--bound", "quantile"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(out / "ce_quantile_band_eval_step_3.png")]
    assert render_files(src, tmp_path / "again", bound="quantile")[0].name == "ce_quantile_band_eval_step_3.png"
