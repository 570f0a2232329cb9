"""Per-label quantiles (issue 13): accuracy against numpy's order statistics on hypothesis data and on
the hard cases (zeros, negatives, 1e-30..1e30, constant, one sample, NaN/inf), merge and pickle
equalities, the memory bound, and bad settings. Runs in the numpy-2 core environment too."""

from __future__ import annotations

import logging
import math
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labeltrack_log import GroupedStats, InputTypeError, StatsTable
from labeltrack_log.sketch import ExpHistograms, relative_accuracy

pytestmark = pytest.mark.core

LEVELS = (0.1, 0.25, 0.5, 0.75, 0.9)


def assert_accurate(table: StatsTable, labels, values, levels=LEVELS, tol=0.01) -> None:
    """Every estimate is within ``tol`` relative of the order statistic at floor or ceil of
    q*(n-1) of its label's finite values, inside [min, max], and NaN for a label with none."""
    labels, values = np.asarray(labels), np.asarray(values, dtype=np.float64)
    assert table.quantile_levels == tuple(levels)
    for j, lab in enumerate(table.labels.tolist()):
        x = np.sort(values[(labels == lab) & np.isfinite(values)])
        for q in levels:
            est = table.quantile(q)[j]
            if not len(x):
                assert math.isnan(est)
                continue
            assert x[0] <= est <= x[-1], (lab, q, est, x[0], x[-1])
            h = q * (len(x) - 1)
            cands = (x[math.floor(h)], x[math.ceil(h)])
            assert any(abs(est - c) <= tol * abs(c) for c in cands), (lab, q, est, cands)
            # numpy's own quantile lies between the two candidates
            np_q = np.quantile(x, q)
            assert min(cands) <= np_q <= max(cands)


def feed(g: GroupedStats, labels, values, batch: int = 7) -> GroupedStats:
    for i in range(0, len(labels), batch):
        g.update(labels[i : i + batch], values[i : i + batch])
    return g


finite_values = st.one_of(
    st.floats(-1e30, 1e30, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, -0.0, 1.0, 1e-30, -1e-30, 1e30, 2.0, 0.5]),
)
samples = st.lists(st.tuples(st.integers(0, 4), st.one_of(finite_values, st.sampled_from([math.nan, math.inf, -math.inf]))), min_size=0, max_size=300)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=samples, levels=st.lists(st.floats(0.001, 0.999), min_size=1, max_size=5, unique=True))
def test_quantiles_match_numpy_order_statistics(data, levels):
    labels = [lab for lab, _ in data]
    values = [v for _, v in data]
    g = feed(GroupedStats(quantiles=levels), labels, values)
    t = g.compute()
    assert_accurate(t, labels, values, tuple(sorted(levels)))
    assert t.nonfinite.sum() == sum(not math.isfinite(v) for v in values)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=samples, b=samples, split=st.integers(1, 50))
def test_merge_equals_one_accumulator_over_both(a, b, split):
    labels = [lab for lab, _ in a + b]
    values = [v for _, v in a + b]
    one = feed(GroupedStats(quantiles=LEVELS), labels, values, batch=split)
    left = feed(GroupedStats(quantiles=LEVELS), labels[: len(a)], values[: len(a)])
    right = feed(GroupedStats(quantiles=LEVELS), labels[len(a) :], values[len(a) :])
    merged = left.merge(right).compute()
    full = one.compute()
    assert merged.quantile_levels == full.quantile_levels
    np.testing.assert_array_equal(merged.quantile(0.5), full.quantile(0.5))
    for q in LEVELS:
        np.testing.assert_array_equal(merged.quantile(q), full.quantile(q))
    for lab in full.labels.tolist():  # the very same buckets per label, not just the same estimates
        mine, theirs = left._sketch.buckets(left._index[lab]), one._sketch.buckets(one._index[lab])
        for x, y in zip(mine, theirs):
            np.testing.assert_array_equal(x, y)


