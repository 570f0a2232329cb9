"""Quantiles in every sink (issue 13), read back from the real backends: a real tensorboard server
(HTTP API: scalars and the Custom Scalars layout), an sqlite MLflow store, CSV/JSONL files through
StatsHistory.from_file, the median of medians over the label budget, and the Tracker/FE pass-through."""

from __future__ import annotations

import csv
import json
import logging
import math
import urllib.parse
import urllib.request

import numpy as np
import pytest

import servers  # noqa: E402  (tests/ is on sys.path via conftest)
from polling import wait_for  # noqa: E402
from labeltrack_log import ConfigError, GroupedStats, StatsHistory, Tracker
from labeltrack_log.naming import SUMMARY, quantile_stat, quantile_stats, stat_level
from labeltrack_log.sinks import apply_budget
from labeltrack_log.sinks.files import CSVSink, JSONLSink

LEVELS = (0.1, 0.25, 0.5, 0.75, 0.9)
QSTATS = ("p10", "p25", "p50", "p75", "p90")


def quantile_table(seed: int = 0, labels: int = 3, n: int = 600):
    rng = np.random.default_rng(seed)
    g = GroupedStats(quantiles=LEVELS)
    y = rng.integers(0, labels, n)
    g.update(y, rng.gamma(1.0 + y, 0.5))
    return g.compute()


# ---------------------------------------------------------------------------- naming
@pytest.mark.parametrize("q,name", [(0.1, "p10"), (0.25, "p25"), (0.5, "p50"), (0.9, "p90"), (0.05, "p5"),
                                    (0.999, "p99.9"), (0.0001, "p0.01"), (0.333, "p33.3")])
def test_quantile_stat_names_round_trip(q, name):
    assert quantile_stat(q) == name
    assert stat_level(name) == pytest.approx(q)


@pytest.mark.parametrize("text", ["mean", "p", "p100", "p0", "p50x", "p05", "P50", "p1e3"])
def test_other_stat_names_are_not_levels(text):
    assert stat_level(text) is None


def test_quantile_stats_in_level_order():
    assert quantile_stats(LEVELS) == QSTATS and quantile_stats(()) == ()


# ------------------------------------------------------------------------------ files
@pytest.mark.parametrize("cls,suffix", [(CSVSink, "csv"), (JSONLSink, "jsonl")])
def test_files_have_quantile_columns_read_back_exactly(tmp_path, cls, suffix):
    t1, t2 = quantile_table(1), quantile_table(2)
    path = tmp_path / f"stats.{suffix}"
    with cls(path) as sink:
        sink.log_stats(t1, step=1, name="ce", mode="eval")
        sink.log_stats(t2, step=2, name="ce", mode="eval")
    if suffix == "csv":
        with open(path, newline="") as fh:
            header = next(csv.reader(fh))
        assert header[-5:] == list(QSTATS)
    else:
        first = json.loads(path.read_text().splitlines()[0])
        assert [k for k in first if k.startswith("p")] == list(QSTATS)
    h = StatsHistory.from_file(path)
    for step, table in ((1, t1), (2, t2)):
        got = dict(h.items("ce", "eval"))[step]
        assert got.quantile_levels == LEVELS
        for q in LEVELS:
            np.testing.assert_array_equal(got.quantile(q), table.quantile(q))  # repr floats: exact


def test_files_without_quantiles_keep_their_schema(tmp_path):
    g = GroupedStats()
    g.update([0, 1], [1.0, 2.0])
    with CSVSink(tmp_path / "a.csv") as sink:
        sink.log_stats(g.compute(), step=1, name="ce", mode="eval")
    with open(tmp_path / "a.csv", newline="") as fh:
        assert next(csv.reader(fh))[-1] == "nonfinite"
    assert StatsHistory.from_file(tmp_path / "a.csv").latest().quantile_levels == ()


