"""StatsHistory: appending, bounded thinning, dense matrices and loading the file sinks' output."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labeltrack_log import GroupedStats, StatsHistory
from labeltrack_log.history import FILE_COLUMNS, natural_key

from tables import table  # noqa: E402  (tests/ is on sys.path, see conftest.py)


# ------------------------------------------------------------------ basics
def test_append_and_query_per_name_and_mode():
    h = StatsHistory()
    g = GroupedStats()
    for step in (10, 20, 30):
        g.update([0, 1, 1, 2], [1.0 / step, 2.0, 4.0, 0.5])
        h.append(g.compute(), step=step, name="ce", mode="train")
        g.reset()
    h.append(table([0, 1], [0.3, 0.4]), step=30, name="ce", mode="eval")
    h.append(table(["a"], [0.9]), step=5, name="acc", mode="eval")
    assert h.names() == ["ce", "acc"]
    assert h.modes() == ["train", "eval"]
    assert h.modes("ce") == ["train", "eval"] and h.modes("acc") == ["eval"]
    assert list(h) == [("ce", "train"), ("ce", "eval"), ("acc", "eval")]
    assert h.steps("ce", "train") == [10, 20, 30]
    assert [t[1].mean for t in h.tables("ce", "train")] == [3.0, 3.0, 3.0]
    assert h.latest("ce", "train")[0].mean == pytest.approx(1 / 30)
    assert h.latest("acc").labels.tolist() == ["a"]  # the only mode of "acc" may be omitted
    assert [s for s, _ in h.items("ce", "eval")] == [30]
    merged = StatsHistory(max_steps=2)
    merged.extend(h)
    assert list(merged) == list(h) and merged.steps("ce", "train") == [10, 30]  # thinned to its own limit
    assert merged.latest("ce", "train") == h.latest("ce", "train")


def test_same_step_again_replaces_the_latest_and_steps_must_not_decrease():
    h = StatsHistory()
    h.append(table([0], [1.0]), step=1, name="m", mode="train")
    h.append(table([0], [2.0]), step=1, name="m", mode="train")
    assert h.steps() == [1] and h.latest().mean.tolist() == [2.0]
    with pytest.raises(ValueError, match=r"expected step >= 1 .*got 0"):
        h.append(table([0], [1.0]), step=0, name="m", mode="train")
    h.append(table([0], [1.0]), step=0, name="m", mode="eval")  # other modes count separately
    assert h.steps("m", "eval") == [0]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"table": [1, 2], "step": 1}, TypeError, "expected a StatsTable, got list"),
        ({"step": 1.5}, TypeError, "expected an int step, got 1.5"),
        ({"step": True}, TypeError, "expected an int step"),
        ({"step": 1, "name": ""}, TypeError, "non-empty string name"),
        ({"step": 1, "mode": None}, TypeError, "non-empty string mode"),
    ],
)
def test_append_rejects_bad_arguments(kwargs, error, match):
    args = {"table": table([0], [1.0]), "name": "m", "mode": "train", **kwargs}
    with pytest.raises(error, match=match):
        StatsHistory().append(args.pop("table"), **args)


def test_append_rejects_a_change_of_label_kind():
    h = StatsHistory()
    h.append(table([0, 1], [1.0, 2.0]), step=1, name="m", mode="train")
    with pytest.raises(TypeError, match="expected number labels .* got string labels"):
        h.append(table(["a"], [1.0]), step=2, name="m", mode="train")


def test_max_steps_must_be_at_least_two():
    with pytest.raises(ValueError, match="max_steps: expected an int >= 2, got 1"):
        StatsHistory(max_steps=1)


def test_resolve_lists_the_choices():
    h = StatsHistory()
    with pytest.raises(ValueError, match="StatsHistory is empty"):
        h.steps()
    h.append(table([0], [1.0]), step=1, name="ce", mode="train")
    h.append(table([0], [1.0]), step=1, name="ce", mode="eval")
    h.append(table([0], [1.0]), step=1, name="acc", mode="eval")
    with pytest.raises(ValueError, match=r"several names, expected one of \['ce', 'acc'\], got None"):
        h.steps()
    with pytest.raises(ValueError, match=r"'ce' has several modes, expected one of \['train', 'eval'\]"):
        h.steps("ce")
    with pytest.raises(ValueError, match=r"name: expected one of \['ce', 'acc'\], got 'loss'"):
        h.steps("loss", "eval")
    with pytest.raises(ValueError, match=r"mode: expected one of \['eval'\] for name 'acc', got 'train'"):
        h.steps("acc", "train")
    assert h.resolve("acc") == ("acc", "eval")


# ---------------------------------------------------------------- thinning
def test_thinning_keeps_the_latest_first_and_an_even_spread():
    h = StatsHistory(max_steps=10)
    for step in range(1000):
        h.append(table([0], [float(step)]), step=step, name="m", mode="train")
        kept = h.steps()
        assert len(kept) <= 10
        assert kept[-1] == step and kept[0] == 0
    kept = h.steps()
    assert len(kept) >= 5
    gaps = np.diff(kept[:-1])
    assert len(set(gaps.tolist())) == 1  # evenly spaced, apart from the latest
    assert [t.mean[0] for t in h.tables()] == [float(s) for s in kept]  # tables stay aligned with steps


@settings(max_examples=60, deadline=None)
@given(limit=st.integers(2, 40), n=st.integers(1, 400))
def test_thinning_invariants(limit, n):
    h = StatsHistory(max_steps=limit)
    for step in range(n):
        h.append(table([0], [float(step)]), step=3 * step, name="m", mode="train")
    kept = h.steps()
    assert len(kept) <= limit
    assert kept[0] == 0 and kept[-1] == 3 * (n - 1)
    assert kept == sorted(set(kept))
    assert len(kept) >= min(n, limit // 2)
    assert [t.mean[0] for t in h.tables()] == [s / 3 for s in kept]


# ------------------------------------------------------------------ dense
def test_dense_has_nan_where_a_label_is_missing_and_natural_order():
    h = StatsHistory()
    h.append(table(["c10", "c2"], [1.0, 2.0], count=[5, 6]), step=1, name="m", mode="eval")
    h.append(table(["c1", "c10", "c2"], [0.5, 0.8, 1.5], count=[3, 4, 5], nonfinite=[0, 2, 0]), step=2, name="m", mode="eval")
    d = h.dense()
    assert d.labels.tolist() == ["c1", "c2", "c10"]  # digit-aware, not lexicographic
    assert d.steps.tolist() == [1, 2]
    np.testing.assert_array_equal(d.mean, [[np.nan, 0.5], [2.0, 1.5], [1.0, 0.8]])
    np.testing.assert_array_equal(d.count, [[np.nan, 3], [6, 5], [5, 4]])
    np.testing.assert_array_equal(d.nonfinite, [[np.nan, 0], [0, 0], [0, 2]])
    np.testing.assert_allclose(d.max - d.mean, np.where(np.isnan(d.mean), np.nan, 0.2))
    assert h.dense() is d  # cached
    h.append(table(["c1"], [0.1]), step=3, name="m", mode="eval")
    d3 = h.dense()
    assert d3 is not d and d3.mean.shape == (3, 3)
    assert np.isnan(d3.mean[1:, 2]).all() and d3.mean[0, 2] == 0.1
    with pytest.raises(ValueError):
        d3.mean[0, 0] = 1.0  # read-only: shared by the cache


def test_history_pickles_and_keeps_thinning_state():
    import pickle

    h = StatsHistory(max_steps=4)
    for step in range(9):
        h.append(table([0, 1], [step, step + 0.5]), step=step, name="m", mode="train")
    h.dense()
    h.label_names = {0: "cat"}
    copy = pickle.loads(pickle.dumps(h))
    assert copy.steps() == h.steps() and copy.label_names == {0: "cat"}
    assert all(a == b for a, b in zip(copy.tables(), h.tables()))
    np.testing.assert_array_equal(copy.dense().mean, h.dense().mean)
    for step in range(9, 20):  # both go on thinning identically
        for hist in (h, copy):
            hist.append(table([0, 1], [step, step + 0.5]), step=step, name="m", mode="train")
    assert copy.steps() == h.steps() and len(h.steps()) <= 4 and h.steps()[-1] == 19


def test_natural_key_orders_ints_numerically_and_strings_digit_aware():
    assert sorted([10, 2, -1], key=natural_key) == [-1, 2, 10]
    assert sorted(["b10", "b9", "a", "b"], key=natural_key) == ["a", "b", "b9", "b10"]


# --------------------------------------------------------------- from files
SCHEMA = list(FILE_COLUMNS)


def rows_for(history_spec):
    """Rows in the file-sink schema for {(name, mode): [(step, table), ...]} plus label names."""
    rows = []
    for (name, mode), items in history_spec.items():
        for step, t in items:
            for r in t:
                rows.append({
                    "wall_time": 1.7e9 + step, "name": name, "mode": mode, "step": step, "label": r.label,
                    "label_name": {0: "cat", 1: "dog"}.get(r.label, str(r.label)), "count": r.count, "mean": r.mean,
                    "std": r.std, "min": r.min, "max": r.max, "nonfinite": r.nonfinite,
                })
    return rows


def write_csv(path: Path, rows) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(SCHEMA)
        for row in rows:
            w.writerow(["nan" if isinstance(row[c], float) and math.isnan(row[c]) else row[c] for c in SCHEMA])


def write_jsonl(path: Path, rows) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps({c: None if isinstance(row[c], float) and math.isnan(row[c]) else row[c] for c in SCHEMA}) + "\n")


SPEC = {
    ("ce", "train"): [
        (100, table([0, 1, 2], [1.5, 2.5, 0.7], count=[10, 0, 4], std=[0.2, np.nan, 0.0], nonfinite=[0, 3, 0])),
        (200, table([0, 1, 2, 11], [1.0, 2.0, 0.5, 3.0])),
    ],
    ("ce", "eval"): [(200, table([0, 1], [1.2, 2.2]))],
    ("acc", "eval"): [(7, table(["bird", "ship"], [0.9, 0.8]))],
}


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_from_file_round_trip(tmp_path, fmt):
    path = tmp_path / f"stats.{fmt}"
    (write_csv if fmt == "csv" else write_jsonl)(path, rows_for(SPEC))
    h = StatsHistory.from_file(path)
    assert list(h) == list(SPEC)
    for (name, mode), items in SPEC.items():
        assert h.steps(name, mode) == [s for s, _ in items]
        for got, (_, want) in zip(h.tables(name, mode), items):
            assert got == want  # NaN-aware equality of every column
    assert h.latest("ce", "train").labels.dtype == np.int64  # integer labels come back as ints
    assert h.latest("ce", "train").labels.tolist() == [0, 1, 2, 11]  # numeric order, not "11" < "2"
    assert h.latest("acc").labels.tolist() == ["bird", "ship"]
    assert h.label_names == {0: "cat", 1: "dog"}


def test_from_file_sniffs_unknown_suffixes_and_later_rows_win(tmp_path):
    rows = rows_for({("m", "train"): [(1, table([0], [1.0])), (2, table([0], [2.0]))]})
    rows.append(dict(rows[-1], mean=5.0))  # a resumed run wrote step 2 again
    write_jsonl(tmp_path / "log.txt", rows)
    write_csv(tmp_path / "log.data", rows)
    for name in ("log.txt", "log.data"):
        h = StatsHistory.from_file(tmp_path / name)
        assert h.steps() == [1, 2] and h.latest().mean.tolist() == [5.0]


def test_from_file_honours_max_steps(tmp_path):
    spec = {("m", "train"): [(s, table([0, 1], [s, s + 1.0])) for s in range(50)]}
    write_csv(tmp_path / "s.csv", rows_for(spec))
    h = StatsHistory.from_file(tmp_path / "s.csv", max_steps=8)
    assert len(h.steps()) <= 8 and h.steps()[-1] == 49


def test_from_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("name,mode,step,label,mean\nm,train,1,0,0.5\n")
    with pytest.raises(ValueError, match=r"expected CSV columns .*missing \['count', 'std', 'min', 'max'\]"):
        StatsHistory.from_csv(bad)
    rows = rows_for({("m", "train"): [(1, table([0], [1.0]))]})
    rows[0]["mean"] = "high"
    write_csv(tmp_path / "word.csv", rows)
    with pytest.raises(ValueError, match=r"word.csv:2: column 'mean': expected a number or nan, got 'high'"):
        StatsHistory.from_file(tmp_path / "word.csv")
    (tmp_path / "broken.jsonl").write_text('{"name": "m"\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:1: expected one JSON object per line"):
        StatsHistory.from_file(tmp_path / "broken.jsonl")
    (tmp_path / "keys.jsonl").write_text('{"name": "m", "mode": "train"}\n')
    with pytest.raises(ValueError, match=r"keys.jsonl:1: expected keys .*missing \['step'"):
        StatsHistory.from_file(tmp_path / "keys.jsonl")
    with pytest.raises(FileNotFoundError):
        StatsHistory.from_file(tmp_path / "nope.csv")


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_from_file_reads_what_the_file_sinks_write(tmp_path, kind):
    files = pytest.importorskip("labeltrack_log.sinks.files", reason="sinks/files.py is not written yet")
    from labeltrack_log.sinks import make_sinks

    path = tmp_path / f"out.{kind}"
    (sink,) = make_sinks([{"type": kind, "path": str(path)}])
    assert isinstance(sink, (files.CSVSink, files.JSONLSink))
    want = StatsHistory()
    g = GroupedStats()
    rng = np.random.default_rng(0)
    for step in (1, 2, 3):
        g.update(rng.integers(0, 4, 200), rng.gamma(2.0, 1.0 / step, 200))
        t = g.compute()
        g.reset()
        sink.log_stats(t, step=step, name="ce", mode="eval")
        want.append(t, step=step, name="ce", mode="eval")
    sink.close()
    got = StatsHistory.from_file(path)
    assert got.steps() == want.steps()
    for a, b in zip(got.tables(), want.tables()):
        assert a.labels.tolist() == b.labels.tolist()
        np.testing.assert_array_equal(a.count, b.count)
        for col in ("mean", "std", "min", "max"):
            np.testing.assert_allclose(getattr(a, col), getattr(b, col), rtol=1e-9)


def test_history_module_imports_numpy_only():
    code = (
        "import sys; import labeltrack_log; h = labeltrack_log.StatsHistory(); import labeltrack_log.history;"
        "bad = [m for m in ('matplotlib', 'tensorflow', 'torch', 'mlflow', 'tensorboard', 'fastestimator') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_csv_string_labels_that_look_like_ints_stay_distinct(tmp_path):
    from labeltrack_log import GroupedStats
    from labeltrack_log.sinks.files import CSVSink

    g = GroupedStats()
    g.update(["01", "1", "007"], [1.0, 2.0, 3.0])
    with CSVSink(tmp_path / "a.csv") as sink:
        sink.log_stats(g.compute(), step=1, name="x", mode="eval")
    table = StatsHistory.from_file(tmp_path / "a.csv").latest()
    assert sorted(table.labels.tolist()) == ["007", "01", "1"] and table["01"].mean == 1.0