def test_hard_cases_within_one_percent():
    rng = np.random.default_rng(3)
    cases = {
        "zeros": np.where(rng.random(2000) < 0.6, 0.0, rng.gamma(1.0, 1.0, 2000)),
        "negative": -rng.lognormal(0.0, 2.0, 2000),
        "mixed_sign": rng.normal(0.0, 1.0, 2000),
        "extreme": 10.0 ** rng.uniform(-30, 30, 2000) * rng.choice([-1.0, 1.0], 2000),
        "tiny": rng.uniform(1e-30, 3e-30, 500),
        "huge": rng.uniform(1e30, 5e30, 500),
        "constant": np.full(1000, 0.3),
        "single": np.array([-7.25]),
        "two": np.array([1e-30, 1e30]),
        "nan_inf": np.array([np.nan, 1.0, np.inf, 2.0, -np.inf, 3.0]),
        "only_nan": np.array([np.nan, np.inf]),
    }
    labels = np.concatenate([np.full(len(v), name, dtype=object) for name, v in cases.items()])
    values = np.concatenate(list(cases.values()))
    perm = rng.permutation(len(values))
    g = feed(GroupedStats(quantiles=LEVELS), labels[perm], values[perm], batch=256)
    t = g.compute()
    assert_accurate(t, labels, values)
    assert t["constant"].quantiles[0.5] == 0.3  # clamped into the exact [min, max]
    assert t["single"].quantiles == {q: -7.25 for q in LEVELS}
    assert t["only_nan"].nonfinite == 2 and math.isnan(t["only_nan"].quantiles[0.5])
    assert t["nan_inf"].nonfinite == 3
    assert t["zeros"].quantiles[0.25] == 0.0  # exact zeros have their own bucket


def test_float_labels_and_huge_batches():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 100, 300_000)
    v = rng.gamma(2.0, 0.5, 300_000).astype(np.float32)
    g = GroupedStats(quantiles=LEVELS)
    g.update(y, v)  # one batch larger than the staging buffer
    assert_accurate(g.compute(), y, v.astype(np.float64))


def test_no_quantiles_means_no_sketch():
    g = GroupedStats()
    g.update([0, 1], [1.0, 2.0])
    t = g.compute()
    assert t.quantile_levels == () and g._sketch is None and t[0].quantiles == {}
    with pytest.raises(KeyError, match="not tracked.*quantiles="):
        t.quantile(0.5)


def test_untracked_level_is_a_clear_error():
    g = GroupedStats(quantiles=(0.5, 0.9))
    g.update([0], [1.0])
    with pytest.raises(KeyError, match=r"quantile 0.25 is not tracked: expected one of \(0.5, 0.9\)"):
        g.compute().quantile(0.25)


@pytest.mark.parametrize("bad", [(0.0,), (1.0,), (1.5,), (math.nan,), (), "0.5", 0.5, (0.5, 0.5), (True,)])
def test_bad_levels_are_refused(bad):
    with pytest.raises(ValueError, match="quantiles: expected"):
        GroupedStats(quantiles=bad)


def test_bad_sketch_settings_are_refused_at_construction():
    with pytest.raises(ValueError, match="scale: expected an int"):
        GroupedStats(quantiles=(0.5,), quantile_scale=20)
    with pytest.raises(ValueError, match="max_buckets: expected a positive int"):
        GroupedStats(quantiles=(0.5,), quantile_max_buckets=0)


def test_merge_of_different_settings_is_a_clear_error():
    a, b, c, d = GroupedStats(quantiles=(0.5,)), GroupedStats(quantiles=(0.1, 0.5)), GroupedStats(), GroupedStats(quantiles=(0.5,), quantile_scale=4)
    for g in (a, b, c, d):
        g.update([0], [1.0])
    for other in (b, c, d):
        with pytest.raises(InputTypeError, match="merge: expected an accumulator with quantiles="):
            a.merge(other)
    with pytest.raises(InputTypeError, match="got quantiles=\\(0.5,\\)"):
        c.merge(a)
    with pytest.raises(InputTypeError, match="merge: expected"):
        a.merge(GroupedStats())  # even an empty one with other settings


def test_pickle_round_trip_is_exact():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 20, 5000)
    v = rng.normal(0, 3, 5000)
    g = feed(GroupedStats(quantiles=LEVELS), y, v, batch=100)
    g2 = pickle.loads(pickle.dumps(g))
    assert g2.compute() == g.compute()
    # and it keeps accumulating identically
    g.update(y[:50], v[:50])
    g2.update(y[:50], v[:50])
    assert g2.compute() == g.compute()
    assert g2.compute().quantile_levels == LEVELS


def test_old_pickles_load_without_quantiles():
    g = GroupedStats()
    g.update([0], [1.0])
    state = g.__getstate__()
    for key in ("quantile_levels", "_sketch_config", "_sketch"):
        del state[key]
    old = GroupedStats.__new__(GroupedStats)
    old.__setstate__(state)
    assert old.compute().quantile_levels == () and old.compute().mean.tolist() == [1.0]