def test_csv_appending_keeps_the_existing_header_and_warns_on_other_levels(tmp_path, caplog):
    path = tmp_path / "s.csv"
    with CSVSink(path) as sink:
        sink.log_stats(quantile_table(1), step=1, name="ce", mode="eval")
    with CSVSink(path) as sink:  # a second run appends under the same header
        sink.log_stats(quantile_table(2), step=2, name="ce", mode="eval")
    h = StatsHistory.from_file(path)
    assert [s for s, _ in h.items("ce", "eval")] == [1, 2]
    np.testing.assert_array_equal(h.latest("ce", "eval").quantile(0.5), quantile_table(2).quantile(0.5))
    other = GroupedStats(quantiles=(0.5, 0.99))
    other.update([0], [1.0])
    with caplog.at_level(logging.WARNING), CSVSink(path) as sink:
        sink.log_stats(other.compute(), step=3, name="ce", mode="eval")
    assert "quantile columns" in caplog.text
    last = StatsHistory.from_file(path).latest("ce", "eval")
    assert last.quantile_levels == LEVELS and last.quantile(0.5)[0] == other.compute().quantile(0.5)[0]
    assert math.isnan(last.quantile(0.1)[0])


# --------------------------------------------------------------------- label budget
def test_over_budget_aggregates_include_the_median_of_medians():
    t = quantile_table(3, labels=40, n=4000)
    view = apply_budget(t, 5)
    assert view.over_budget
    assert view.aggregates["median_of_medians"] == float(np.median(t.quantile(0.5)))
    plain = GroupedStats()
    plain.update([0], [1.0])
    assert "median_of_medians" not in apply_budget(plain.compute(), 5).aggregates


# ------------------------------------------------------------------------ TensorBoard
def _get(url: str, path: str, **params):
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(params)}", timeout=10) as r:
        return json.loads(r.read())


def test_tensorboard_quantile_tags_and_margin_chart(tmp_path):
    pytest.importorskip("tensorboard")
    from labeltrack_log.sinks.tensorboard import TensorBoardSink

    root = tmp_path / "tb"
    root.mkdir()
    t0, t1 = quantile_table(4, labels=3, n=300), quantile_table(5, labels=30, n=3000)
    with TensorBoardSink(root, run_name="q", label_budget=3) as sink:
        sink.log_stats(t0, step=0, name="ce", mode="train")
        sink.log_stats(t1, step=1, name="ce", mode="train")  # over budget: median of medians
    tb = servers.tensorboard_server(root, tmp_path / "tb.log")
    try:
        for j, (q, stat) in enumerate(zip(LEVELS, QSTATS)):
            got = wait_for(lambda: _get(tb.url, "/data/plugin/scalars/scalars", run="q/train", tag=f"ce/1/{stat}"),
                           lambda r: len(r) == 2, f"ce/1/{stat}")
            assert [p[1] for p in got] == [0, 1]
            assert got[0][2] == float(np.float32(t0.quantile(q)[1]))
            assert got[1][2] == float(np.float32(t1.quantile(q)[1]))
        mom = _get(tb.url, "/data/plugin/scalars/scalars", run="q/train", tag=f"ce/{SUMMARY}/median_of_medians")
        assert [p[1] for p in mom] == [0, 1] and mom[1][2] == float(np.float32(np.median(t1.quantile(0.5))))
        cat = wait_for(lambda: next(c for c in _get(tb.url, "/data/plugin/custom_scalars/layout")["category"] if c["title"] == "ce"),
                       lambda c: True, "the ce layout")
        charts = {c["title"]: c["margin"]["series"] for c in cat["chart"] if "margin" in c}
        assert charts["2: median with p10..p90"] == [{"value": "ce/2/p50", "lower": "ce/2/p10", "upper": "ce/2/p90"}]
    finally:
        tb.stop()


