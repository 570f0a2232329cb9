"""GroupedStats / StatsTable against a plain reference implementation (hypothesis), merge laws,
numerical stability and bad input. Runs in the numpy-2 core environment too (marker `core`)."""

from __future__ import annotations

import math
import pickle
import statistics
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labeltrack_log import GroupedStats, InputShapeError, InputTypeError, LabelStats, StatsTable
from labeltrack_log.grouping import natural_key
from labeltrack_log import grouping

pytestmark = pytest.mark.core


def reference(labels, values) -> dict:
    """Plain-Python per-label statistics (FastEstimator's convention: ddof=1, 0.0 for one value)."""
    groups: dict = defaultdict(list)
    bad: dict = defaultdict(int)
    for lab, val in zip(labels, values):
        if math.isfinite(val):
            groups[lab].append(float(val))
        else:
            bad[lab] += 1
    out = {}
    for lab in set(groups) | set(bad):
        vals = groups.get(lab, [])
        out[lab] = dict(
            count=len(vals),
            mean=statistics.fmean(vals) if vals else math.nan,
            std=(statistics.stdev(vals) if len(vals) > 1 else 0.0) if vals else math.nan,
            min=min(vals) if vals else math.nan,
            max=max(vals) if vals else math.nan,
            nonfinite=bad[lab],
        )
    return out


def assert_matches(table: StatsTable, ref: dict, rtol: float = 1e-9, atol: float = 1e-9) -> None:
    assert sorted(ref, key=natural_key) == table.labels.tolist()  # natural order (issue 11.11)
    for lab, exp in ref.items():
        got = table[lab]
        assert got.count == exp["count"] and got.nonfinite == exp["nonfinite"], lab
        for stat in ("mean", "std", "min", "max"):
            g, e = getattr(got, stat), exp[stat]
            if math.isnan(e):
                assert math.isnan(g), (lab, stat)
            else:
                assert g == pytest.approx(e, rel=rtol, abs=atol * max(1.0, abs(e))), (lab, stat, g, e)


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
any_float = st.one_of(finite, finite, finite, st.sampled_from([math.nan, math.inf, -math.inf]))
int_labels = st.integers(min_value=-3, max_value=12)
big_labels = st.integers(min_value=-(2**40), max_value=2**40)
str_labels = st.text(min_size=0, max_size=4)


def batches(label_strategy, value_strategy=any_float):
    pair = st.tuples(label_strategy, value_strategy)
    return st.lists(st.lists(pair, max_size=40), max_size=8)


def feed(g: GroupedStats, bs, as_list: bool = False) -> tuple[list, list]:
    all_l, all_v = [], []
    for batch in bs:
        labs = [p[0] for p in batch]
        vals = [p[1] for p in batch]
        all_l += labs
        all_v += vals
        if as_list or not labs:
            g.update(labs, vals)
        else:
            g.update(np.array(labs), np.array(vals))
    return all_l, all_v


@settings(max_examples=150, deadline=None)
@given(bs=batches(int_labels))
def test_matches_reference_small_int_labels(bs):
    g = GroupedStats()
    labs, vals = feed(g, bs)
    assert_matches(g.compute(), reference(labs, vals))


@settings(max_examples=100, deadline=None)
@given(bs=batches(big_labels))
def test_matches_reference_large_int_labels(bs):
    g = GroupedStats()
    labs, vals = feed(g, bs)
    assert_matches(g.compute(), reference(labs, vals))


@settings(max_examples=100, deadline=None)
@given(bs=batches(str_labels))
def test_matches_reference_string_labels(bs):
    g = GroupedStats()
    labs, vals = feed(g, bs, as_list=True)
    assert_matches(g.compute(), reference(labs, vals))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=batches(int_labels), b=batches(int_labels), c=batches(int_labels))
def test_merge_equals_one_pass_over_concatenation(a, b, c):
    parts = []
    for bs in (a, b, c):
        g = GroupedStats()
        feed(g, bs)
        parts.append(g)
    merged = GroupedStats().merge(parts[0]).merge(parts[1]).merge(parts[2])
    whole = GroupedStats()
    labs, vals = feed(whole, a + b + c)
    assert_matches(merged.compute(), reference(labs, vals))
    assert_matches(whole.compute(), reference(labs, vals))
    # merge leaves the other accumulator unchanged
    assert_matches(parts[1].compute(), reference(*feed(GroupedStats(), b)))