def test_memory_bound_lowers_the_scale_and_says_so(caplog):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 50, 50_000)
    v = 10.0 ** rng.uniform(-20, 20, 50_000)
    g = GroupedStats(quantiles=(0.5,), quantile_max_buckets=5_000)
    with caplog.at_level(logging.WARNING, logger="labeltrack_log.sketch"):
        feed(g, y, v, batch=1000)
        t = g.compute()
    assert g._sketch.held_bytes <= 16 * 5_000 and g._sketch.scale < 6
    assert "lowered the scale from" in caplog.text and "relative accuracy" in caplog.text
    assert_accurate(t, y, v, (0.5,), tol=2 * relative_accuracy(g._sketch.scale) + 1e-12)


def test_merge_after_downscale_uses_the_lower_scale():
    rng = np.random.default_rng(4)
    coarse = GroupedStats(quantiles=(0.5,), quantile_max_buckets=300)
    fine = GroupedStats(quantiles=(0.5,), quantile_max_buckets=300)
    coarse.update(np.zeros(5000, dtype=int), 10.0 ** rng.uniform(-10, 10, 5000))
    fine.update(np.ones(20, dtype=int), rng.uniform(1, 2, 20))
    coarse.compute(), fine.compute()  # reduce the staged samples
    assert coarse._sketch.scale < fine._sketch.scale
    scale = coarse._sketch.scale
    fine.merge(coarse)
    assert fine._sketch.scale <= scale  # at most the coarser one's (lower still if the bound needs it)
    assert fine._sketch.held_bytes <= 16 * 300
    assert fine.compute().count.tolist() == [5000, 20]


def test_dense_round_trip_and_state_for_reducers():
    rng = np.random.default_rng(6)
    g = feed(GroupedStats(quantiles=LEVELS), rng.integers(0, 10, 3000), rng.normal(0, 1, 3000) * (rng.random(3000) < 0.8), batch=300)
    sk = g._sketch
    dense = sk.to_dense(g.num_labels)
    assert int(dense.pos.sum() + dense.neg.sum() + dense.zero.sum()) == 3000
    assert sk.from_dense(dense) == sk
    assert sk.from_state(*sk.state()) == sk
    # two halves summed densely over agreed ranges == merge
    a = feed(GroupedStats(quantiles=LEVELS), [0, 1, 1], [1.0, -2.0, 0.0])
    b = feed(GroupedStats(quantiles=LEVELS), [0, 1, 1], [3.0, 5.0, -0.5])
    assert a.labels_in_slot_order == b.labels_in_slot_order == [0, 1]
    (pa, na), (pb, nb) = a.quantile_sketch.index_ranges(), b.quantile_sketch.index_ranges()
    pos = (min(pa[0], pb[0]), max(pa[1], pb[1]))
    neg = (min(na[0], nb[0]), max(na[1], nb[1]))
    da, db = a._sketch.to_dense(2, pos, neg), b._sketch.to_dense(2, pos, neg)
    summed = da._replace(pos=da.pos + db.pos, neg=da.neg + db.neg, zero=da.zero + db.zero)
    assert a._sketch.from_dense(summed) == a.merge(b)._sketch


def test_sketch_buckets_cover_the_values():
    h = ExpHistograms()
    vals = np.array([-3.0, -0.001, 0.0, 0.0, 1.0, 2.5, 1e10])
    h.add(np.zeros(len(vals), dtype=np.int64), vals)
    lower, upper, counts = h.buckets(0)
    assert counts.sum() == len(vals) and np.all(np.diff(lower) > 0) and np.all(lower <= upper)
    for v in vals:
        inside = ((lower < v) & (v <= upper)) | ((lower == v) & (upper == v)) | ((lower <= v) & (v < upper) & (upper <= 0))
        assert inside.any(), v


def reference_buckets(slots, values, scale: int) -> dict[tuple[int, int, int], int]:
    """(slot, sign, bucket index) -> count, straight from the bucket formula, one value at a time."""
    out: dict[tuple[int, int, int], int] = {}
    for s, v in zip(slots, values):
        sign = (v > 0) - (v < 0)
        idx = 0 if sign == 0 else math.ceil(math.log2(abs(v)) * 2**scale) - 1
        out[(s, sign, idx)] = out.get((s, sign, idx), 0) + 1
    return out