# ----------------------------------------------------------------------------- MLflow
def test_mlflow_quantile_keys_in_an_sqlite_store(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from labeltrack_log.sinks.mlflow import MLflowSink

    t = quantile_table(6, labels=2, n=200)
    uri = f"sqlite:///{(tmp_path / 'm.db').as_posix()}"
    with MLflowSink(uri, experiment="quantiles") as sink:
        sink.log_stats(t, step=3, name="ce", mode="eval")
    run_id = sink.run_id  # after close (inside, it waits `timeout`, 5 s: a first sqlite store can take longer)
    client = MlflowClient(uri)
    for q, stat in zip(LEVELS, QSTATS):
        hist = client.get_metric_history(run_id, f"ce/eval/1/{stat}")
        assert [(m.step, m.value) for m in hist] == [(3, float(t.quantile(q)[1]))]
    assert client.get_metric_history(run_id, f"ce/eval/{SUMMARY}/median_of_medians")[0].value == float(np.median(t.quantile(0.5)))


# --------------------------------------------------------------------------- Tracker
def test_tracker_passes_levels_to_every_mode(tmp_path):
    path = tmp_path / "t.jsonl"
    tr = Tracker("ce_by_y", sinks=[JSONLSink(path)], figures=None, quantiles=[0.9, 0.5, 0.1])
    rng = np.random.default_rng(7)
    for mode in ("train", "eval"):
        tr.update(rng.integers(0, 3, 100), rng.random(100), mode=mode)
    tables = tr.end_epoch(1)
    tr.close()
    assert tr.quantiles == (0.1, 0.5, 0.9)
    for mode in ("train", "eval"):
        assert tables[mode].quantile_levels == (0.1, 0.5, 0.9)
    h = StatsHistory.from_file(path)
    np.testing.assert_array_equal(h.latest("ce_by_y", "eval").quantile(0.5), tables["eval"].quantile(0.5))


def test_tracker_refuses_bad_levels_at_construction():
    with pytest.raises(ConfigError, match="quantiles: expected levels strictly between 0 and 1"):
        Tracker("x", sinks=[], quantiles=(0.5, 2.0))


def test_fe_trace_passes_levels_on():
    pytest.importorskip("fastestimator")
    from labeltrack_log.fastestimator import LabelTracker

    trace = LabelTracker(label="y", metric="ce", sinks=None, quantiles=(0.25, 0.75))
    assert trace._tracker.quantiles == (0.25, 0.75)


def test_fe_trace_bound_quantile_writes_a_summary_key_with_median_and_outer_levels(tmp_path):
    pytest.importorskip("fastestimator")
    from test_fe_parity import drive, torch_float_epochs

    from labeltrack_log.fastestimator import LabelTracker

    path = tmp_path / "q.jsonl"
    trace = LabelTracker("y", "acc", outputs="out", mode=["train", "eval"], bounds=["quantile", "std"],
                         sinks={"type": "jsonl", "path": str(path)}, figures="end")
    response, _ = drive(trace, torch_float_epochs())
    assert trace._tracker.quantiles == LEVELS  # the default levels of bounds="quantile"
    h = StatsHistory.from_file(path)
    checked = 0
    for summary in response["out"]:
        for mode, keys in summary.history.items():
            series = keys["acc (p10, median, p90)"]
            for step, v in series.items():
                table = dict(h.items("out", mode))[step]
                row = table[int(summary.name)] if not isinstance(summary.name, str) or summary.name.isdigit() else table[summary.name]
                assert (v.y_min, v.y, v.y_max) == (row.quantiles[0.1], row.quantiles[0.5], row.quantiles[0.9])
                checked += 1
    assert checked > 0


# ------------------------------------------------------------------------ ci in sinks
def zero_one_table(seed: int = 0):
    rng = np.random.default_rng(seed)
    g = GroupedStats()
    y = rng.integers(0, 3, 300)
    correct = (rng.random(300) < 0.3 + 0.2 * y).astype(float)
    correct[y == 2] = 0.5 * correct[y == 2] + 0.25  # label 2 is not a 0/1 metric
    g.update(y, correct)
    return g.compute()


def test_tensorboard_ci_tags_and_margin_chart_for_zero_one_labels(tmp_path):
    pytest.importorskip("tensorboard")
    from labeltrack_log.sinks.tensorboard import TensorBoardSink

    root = tmp_path / "tb"
    root.mkdir()
    t = zero_one_table()
    lo, hi = t.confidence_interval()
    with TensorBoardSink(root, run_name="ci") as sink:
        sink.log_stats(t, step=4, name="acc", mode="eval")
    tb = servers.tensorboard_server(root, tmp_path / "tb.log")
    try:
        for r in (0, 1):
            for stat, want in (("ci_low", lo[r]), ("ci_high", hi[r])):
                got = wait_for(lambda: _get(tb.url, "/data/plugin/scalars/scalars", run="ci/eval", tag=f"acc/{r}/{stat}"),
                               lambda res: len(res) == 1, f"acc/{r}/{stat}")
                assert got[0][1] == 4 and got[0][2] == float(np.float32(want))
        tags = _get(tb.url, "/data/plugin/scalars/tags")["ci/eval"]
        assert "acc/2/ci_low" not in tags  # not a 0/1 label
        cat = wait_for(lambda: next(c for c in _get(tb.url, "/data/plugin/custom_scalars/layout")["category"] if c["title"] == "acc"),
                       lambda c: True, "the acc layout")
        charts = {c["title"]: c["margin"]["series"] for c in cat["chart"] if "margin" in c}
        assert charts["1: mean with 95% CI"] == [{"value": "acc/1/mean", "lower": "acc/1/ci_low", "upper": "acc/1/ci_high"}]
        assert "2: mean with 95% CI" not in charts
    finally:
        tb.stop()


def test_mlflow_ci_keys_for_zero_one_labels(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from labeltrack_log.sinks.mlflow import MLflowSink

    t = zero_one_table(1)
    lo, hi = t.confidence_interval()
    uri = f"sqlite:///{(tmp_path / 'm.db').as_posix()}"
    with MLflowSink(uri, experiment="ci") as sink:
        sink.log_stats(t, step=2, name="acc", mode="eval")
    run_id = sink.run_id  # after close (inside, it waits `timeout`, 5 s: a first sqlite store can take longer)
    client = MlflowClient(uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "acc/eval/0/ci_low")] == [(2, float(lo[0]))]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "acc/eval/1/ci_high")] == [(2, float(hi[1]))]
    assert client.get_metric_history(run_id, "acc/eval/2/ci_low") == []


