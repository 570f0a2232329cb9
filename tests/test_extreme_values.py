"""Extreme values and natural order in the grouping core (issue 11, items 9 and 11).

Runs in both environments: numpy 1.26 (.venv) and numpy 2 without extras (.venv-core, ``-m core``).
Each case goes through the three ways statistics are combined: one chunk (the fast path), two
chunks of one accumulator (Chan's update), and ``merge`` of two accumulators.
"""

from __future__ import annotations

import logging
import math
from fractions import Fraction

import numpy as np
import pytest

from labeltrack_log import GroupedStats
from labeltrack_log.sinks import Sink

pytestmark = pytest.mark.core


def exact(values: list[float]) -> tuple[float, float]:
    """Mean and sample std computed exactly (rationals), rounded once at the end."""
    fr = [Fraction(v) for v in values]
    mean = sum(fr) / len(fr)
    if len(fr) == 1:
        return float(mean), 0.0
    var = sum((x - mean) ** 2 for x in fr) / (len(fr) - 1)
    if var > Fraction(2) ** 1000:  # float(var) would overflow: take the root of var / 2**1100
        return float(mean), math.sqrt(float(var / Fraction(2) ** 1100)) * 2.0**550
    return float(mean), math.sqrt(float(var))


def ways(values: list[float]):
    """(how, table) for one chunk, two chunks with a compute between, and a merge."""
    v = np.array(values)
    half = max(1, len(v) // 2)
    g = GroupedStats()
    g.update(np.zeros(len(v), dtype=np.int64), v)
    yield "one chunk", g.compute()
    g = GroupedStats()
    g.update(np.zeros(half, dtype=np.int64), v[:half])
    g.compute()
    g.update(np.zeros(len(v) - half, dtype=np.int64), v[half:])
    yield "two chunks", g.compute()
    a, b = GroupedStats(), GroupedStats()
    a.update(np.zeros(half, dtype=np.int64), v[:half])
    b.update(np.zeros(len(v) - half, dtype=np.int64), v[half:])
    yield "merge", a.merge(b).compute()


CASES = [
    [1e308, -1e308],  # exact mean 0; the sum overflows
    [1.7e308, 1.7e308],  # std 0; the square of the mean overflows
    [2e154, 2e154 + 1e140, 3e154],  # mean > 1.3e154: squares overflow
    [1e200, -1e200, 5e199, 3e199],
    [-1.7e308, 1e308, 1.5e308, -3.0],
    [1e8 + 1, 1e8 - 1, 1e8],  # the large-offset case the shifted sums exist for
    [5e-324, 1e-310, 0.0],  # subnormals
]


@pytest.mark.parametrize("values", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_finite_input_gives_finite_correct_statistics(values):
    mean, std = exact(values)
    for how, t in ways(values):
        assert t.count[0] == len(values) and t.nonfinite[0] == 0, how
        assert np.isfinite(t.mean[0]) and np.isfinite(t.std[0]), (how, t.mean[0], t.std[0])
        assert t.mean[0] == pytest.approx(mean, rel=1e-12, abs=1e-300 + abs(std) * 1e-12), how
        assert t.std[0] == pytest.approx(std, rel=1e-9, abs=1e-300), how
        assert t.min[0] == min(values) and t.max[0] == max(values), how


def test_a_label_above_1e154_among_ordinary_labels_keeps_everything_finite():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 10_000)
    values = rng.normal(1.0, 0.1, 10_000)
    values[labels == 3] *= 1e160
    g = GroupedStats()
    for i in range(0, 10_000, 700):
        g.update(labels[i:i + 700], values[i:i + 700])
    t = g.compute()
    assert np.isfinite(t.std).all() and np.isfinite(t.mean).all()
    for lab in range(5):
        v = values[labels == lab]
        np.testing.assert_allclose(t[lab].std, np.std(v / 1e150, ddof=1) * 1e150, rtol=1e-9)
        np.testing.assert_allclose(t[lab].mean, np.mean(v / 1e150) * 1e150, rtol=1e-12)


def test_a_std_beyond_float_range_is_inf_and_said_not_nan(caplog):
    caplog.set_level(logging.WARNING)
    for how, t in ways([1.7e308, -1.7e308]):  # true std 2.4e308 > max float
        assert t.mean[0] == 0.0, how
        assert t.std[0] == math.inf, how  # not NaN: a number too large, and said so
    assert "beyond float range" in caplog.text


def test_extreme_state_survives_pickle_and_more_data():
    import pickle

    g = GroupedStats()
    g.update([0, 0], [1e308, -1e308])
    g = pickle.loads(pickle.dumps(g))
    g.update([0, 0], [0.0, 0.0])
    t = g.compute()
    assert t.mean[0] == 0.0 and t.std[0] == pytest.approx(exact([1e308, -1e308, 0.0, 0.0])[1], rel=1e-12)


# ---------------------------------------------------------------- 11.11 natural order
def test_string_labels_come_out_in_natural_order():
    g = GroupedStats()
    labels = ["img10", "img2", "img1", "b", "img01", "a10b2", "a10b10", "a9"]
    g.update(labels, np.arange(len(labels), dtype=float))
    assert g.compute().labels.tolist() == ["a9", "a10b2", "a10b10", "b", "img01", "img1", "img2", "img10"]
    # merge order does not matter
    a, b = GroupedStats(), GroupedStats()
    a.update(labels[:3], [1.0, 2.0, 3.0])
    b.update(labels[3:], [1.0] * 5)
    assert b.merge(a).compute().labels.tolist() == g.compute().labels.tolist()


def test_the_label_budget_keeps_the_first_labels_in_natural_order():
    g = GroupedStats()
    g.update([f"img{i}" for i in range(1, 13)], np.ones(12))
    view = Sink(label_budget=3).budget(g.compute())
    assert view.table.labels.tolist() == ["img1", "img2", "img3"]


def test_the_aggregates_across_labels_stay_finite_near_the_float_limits():
    from labeltrack_log.sinks import aggregates

    g = GroupedStats()
    g.update([0, 1, 2], [1.7e308, 1.7e308, -1e308])
    agg, worst = aggregates(g.compute())
    assert worst in (0, 1)
    assert agg["macro_mean"] == pytest.approx((1.7e308 / 3) * 2 - 1e308 / 3, rel=1e-12)
    assert np.isfinite(agg["spread"]) and agg["spread"] == pytest.approx(np.std(np.array([1.7, 1.7, -1.0])) * 1e308, rel=1e-12)
    g = GroupedStats()
    g.update([0, 1], [0.25, 0.75])
    assert aggregates(g.compute())[0]["macro_mean"] == 0.5  # ordinary values: unchanged (exact)