def test_labels_in_natural_order_and_kinds():
    g = GroupedStats()
    g.update([10, 2, 1, 10], [1.0, 2.0, 3.0, 5.0])
    t = g.compute()
    assert t.labels.tolist() == [1, 2, 10]
    assert t[10].mean == 3.0 and t[10].std == pytest.approx(math.sqrt(8))
    s = GroupedStats()
    s.update(["b", "a", "c"], [1.0, 2.0, 3.0])
    assert s.compute().labels.tolist() == ["a", "b", "c"]
    b = GroupedStats()
    b.update(np.array([True, False, True]), np.array([1.0, 0.0, 3.0]))
    tb = b.compute()
    assert tb.labels.dtype == bool and tb.labels.tolist() == [False, True] and tb[True].mean == 2.0


def test_single_value_std_is_zero_and_no_value_is_nan():
    g = GroupedStats()
    g.update([1, 2], [5.0, math.nan])
    t = g.compute()
    assert t[1] == LabelStats(1, 1, 5.0, 0.0, 5.0, 5.0, 0)
    assert t[2].count == 0 and t[2].nonfinite == 1 and math.isnan(t[2].mean) and math.isnan(t[2].std)


def test_numerical_stability_around_1e8():
    rng = np.random.default_rng(1)
    n = 300_000  # spans several staging chunks
    labels = rng.integers(0, 3, n)
    offsets = rng.integers(-1, 2, n).astype(float)  # values 1e8-1, 1e8, 1e8+1
    g = GroupedStats()
    for i in range(0, n, 256):
        g.update(labels[i : i + 256], 1e8 + offsets[i : i + 256])
    t = g.compute()
    for lab in range(3):
        o = offsets[labels == lab]
        assert t[lab].mean == pytest.approx(1e8 + o.mean(), rel=0, abs=1e-7)
        assert t[lab].std == pytest.approx(o.std(ddof=1), rel=1e-9)
        assert (t[lab].min, t[lab].max) == (1e8 - 1, 1e8 + 1)


def test_streaming_memory_does_not_grow_with_samples():
    g = GroupedStats()
    rng = np.random.default_rng(0)
    for _ in range(50):
        g.update(rng.integers(0, 100, 10_000), rng.random(10_000))
    state_small = len(pickle.dumps(g))
    for _ in range(200):
        g.update(rng.integers(0, 100, 10_000), rng.random(10_000))
    assert g.compute().count.sum() == 250 * 10_000
    assert len(pickle.dumps(g)) == state_small  # state depends on #labels only


def test_many_chunks_match_reference_and_huge_batch():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 50, 200_000)
    values = rng.normal(3, 2, 200_000)
    g = GroupedStats()
    g.update(labels[:150_000], values[:150_000])  # bigger than one staging chunk
    g.update(labels[150_000:], values[150_000:])
    t = g.compute()
    for lab in (0, 17, 49):
        v = values[labels == lab]
        assert t[lab].count == len(v)
        assert t[lab].mean == pytest.approx(v.mean(), rel=1e-12)
        assert t[lab].std == pytest.approx(v.std(ddof=1), rel=1e-10)


def test_mixed_small_and_large_int_labels_and_negative():
    g = GroupedStats()
    g.update([1, 2], [1.0, 2.0])
    g.update([70_000, -5, 1], [3.0, 4.0, 5.0])
    g.update([2, 70_000], [6.0, 7.0])
    t = g.compute()
    assert t.labels.tolist() == [-5, 1, 2, 70_000]
    assert t.count.tolist() == [1, 2, 2, 2]
    assert t.mean.tolist() == [4.0, 3.0, 4.0, 5.0]


def test_reset_and_pickle_round_trip():
    g = GroupedStats()
    g.update([1, 1, 2], [1.0, 3.0, 2.0])
    clone = pickle.loads(pickle.dumps(g))
    clone.update([1], [5.0])
    assert clone.compute()[1].mean == 3.0 and g.compute()[1].mean == 2.0
    g.reset()
    assert len(g.compute()) == 0
    g.update(["x"], [1.0])  # after reset another label kind is fine
    assert g.compute().labels.tolist() == ["x"]