# ------------------------------------------------------------------ TensorBoard histograms
def test_tensorboard_histograms_from_the_sketch_buckets(tmp_path):
    pytest.importorskip("tensorboard")
    from labeltrack_log.sinks.tensorboard import TensorBoardSink

    root = tmp_path / "tb"
    root.mkdir()
    rng = np.random.default_rng(8)
    y = rng.integers(0, 3, 3000)
    v = rng.gamma(2.0, 0.5, 3000) * np.where(y == 2, -1, 1)  # label 2 negative
    v[:50] = 0.0
    sink = TensorBoardSink(root, run_name="h", histograms=True, label_budget=2)
    tr = Tracker("ce", sinks=[sink], quantiles=LEVELS, figures=None)
    for step in (1, 2):
        tr.update(y, v * step, mode="eval")
        tr.end_epoch(step)
    tr.close()
    assert tr.history.latest("ce", "eval").histograms is None  # the history does not keep the buckets
    tb = servers.tensorboard_server(root, tmp_path / "tb.log")
    try:
        for lab in (0, 1):  # the budgeted labels
            got = wait_for(lambda: _get(tb.url, "/data/plugin/histograms/histograms", run="h/eval", tag=f"ce/{lab}/histogram"),
                           lambda r: len(r) == 2, f"histogram of label {lab}")
            for (_, step, buckets) in got:
                x = np.sort(v[y == lab] * step)
                assert [b[1] for b in got] == [1, 2]
                total = sum(c for _, _, c in buckets)
                assert total == pytest.approx(len(x))
                # every bucket holds the samples between its edges (up to the sketch's relative accuracy)
                for left, right, c in buckets:
                    if c:
                        inside = np.count_nonzero((x >= left * (1 - 0.011) - 1e-12) & (x <= right * (1 + 0.011) + 1e-12))
                        assert inside >= c
                assert buckets[0][0] <= x[0] * 1.011 + 1e-12 and buckets[-1][1] >= x[-1] * 0.989
        tags = _get(tb.url, "/data/plugin/histograms/tags")["h/eval"]
        assert "ce/2/histogram" not in tags  # over the label budget: no per-label histogram
    finally:
        tb.stop()


def test_tensorboard_histograms_without_quantiles_warn_once(tmp_path, caplog):
    pytest.importorskip("tensorboard")
    from labeltrack_log.sinks.tensorboard import TensorBoardSink

    g = GroupedStats()
    g.update([0, 1], [1.0, 2.0])
    with caplog.at_level(logging.WARNING), TensorBoardSink(tmp_path / "w", histograms=True) as sink:
        sink.log_stats(g.compute(), step=1, name="ce", mode="eval")
        sink.log_stats(g.compute(), step=2, name="ce", mode="eval")
    assert caplog.text.count("has no sketch buckets") == 1


# ------------------------------------------------ the full table over the label budget
def _markdown_rows(text: str) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows as dicts) of the markdown table in a TensorBoard text summary."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return split[0], [dict(zip(split[0], cells)) for cells in split[1:]]


def _tb_table_text(logdir, mode: str, tag: str) -> str:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir / mode), size_guidance={"tensors": 0}).Reload()
    (event,) = acc.Tensors(tag)
    return event.tensor_proto.string_val[0].decode("utf-8")