chunks = st.lists(
    st.lists(st.tuples(st.integers(0, 40), st.floats(-1e30, 1e30, allow_nan=False).filter(lambda v: v == 0 or abs(v) > 1e-30)),
             min_size=1, max_size=30),
    min_size=1, max_size=8,
)


@pytest.mark.parametrize("max_buckets", [1 << 22, 300])  # dense rows; sparse once rows exceed 300 cells
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=chunks)
def test_sketch_buckets_equal_the_formula_whatever_order_ranges_grow_in(max_buckets, parts):
    # Each chunk can widen some labels' ranges, move rows and widen every row, or switch the
    # sketch to sparse storage (at most 240 buckets in use: never lowered below scale 3 here):
    # whatever the re-layouts, the buckets held are exactly those of the formula.
    h = ExpHistograms(scale=3, max_buckets=max_buckets)
    for part in parts:
        h.add(np.array([s for s, _ in part], dtype=np.int64), np.array([v for _, v in part]))
    every = [p for part in parts for p in part]
    want = reference_buckets([s for s, _ in every], [v for _, v in every], 3)
    got = {}
    for slot in sorted({s for s, _ in every}):
        lower, upper, counts = h.buckets(slot)
        for lo, hi, c in zip(lower.tolist(), upper.tolist(), counts.tolist()):
            sign = 0 if lo == hi == 0 else (1 if lo > 0 else -1)
            edge = lo if sign > 0 else -hi
            idx = 0 if sign == 0 else round(math.log2(edge) * 2**3)
            got[(slot, sign, idx)] = c
    assert h.scale == 3 and got == want


def test_100k_labels_keep_full_accuracy_in_sparse_storage(caplog):
    # Issue 13: dense rows for 100,000 labels would need ~100M cells; the sketch keeps only the
    # buckets in use instead (switching is logged), so the scale and the 1% accuracy are kept.
    rng = np.random.default_rng(11)
    y = rng.integers(0, 100_000, 400_000)
    v = rng.gamma(2.0, 0.5, 400_000) * (rng.random(400_000) < 0.9)  # exact zeros too
    g = GroupedStats(quantiles=LEVELS)
    with caplog.at_level(logging.INFO, logger="labeltrack_log.sketch"):
        feed(g, y, v, batch=4096)
        t = g.compute()
    sk = g._sketch
    assert "switched to sparse storage" in caplog.text and "lowered the scale" not in caplog.text
    assert sk.scale == 6 and sk.held_bytes <= 16 * sk.max_buckets
    assert sk.nbytes <= 16 * len(v)  # the buckets in use, never a row per label
    assert len(t) == len(np.unique(y))
    order = np.argsort(y, kind="stable")
    ys, vs = y[order], v[order]
    cuts = np.searchsorted(ys, t.labels)
    ends = np.searchsorted(ys, t.labels, side="right")
    for j in rng.choice(len(t), 300, replace=False).tolist():  # a sample of labels, checked exactly
        x = np.sort(vs[cuts[j] : ends[j]])
        for k, q in enumerate(LEVELS):
            est = t.quantile(q)[j]
            h = q * (len(x) - 1)
            assert x[0] <= est <= x[-1]
            assert any(abs(est - c) <= 0.01 * abs(c) for c in (x[math.floor(h)], x[math.ceil(h)])), (j, q, est)


@pytest.mark.parametrize("max_buckets", [40, 3000])  # 2,656 buckets in use at scale 6, ~19,000 dense cells
def test_sparse_storage_holds_the_same_buckets_as_dense_rows(max_buckets):
    # The same samples into a sketch that stays dense and one forced sparse: equal buckets,
    # equal quantiles; merging and pickling work across the two storages.
    rng = np.random.default_rng(12)
    y = rng.integers(0, 6, 3000)
    v = rng.normal(0.0, 1.0, 3000) * 10.0 ** rng.integers(-3, 3, 3000) * (rng.random(3000) < 0.95)
    dense = feed(GroupedStats(quantiles=LEVELS, quantile_max_buckets=10**6), y, v, batch=500)
    tight = feed(GroupedStats(quantiles=LEVELS, quantile_max_buckets=max_buckets), y, v, batch=500)
    assert tight.quantile_sketch._keys is not None and dense.quantile_sketch._keys is None
    assert (tight.quantile_sketch.scale == 6) == (max_buckets == 3000)
    if tight.quantile_sketch.scale == 6:
        assert tight.quantile_sketch.state()[1:] and all(np.array_equal(a, b) for a, b in zip(tight.quantile_sketch.state()[1:], dense.quantile_sketch.state()[1:]))
    else:  # even sparse, the buckets in use exceed the bound: lowered, and still within its accuracy
        assert tight.quantile_sketch.held_bytes <= 16 * max_buckets
    assert_accurate(tight.compute(), y, v, tol=2 * relative_accuracy(tight.quantile_sketch.scale) + 1e-12)
    again = pickle.loads(pickle.dumps(tight))
    assert again._sketch == tight.quantile_sketch
    both = feed(GroupedStats(quantiles=LEVELS, quantile_max_buckets=max_buckets), y[:1000], v[:1000])
    rest = feed(GroupedStats(quantiles=LEVELS, quantile_max_buckets=max_buckets), y[1000:], v[1000:])
    assert_accurate(both.merge(rest).compute(), y, v, tol=2 * relative_accuracy(both.quantile_sketch.scale) + 1e-12)


