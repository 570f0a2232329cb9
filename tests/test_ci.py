"""The "ci" bound (issue 13): a 95% confidence interval of each label's mean. Wilson score interval
when every finite value of the label is 0 or 1 (tracked per label, merged, pickled), else
mean ± 1.96·std/√n; the figure bound "ci" draws it."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labeltrack_log import GroupedStats, StatsHistory, Tracker
from labeltrack_log.figures import band_figure

pytestmark = pytest.mark.core

Z = 1.959963984540054  # scipy.stats.norm.ppf(0.975)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval, textbook form (Wilson 1927)."""
    p = k / n
    denom = 1 + z * z / n
    centre = p + z * z / (2 * n)
    adj = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - adj) / denom, (centre + adj) / denom


def test_wilson_for_zero_one_labels_and_normal_for_others():
    g = GroupedStats()
    correct = [1, 1, 1, 0, 1, 1, 1, 1, 0, 1]  # label 0: 8 of 10
    g.update([0] * 10, correct)
    g.update([1] * 4, [1.0, 1.0, 1.0, 1.0])  # all ones: Wilson, not a zero-width band
    g.update([2] * 5, [0.0, 1.0, 0.5, 1.0, 0.0])  # one 0.5: not a 0/1 label
    g.update([3] * 3, [0.0, 2.0, 1.0])  # outside [0, 1]
    t = g.compute()
    assert t.binary.tolist() == [True, True, False, False]
    lo, hi = t.confidence_interval()
    assert (lo[0], hi[0]) == pytest.approx(wilson(8, 10), rel=1e-12)
    assert (lo[1], hi[1]) == pytest.approx(wilson(4, 4), rel=1e-12)
    assert 0.0 < lo[1] < hi[1] == pytest.approx(1.0)
    for r in (2, 3):
        vals = {2: [0.0, 1.0, 0.5, 1.0, 0.0], 3: [0.0, 2.0, 1.0]}[r]
        half = 1.96 * np.std(vals, ddof=1) / math.sqrt(len(vals))
        assert (lo[r], hi[r]) == pytest.approx((np.mean(vals) - half, np.mean(vals) + half), rel=1e-12)
    assert np.all((lo[:2] >= 0) & (hi[:2] <= 1))  # a 0/1 mean's interval stays in [0, 1]


def test_wilson_matches_scipy_binomtest():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = GroupedStats()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 2000)
    g.update(y, (rng.random(2000) < 0.1 + 0.2 * y).astype(np.float32))
    t = g.compute()
    lo, hi = t.confidence_interval(z=Z)
    for r in range(5):
        k, n = int(round(t.mean[r] * t.count[r])), int(t.count[r])
        ref = scipy_stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert (lo[r], hi[r]) == pytest.approx((ref.low, ref.high), rel=1e-9)


@settings(max_examples=100, deadline=None)
@given(a=st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0.0, 1.0, 0.5, math.nan, 2.0, -1.0])), max_size=60),
       b=st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0.0, 1.0, 0.5, math.nan])), max_size=60))
def test_zero_one_flag_merges_and_pickles_like_one_accumulator(a, b):
    def acc(rows):
        g = GroupedStats()
        for i in range(0, len(rows), 7):
            part = rows[i : i + 7]
            g.update([r[0] for r in part], [r[1] for r in part])
        return g

    one, left, right = acc(a + b), acc(a), acc(b)
    merged = left.merge(right).compute()
    full = one.compute()
    np.testing.assert_array_equal(merged.binary, full.binary)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(one)).compute().binary, full.binary)
    for lab, is_binary in zip(full.labels.tolist(), full.binary.tolist()):
        finite = [v for la, v in a + b if la == lab and math.isfinite(v)]
        assert is_binary == (bool(finite) and all(v in (0.0, 1.0) for v in finite))


def test_ci_bound_figure_and_tracker():
    rng = np.random.default_rng(2)
    h = StatsHistory()
    for step in range(1, 5):
        g = GroupedStats()
        y = rng.integers(0, 3, 300)
        g.update(y, (rng.random(300) < 0.5 + 0.1 * y).astype(float))
        h.append(g.compute(), step=step, name="acc", mode="eval")
    dense = h.dense("acc", "eval")
    fig = band_figure(h, bound="ci", sort="natural")
    panels = [ax for ax in fig.axes if ax.get_gid() == "panel"]
    for r, ax in enumerate(panels):
        (band,) = [a for a in ax.get_children() if a.get_gid() == "band"]
        (path,) = band.get_paths()
        k = len(path.vertices) // 2
        np.testing.assert_array_equal(path.vertices[:k, 1], dense.ci_high[r])
        np.testing.assert_array_equal(path.vertices[k : 2 * k, 1][::-1], dense.ci_low[r])
    assert np.all((dense.ci_low >= 0) & (dense.ci_high <= 1))
    tr = Tracker("acc", sinks=[], bounds=("ci",), figures=None)
    assert tr.bounds == ("ci",)