def test_integral_float_labels_are_ints():
    g = GroupedStats()
    g.update(np.array([0.0, 1.0, 1.0]), np.array([1.0, 2.0, 4.0], dtype=np.float32))
    t = g.compute()
    assert t.labels.dtype.kind == "i" and t[1.0].mean == 3.0


def test_table_record_is_immutable_and_columns_read_only():
    g = GroupedStats()
    g.update([3], [1.5])
    t = g.compute()
    rec = t[3]
    with pytest.raises(AttributeError):
        rec.mean = 2.0  # type: ignore[misc]
    with pytest.raises(ValueError):
        t.mean[0] = 2.0
    assert 3 in t and 4 not in t and len(t) == 1
    with pytest.raises(KeyError, match="label 4 is not in this table"):
        t[4]


# ------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("labels", "values", "exc", "match"),
    [
        ([1, 2, 3], [1.0, 2.0], InputShapeError, "got 3 labels and 2 values"),
        (np.zeros((4, 2), int), np.zeros(4), InputShapeError, r"labels: .*got shape \(4, 2\)"),
        (np.zeros(4, int), np.zeros((4, 3)), InputShapeError, r"values: .*got shape \(4, 3\)"),
        (np.zeros(4, int), np.float32(0.3), InputShapeError, r"values: .*scalar \(0-d\).*reduction='none'"),
        ([1, 2], ["a", "b"], InputTypeError, "values: expected numeric"),
        ([0.5, 1.0], [1.0, 2.0], InputTypeError, r"non-integer \(or out of int64 range\) value 0.5"),
        ([1, "a"], [1.0, 2.0], InputTypeError, "mix of strings"),
        ([1, None], [1.0, 2.0], InputTypeError, "expected all ints or all strings"),
        ([[1, 2], [3]], [1.0, 2.0], InputShapeError, "numpy cannot convert"),
        (np.array([1 + 2j]), [1.0], InputTypeError, "labels: expected ints, bools or strings"),
    ],
)
def test_bad_input_is_a_clear_error(labels, values, exc, match):
    g = GroupedStats()
    with pytest.raises(exc, match=match):
        g.update(labels, values)
    assert len(g.compute()) == 0  # nothing half-applied


def test_label_kind_must_stay_the_same():
    g = GroupedStats()
    g.update([1], [1.0])
    with pytest.raises(InputTypeError, match="expected int labels as in earlier updates, got str labels"):
        g.update(["a"], [1.0])
    other = GroupedStats()
    other.update(["a"], [1.0])
    with pytest.raises(InputTypeError, match="merge: expected int labels"):
        g.merge(other)
    with pytest.raises(InputTypeError, match="expected a GroupedStats"):
        g.merge([1, 2])  # type: ignore[arg-type]


def test_empty_batches_and_empty_epoch():
    g = GroupedStats()
    g.update([], [])
    g.update(np.array([], dtype=np.int64), np.array([], dtype=np.float32))
    assert len(g.compute()) == 0
    g.update([4], [1.0])
    g.update([], [])
    assert g.compute()[4].count == 1


def test_hundred_thousand_distinct_labels():
    rng = np.random.default_rng(3)
    labels = rng.permutation(100_000).repeat(2)
    values = rng.random(200_000)
    g = GroupedStats()
    for i in range(0, len(labels), 4096):
        g.update(labels[i : i + 4096], values[i : i + 4096])
    t = g.compute()
    assert len(t) == 100_000 and (t.count == 2).all()
    lab = int(labels[123])
    v = values[labels == lab]
    assert t[lab].mean == pytest.approx(v.mean()) and t[lab].std == pytest.approx(v.std(ddof=1))


def test_merge_keeps_strings_that_differ_only_by_trailing_nul():
    g = GroupedStats()
    g.update(["a\x00", "a"], [1.0, 3.0])
    merged = GroupedStats().merge(g).compute()
    assert merged.labels.tolist() == ["a", "a\x00"]
    assert merged["a"].mean == 3.0 and merged["a\x00"].mean == 1.0


def test_python_ints_beyond_int64_are_a_clear_error():
    with pytest.raises(InputTypeError, match="fit in int64"):
        GroupedStats().update(np.array([2**70], dtype=object), [1.0])