def test_dense_rows_that_fit_stay_dense_whatever_order_labels_arrive_in():
    # Labels 512..599 after 0..511: the doubled row capacity (1,024 rows) would not fit the bound,
    # 600 rows do; going sparse there (4x the bytes per bucket) lowered the scale for nothing.
    rng = np.random.default_rng(13)
    h = ExpHistograms(6, 25_000)  # 400,000 bytes
    h.add(np.repeat(np.arange(512), 200), rng.uniform(1, 2, 512 * 200))
    h.add(np.repeat(np.arange(512, 600), 200), rng.uniform(1, 2, 88 * 200))
    at_once = ExpHistograms(6, 25_000)
    at_once.add(np.repeat(np.arange(600), 200), rng.uniform(1, 2, 600 * 200))
    assert h.scale == at_once.scale == 6 and h._keys is None and at_once._keys is None


def test_the_lowest_scale_is_reported_not_an_overflow(caplog):
    assert relative_accuracy(6) == pytest.approx((2 ** (1 / 64) - 1) / (2 ** (1 / 64) + 1), rel=1e-12)
    assert relative_accuracy(-10) == 1.0  # (base - 1) / (base + 1) with base = 2**1024: no OverflowError
    h = ExpHistograms(6, 2)
    with caplog.at_level(logging.WARNING, logger="labeltrack_log.sketch"):
        h.add(np.arange(3), np.array([1.0, 2.0, 3.0]))  # 3 buckets > 2 at any scale: down to the floor
    assert h.scale == -10 and "lowered the scale from 6 to -10" in caplog.text
    assert h.num_buckets == 3


def test_zero_counts_are_no_buckets_in_either_storage():
    # A zero count handed in (from_state, merge) makes no bucket, dense or sparse, so equal
    # contents compare equal and no empty bucket shows in the histograms.
    dense = ExpHistograms(6)
    dense.add(np.array([0, 1]), np.array([1.0, 2.0]))
    scale, keys, counts = dense.state()
    want = ExpHistograms(6).from_state(scale, keys[1:], counts[1:])
    assert dense.from_state(scale, keys, np.array([0, counts[1]])) == want
    sparse = ExpHistograms(6)
    sparse._to_sparse()
    sparse._absorb(np.array([0, 1]), np.array([1, 1]), np.array([0, 63]), np.array([0, 5]))
    assert sparse.num_buckets == 1 and sparse.buckets(0)[2].tolist() == []


def test_a_row_that_fits_its_width_is_re_centred_not_sent_sparse():
    # 100 labels in [1, 2) lay out rows of 128 cells (51,600 bytes of a 64,000-byte bound); then
    # label 0 widens to [1, 2**1.7): 110 buckets still fit 128, only not with the usual headroom.
    # Re-centring that one row keeps the sketch dense at scale 6; going sparse (16 bytes each
    # for its ~5,000 buckets) would have lowered the scale.
    rng = np.random.default_rng(14)
    h = ExpHistograms(6, 4_000)
    h.add(np.repeat(np.arange(100), 100), rng.uniform(1.0, 2.0, 100 * 100))
    assert h._keys is None and h._cnt[1].shape[1] == 128
    h.add(np.zeros(200, dtype=np.int64), 2.0 ** rng.uniform(0.0, 1.7, 200))
    assert h._keys is None and h.scale == 6 and h.num_buckets > 4_000  # x 16 bytes > 64,000
