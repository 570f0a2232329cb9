"""Fuzzing the public API with hypothesis: random shapes, dtypes, values and call orders.

Every call either succeeds with numbers equal to a plain reference or raises one of the
documented errors (InputShapeError / InputTypeError) - never IndexError, ZeroDivisionError or a
silently wrong table - and a failed call leaves the accumulator as it was.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from labeltrack_log import GroupedStats, InputShapeError, InputTypeError, StatsTable

pytestmark = pytest.mark.core

LABEL_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.bool_,
                np.float32, np.float64, np.str_, np.complex64]
VALUE_DTYPES = [np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_, np.str_, np.complex128]


@st.composite
def arrays(draw, dtypes):
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    one_d = st.integers(0, 8).map(lambda n: (n,))
    shape = draw(st.one_of(st.just(()), hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=6), one_d, one_d))
    if dtype.kind == "U":
        elements = st.text(max_size=3).map(lambda s: s.rstrip("\x00"))
    elif dtype.kind == "f":
        elements = st.one_of(st.integers(-5, 300).map(float), st.floats(width=dtype.itemsize * 8, allow_subnormal=False))
    else:
        elements = None
    return draw(hnp.arrays(dtype, shape, elements=elements))


def reference_table(labels: list, values: list) -> dict:
    out: dict = {}
    for lab, val in zip(labels, values):
        entry = out.setdefault(lab, {"vals": [], "bad": 0})
        if math.isfinite(val):
            entry["vals"].append(val)
        else:
            entry["bad"] += 1
    return out


class AccumulatorMachine(RuleBasedStateMachine):
    """Random interleavings of update / compute / merge / reset / pickle against a reference."""

    def __init__(self) -> None:
        super().__init__()
        self.g = GroupedStats()
        self.labels: list = []
        self.values: list = []
        self.kind: str | None = None
        self.accepted = 0

    def _accept(self, labels: np.ndarray, values: np.ndarray) -> bool:
        """Decide, from the documented rules, whether update() must accept this input."""
        if labels.ndim != 1 or values.ndim != 1 or len(labels) != len(values):
            return False
        if values.dtype.kind not in "fiub":
            return False
        if len(labels) == 0:
            return True
        k = labels.dtype.kind
        if k == "c":
            return False
        if k == "f" and not (np.isfinite(labels).all() and (labels == np.round(labels)).all()
                             and (np.abs(labels) < 2.0**63).all()):
            return False
        if k == "u" and labels.max() > np.iinfo(np.int64).max:
            return False
        kind = "str" if k == "U" else "bool" if k == "b" else "int"
        return self.kind is None or self.kind == kind

    @rule(labels=arrays(LABEL_DTYPES), values=arrays(VALUE_DTYPES))
    def update(self, labels: np.ndarray, values: np.ndarray) -> None:
        if labels.ndim == 1 and values.ndim == 1 and len(values) != len(labels) and len(values) % 2:
            n = min(len(labels), len(values))  # mostly equal lengths; odd lengths keep the mismatch
            labels, values = labels[:n], values[:n]
        before = self.g.compute()
        if self._accept(labels, values):
            self.g.update(labels, values)
            self.accepted += 1
            event(f"accepted {labels.dtype.kind} n={min(len(labels), 3)}")
            if len(labels):
                k = labels.dtype.kind
                self.kind = self.kind or ("str" if k == "U" else "bool" if k == "b" else "int")
                labs = labels.tolist() if k != "f" else [int(x) for x in labels.tolist()]
                self.labels += labs
                self.values += values.astype(np.float64).tolist()
        else:
            with pytest.raises((InputShapeError, InputTypeError)):
                self.g.update(labels, values)
            assert self.g.compute() == before

    @rule()
    def reset(self) -> None:
        self.g.reset()
        self.labels, self.values, self.kind = [], [], None

    @rule()
    def pickle_round_trip(self) -> None:
        self.g = pickle.loads(pickle.dumps(self.g))

    @rule(labels=st.lists(st.integers(0, 4), max_size=10))
    def merge_ints(self, labels: list) -> None:
        other = GroupedStats()
        vals = [float(i) * 0.5 for i in range(len(labels))]
        other.update(np.array(labels, dtype=np.int64), np.array(vals))
        if self.kind in (None, "int") or not labels:
            self.g.merge(other)
            if labels:
                self.kind = "int"
                self.labels += labels
                self.values += vals
        else:
            with pytest.raises(InputTypeError):
                self.g.merge(other)

    @invariant()
    def matches_reference(self) -> None:
        table = self.g.compute()
        ref = reference_table(self.labels, self.values)
        assert isinstance(table, StatsTable) and len(table) == len(ref)
        for lab, entry in ref.items():
            row = table[lab]
            vals = entry["vals"]
            assert row.count == len(vals) and row.nonfinite == entry["bad"]
            if vals:
                scale = max(1.0, max(abs(v) for v in vals))
                assert row.mean == pytest.approx(sum(vals) / len(vals), rel=1e-9, abs=1e-9 * scale)
                assert (row.min, row.max) == (min(vals), max(vals))
                assert row.std >= 0.0
            else:
                assert math.isnan(row.mean)


AccumulatorMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=15, deadline=None,
                                                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestAccumulator = AccumulatorMachine.TestCase


@settings(max_examples=200, deadline=None)
@given(labels=arrays(LABEL_DTYPES), values=arrays(VALUE_DTYPES))
def test_update_never_raises_undocumented_errors(labels, values):
    g = GroupedStats()
    try:
        g.update(labels, values)
    except (InputShapeError, InputTypeError) as err:
        assert str(err)  # every error says what is wrong
        return
    table = g.compute()
    assert int(table.count.sum() + table.nonfinite.sum()) == len(labels)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    labels=st.one_of(st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=8),
                     st.lists(st.text(min_size=1, max_size=6).map(lambda s: s.rstrip("\x00") or "x"), min_size=1, max_size=8)),
    values=st.lists(st.one_of(st.floats(-1e9, 1e9), st.sampled_from([math.nan, math.inf])), min_size=8, max_size=8),
    steps=st.lists(st.integers(0, 10**6), min_size=1, max_size=3, unique=True),
)
def test_file_sinks_round_trip_through_stats_history(tmp_path_factory, labels, values, steps):
    """Any table written by CSVSink/JSONLSink reads back equal through StatsHistory.from_file
    (hostile names with commas, quotes and newlines included)."""
    from labeltrack_log import StatsHistory
    from labeltrack_log.sinks.files import CSVSink, JSONLSink

    g = GroupedStats()
    g.update(labels, values[: len(labels)])
    table = g.compute()
    out = tmp_path_factory.mktemp("rt")
    for cls, suffix in ((CSVSink, "csv"), (JSONLSink, "jsonl")):
        path = out / f"s.{suffix}"
        with cls(path, label_names={lab: f"n{i},\"\n" for i, lab in enumerate(table.labels.tolist())}) as sink:
            for step in sorted(steps):
                sink.log_stats(table, step=step, name="ce, \"x\"", mode="eval")
        history = StatsHistory.from_file(path)
        assert history.steps("ce, \"x\"", "eval") == sorted(steps)
        back = history.latest()
        # JSON keeps the label type; CSV has none, so string labels that all look like ints come back as ints
        key = (lambda lab: lab) if suffix == "jsonl" else str
        assert sorted(map(key, back.labels.tolist()), key=str) == sorted(map(key, table.labels.tolist()), key=str)
        lookup = {key(lab): lab for lab in back.labels.tolist()}
        for row in table:
            got = back[lookup[key(row.label)]]
            assert (got.count, got.nonfinite) == (row.count, row.nonfinite)
            for stat in ("mean", "std", "min", "max"):
                a, b = getattr(row, stat), getattr(got, stat)
                assert (math.isnan(a) and math.isnan(b)) or a == b, (suffix, stat, a, b)