def test_tensorboard_table_over_the_budget_shows_median_and_outer_levels(tmp_path):
    pytest.importorskip("tensorboard")
    from labeltrack_log.sinks.tensorboard import TensorBoardSink

    t = quantile_table(9, labels=150, n=15000)
    with TensorBoardSink(tmp_path / "tb", run_name="r", label_budget=5) as sink:
        sink.log_stats(t, step=3, name="ce", mode="eval")
        bound = sink.table_rows
    header, rows = _markdown_rows(_tb_table_text(tmp_path / "tb" / "r", "eval", "ce/table"))
    assert header == ["label", "count", "mean", "std", "min", "max", "nonfinite", "p10", "p50", "p90"]
    assert len(rows) == bound == 100  # still the 100-row bound
    index = {lab: i for i, lab in enumerate(t.labels.tolist())}
    for row in rows:
        i = index[int(row["label"])]
        for q, stat in ((0.1, "p10"), (0.5, "p50"), (0.9, "p90")):
            assert row[stat] == f"{t.quantile(q)[i]:.6g}"


def test_tensorboard_table_shows_the_ci_of_zero_one_labels_only(tmp_path):
    pytest.importorskip("tensorboard")
    from labeltrack_log.sinks.tensorboard import TensorBoardSink

    t = zero_one_table(2)  # labels 0 and 1 are 0/1, label 2 is not
    lo, hi = t.confidence_interval()
    with TensorBoardSink(tmp_path / "tb", run_name="r", label_budget=1) as sink:
        sink.log_stats(t, step=1, name="acc", mode="eval")
    header, rows = _markdown_rows(_tb_table_text(tmp_path / "tb" / "r", "eval", "acc/table"))
    assert header[-2:] == ["ci_low", "ci_high"] and not any(h.startswith("p") for h in header)
    by_label = {int(r["label"]): r for r in rows}
    for lab in (0, 1):
        assert (by_label[lab]["ci_low"], by_label[lab]["ci_high"]) == (f"{lo[lab]:.6g}", f"{hi[lab]:.6g}")
    assert by_label[2]["ci_low"] == by_label[2]["ci_high"] == ""


def test_tensorboard_table_without_quantiles_keeps_its_columns(tmp_path):
    pytest.importorskip("tensorboard")
    from labeltrack_log.sinks.tensorboard import TensorBoardSink

    g = GroupedStats()
    g.update(np.arange(10), np.linspace(0.5, 3.0, 10))
    with TensorBoardSink(tmp_path / "tb", run_name="r", label_budget=2) as sink:
        sink.log_stats(g.compute(), step=1, name="ce", mode="eval")
    header, rows = _markdown_rows(_tb_table_text(tmp_path / "tb" / "r", "eval", "ce/table"))
    assert header == ["label", "count", "mean", "std", "min", "max", "nonfinite"] and len(rows) == 10


def test_mlflow_table_artifact_has_the_csv_sinks_columns_and_reads_back(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from labeltrack_log.cli import main
    from labeltrack_log.sinks.mlflow import MLflowSink

    t = quantile_table(10, labels=30, n=3000)
    uri = f"sqlite:///{(tmp_path / 'm.db').as_posix()}"
    with MLflowSink(uri, experiment="table", label_budget=5) as sink:
        sink.log_stats(t, step=4, name="ce", mode="eval")
    run_id = sink.run_id  # after close (inside, it waits `timeout`, 5 s: a first sqlite store can take longer)
    with CSVSink(tmp_path / "sink.csv") as csv_sink:
        csv_sink.log_stats(t, step=4, name="ce", mode="eval")
    client = MlflowClient(uri)
    assert [f.path for f in client.list_artifacts(run_id, "tables")] == ["tables/ce_eval_step4.csv"]
    local = client.download_artifacts(run_id, "tables/ce_eval_step4.csv", str(tmp_path))
    with open(local, newline="") as fh, open(tmp_path / "sink.csv", newline="") as fh2:
        header, sink_header = next(csv.reader(fh)), next(csv.reader(fh2))
    assert header == sink_header and header[-5:] == list(QSTATS)  # the CSVSink's columns, one code path
    got = StatsHistory.from_file(local).latest("ce", "eval")
    np.testing.assert_array_equal(got.labels, t.labels)
    assert got.quantile_levels == LEVELS
    for q in LEVELS:
        np.testing.assert_array_equal(got.quantile(q), t.quantile(q))  # repr floats: exact
    assert main(["render", local, "-o", str(tmp_path / "png"), "--bound", "quantile"]) == 0
    assert list((tmp_path / "png").glob("*.png"))
