"""MLflowSink against a real `mlflow server` (read back through its REST API) and the embedded sqlite store."""

from __future__ import annotations

import io
import json
import logging
import math
import pickle
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlflow")

from labeltrack_log import ConfigError, GroupedStats, StatsTable  # noqa: E402
from labeltrack_log.naming import SUMMARY, mlflow_key  # noqa: E402
from labeltrack_log.sinks.mlflow import MLflowSink  # noqa: E402
from polling import open_run_id  # noqa: E402  (tests/ is on sys.path via conftest)

STATS = ("mean", "std", "min", "max", "count")
AGGREGATES = ("macro_mean", "worst_mean", "best_mean", "spread", "num_labels", "nonfinite")


# ------------------------------------------------------------------ REST read-back helpers
def rest(url: str, endpoint: str, **params) -> dict:
    query = urllib.parse.urlencode(params, doseq=True)
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{endpoint}?{query}", timeout=30) as r:
        return json.load(r)


def history(url: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every stored value of ``key``, in stored order (all pages)."""
    out, token = [], None
    while True:
        params = {"run_id": run_id, "metric_key": key, "max_results": 25000, **({"page_token": token} if token else {})}
        data = rest(url, "metrics/get-history", **params)
        out += [(int(m["step"]), float(m["value"])) for m in data.get("metrics", [])]
        token = data.get("next_page_token")
        if not token:
            return out


def get_run(url: str, run_id: str) -> dict:
    return rest(url, "runs/get", run_id=run_id)["run"]


def metric_keys(url: str, run_id: str) -> set[str]:
    return {m["key"] for m in get_run(url, run_id)["data"].get("metrics", [])}


def artifacts(url: str, run_id: str, path: str) -> list[str]:
    return [f["path"] for f in rest(url, "artifacts/list", run_id=run_id, path=path).get("files", [])]


def get_artifact(url: str, run_id: str, path: str) -> bytes:
    query = urllib.parse.urlencode({"run_id": run_id, "path": path})
    with urllib.request.urlopen(f"{url}/get-artifact?{query}", timeout=30) as r:
        return r.read()


def reference(labels: np.ndarray, values: np.ndarray) -> dict:
    """numpy reference statistics per label: {label: {stat: value}}."""
    out = {}
    for lab in np.unique(labels):
        v = values[labels == lab]
        out[lab.item()] = {"mean": v.mean(), "std": v.std(ddof=1) if len(v) > 1 else 0.0, "min": v.min(),
                           "max": v.max(), "count": float(len(v))}
    return out


def figure(seed: int):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2), dpi=50)
    fig.add_subplot().plot(np.random.default_rng(seed).random(5))
    return fig


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("delivery", ["process", "inline"])
def test_values_and_steps_per_label_and_aggregates(mlflow_server, delivery):
    url, rng = mlflow_server.url, np.random.default_rng(0)
    data = {}
    with MLflowSink(url, experiment="values", label_budget=300, delivery=delivery) as sink:
        assert sink.delivery == delivery
        for step in (1, 2, 5):
            labels, values = rng.integers(0, 250, 5000), rng.normal(step, 1.0, 5000)
            values[:3] = np.nan  # counted as nonfinite, excluded from the statistics
            g = GroupedStats()
            g.update(labels, values)
            sink.log_stats(g.compute(), step=step, name="ce", mode="eval")
            data[step] = (labels[3:], values[3:], labels[:3])
    run_id = sink.run_id  # after close: inside, it waits only `timeout` for the run
    keys = metric_keys(url, run_id)
    assert len(keys) > 1000  # more than one request's worth: the sink chunked it
    for lab in (0, 17, 249):
        for stat in STATS:
            got = history(url, run_id, mlflow_key("ce", "eval", str(lab), stat))
            want = [(step, reference(labs, vals)[lab][stat]) for step, (labs, vals, _) in data.items()]
            assert [s for s, _ in got] == [1, 2, 5]
            np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-12)
    # nonfinite: only for the labels that had a NaN
    nan_labels = {int(lab) for step in data for lab in data[step][2]}
    nonfinite_keys = {k for k in keys if k.endswith("/nonfinite") and SUMMARY not in k}
    assert nonfinite_keys == {mlflow_key("ce", "eval", str(lab), "nonfinite") for lab in nan_labels}
    # aggregates across labels, every step
    for stat in AGGREGATES:
        assert [s for s, _ in history(url, run_id, mlflow_key("ce", "eval", SUMMARY, stat))] == [1, 2, 5]
    labs, vals, _ = data[2]
    ref = reference(labs, vals)
    means = np.array([ref[lab]["mean"] for lab in sorted(ref)])
    got = dict(history(url, run_id, mlflow_key("ce", "eval", SUMMARY, "macro_mean")))
    assert got[2] == pytest.approx(means.mean(), rel=1e-12)
    assert dict(history(url, run_id, mlflow_key("ce", "eval", SUMMARY, "worst_mean")))[2] == pytest.approx(means.max())
    assert dict(history(url, run_id, mlflow_key("ce", "eval", SUMMARY, "nonfinite")))[2] == 3.0
    assert get_run(url, run_id)["info"]["status"] == "FINISHED"


def test_keys_for_unicode_and_path_like_labels(mlflow_server):
    url = mlflow_server.url
    labels = ["../x", "a/b", "a_b", "C:\\x", "$\\mu$", "标签", "_summary", "x" * 300]  # a label's text, not the reserved SUMMARY
    g = GroupedStats()
    g.update(labels * 2, np.arange(2 * len(labels), dtype=float))
    table = g.compute()
    with MLflowSink(url, experiment="keys") as sink:
        sink.log_stats(table, step=3, name="loss by y", mode="train")
    run_id = sink.run_id  # after close: inside, it waits only `timeout` for the run
    keys = metric_keys(url, run_id)
    per_label = {lab: {mlflow_key("loss by y", "train", lab, s) for s in STATS} for lab in labels}
    assert set().union(*per_label.values()) <= keys
    prefixes = {next(iter(k)).rsplit("/", 1)[0] for k in per_label.values()}
    assert len(prefixes) == len(labels)  # collision-free, also "a/b" vs "a_b" and a label called _summary
    assert "loss by y/train/标签/mean" in keys  # readable: unicode letters are kept
    assert "loss by y/train/a_b/mean" in keys  # a safe label is unchanged
    assert all(k.count("/") == 3 and len(k) <= 250 for k in keys)  # one level per component
    for lab in labels:
        got = history(url, run_id, mlflow_key("loss by y", "train", lab, "mean"))
        assert got == [(3, pytest.approx(table[lab].mean))]
    # deterministic: another sink builds the same keys
    with MLflowSink(url, experiment="keys") as again:
        again.log_stats(table, step=3, name="loss by y", mode="train")
    assert metric_keys(url, again.run_id) == keys


def test_display_names_and_duplicate_display_names(mlflow_server):
    url = mlflow_server.url
    g = GroupedStats()
    g.update([0, 1, 2], [1.0, 2.0, 3.0])
    with MLflowSink(url, experiment="names", label_names={0: "cat", 1: "cat", 2: "dog/wolf"}) as sink:
        sink.log_stats(g.compute(), step=0, name="ce", mode="train")
    run_id = sink.run_id  # after close: inside, it waits only `timeout` for the run
    means = {k: v for k, v in ((k, history(url, run_id, k)) for k in metric_keys(url, run_id)) if k.endswith("/mean")
             and SUMMARY not in k}
    assert sorted(v[0][1] for v in means.values()) == [1.0, 2.0, 3.0]  # two "cat"s did not collide
    assert mlflow_key("ce", "train", "cat (0)", "mean") in means and mlflow_key("ce", "train", "cat (1)", "mean") in means
    assert mlflow_key("ce", "train", "dog/wolf", "mean") in means


def test_images_logged_at_steps(mlflow_server):
    url = mlflow_server.url
    with MLflowSink(url, experiment="images") as sink:
        for step in (1, 4):
            fig = figure(step)
            sink.log_figure(fig, step=step, name="ce_std_band", mode="eval")
    run_id = sink.run_id  # after close: inside, it waits only `timeout` for the run
    files = artifacts(url, run_id, "images")
    png = sorted(f for f in files if f.endswith(".png"))
    webp = [f for f in files if f.endswith("+compressed.webp")]
    assert len(png) == 2 and len(webp) == 2
    assert [p.split("+step+")[1].split("+")[0] for p in png] == ["1", "4"]
    assert all(p.startswith("images/ce_std_band~eval~figure+step+") for p in png)
    from PIL import Image

    img = Image.open(io.BytesIO(get_artifact(url, run_id, png[0])))
    assert img.size == (150, 100)
    tags = {t["key"]: t["value"] for t in get_run(url, run_id)["data"]["tags"]}
    assert tags["mlflow.loggedImages"].lower() == "true"


def test_label_budget_logs_aggregates_and_csv_table(mlflow_server):
    url = mlflow_server.url
    labels = np.repeat(np.arange(30), 3)
    values = labels + np.tile([0.0, 1.0, 2.0], 30)
    g = GroupedStats()
    g.update(labels, values)
    table = g.compute()
    names = {29: "z", 7: "seven"}
    with MLflowSink(url, experiment="budget", label_budget=5, label_names=names) as sink:
        sink.log_stats(table, step=2, name="ce", mode="eval")
    run_id = sink.run_id  # after close: inside, it waits only `timeout` for the run
    keys = metric_keys(url, run_id)
    labelled = {k.split("/")[2] for k in keys if SUMMARY not in k}
    assert labelled == {"z", "seven", "0", "1", "2"}  # label_names order first, then natural order
    assert {f"ce/eval/{SUMMARY}/{a}" for a in AGGREGATES} <= keys
    assert history(url, run_id, f"ce/eval/{SUMMARY}/num_labels") == [(2, 30.0)]
    assert artifacts(url, run_id, "tables") == ["tables/ce_eval_step2.csv"]
    import csv

    rows = list(csv.DictReader(io.StringIO(get_artifact(url, run_id, "tables/ce_eval_step2.csv").decode())))
    assert len(rows) == 30
    by_label = {r["label"]: r for r in rows}
    assert by_label["29"]["label_name"] == "z" and float(by_label["29"]["mean"]) == 30.0
    assert float(by_label["13"]["std"]) == pytest.approx(1.0) and by_label["13"]["count"] == "3"


def test_nan_stored_as_nan_and_inf_as_nan(mlflow_server):
    url = mlflow_server.url
    table = StatsTable(labels=[0, 1], count=[0, 2], mean=[math.nan, math.inf], std=[math.nan, 1.0],
                       min=[math.nan, -math.inf], max=[math.nan, math.inf], nonfinite=[4, 0])
    with MLflowSink(url, experiment="nan") as sink:
        sink.log_stats(table, step=0, name="ce", mode="train")
    run_id = sink.run_id  # after close: inside, it waits only `timeout` for the run
    assert math.isnan(history(url, run_id, "ce/train/0/mean")[0][1])
    assert history(url, run_id, "ce/train/0/count") == [(0, 0.0)]
    assert history(url, run_id, "ce/train/0/nonfinite") == [(0, 4.0)]
    assert math.isnan(history(url, run_id, "ce/train/1/max")[0][1])  # not 1.8e308
    assert math.isnan(history(url, run_id, "ce/train/1/min")[0][1])
    assert history(url, run_id, "ce/train/1/std") == [(0, 1.0)]


def test_joins_the_active_run_and_leaves_it_running(mlflow_server, monkeypatch):
    import mlflow

    url = mlflow_server.url
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # the user's choice; restored after the test
    g = GroupedStats()
    g.update([0], [1.5])
    with mlflow.start_run() as active:
        with MLflowSink() as sink:
            assert sink.run_id == active.info.run_id and sink.tracking_uri == url
            sink.log_stats(g.compute(), step=1, name="ce", mode="train")
        assert get_run(url, active.info.run_id)["info"]["status"] == "RUNNING"
        assert mlflow.get_tracking_uri() == url
    assert history(url, active.info.run_id, "ce/train/0/mean") == [(1, 1.5)]
    assert get_run(url, active.info.run_id)["info"]["status"] == "FINISHED"  # ended by the user


def test_explicit_run_id_is_used_and_not_ended(mlflow_server):
    from mlflow import MlflowClient

    url = mlflow_server.url
    client = MlflowClient(url)
    run = client.create_run(client.create_experiment(f"explicit-{time.time_ns()}"))
    g = GroupedStats()
    g.update([0], [2.0])
    with MLflowSink(url, run_id=run.info.run_id) as sink:
        sink.log_stats(g.compute(), step=0, name="ce", mode="train")
    assert history(url, run.info.run_id, "ce/train/0/mean") == [(0, 2.0)]
    assert get_run(url, run.info.run_id)["info"]["status"] == "RUNNING"


def test_embedded_sqlite_default_in_cwd(tmp_path):
    from mlflow import MlflowClient

    g = GroupedStats()
    g.update([0, 0, 1], [1.0, 3.0, 5.0])
    sink = MLflowSink(experiment="embedded")
    assert sink.tracking_uri == f"sqlite:///{(tmp_path / 'mlflow.db').resolve().as_posix()}"
    sink.log_stats(g.compute(), step=7, name="ce", mode="train")
    sink.close()
    client = MlflowClient(sink.tracking_uri)
    assert [(m.step, m.value) for m in client.get_metric_history(sink.run_id, "ce/train/0/mean")] == [(7, 2.0)]
    assert client.get_run(sink.run_id).info.status == "FINISHED"
    assert client.get_experiment_by_name("embedded").experiment_id == client.get_run(sink.run_id).info.experiment_id
    assert not (tmp_path / "labeltrack-spool").exists()


def test_failed_block_ends_the_run_failed(mlflow_server):
    url = mlflow_server.url
    with pytest.raises(RuntimeError, match="boom"):
        with MLflowSink(url, experiment="failed") as sink:
            raise RuntimeError("boom")
    assert get_run(url, sink.run_id)["info"]["status"] == "FAILED"
    sink.close()  # idempotent


@pytest.mark.parametrize("uri", ["htp:/x", "not a uri", "http:/x", "http://", "C:\\runs", "http://host:99999"])
def test_malformed_tracking_uri_fails_at_construction(uri):
    start = time.monotonic()
    with pytest.raises(ConfigError, match="tracking_uri: expected a URI"):
        MLflowSink(uri)
    assert time.monotonic() - start < 5


def test_unknown_run_and_experiment_fail_at_construction(mlflow_server, tmp_path):
    with pytest.raises(ConfigError, match="run_id: expected the id of an existing run.*'0123456789abcdef'"):
        MLflowSink(mlflow_server.url, run_id="0123456789abcdef")
    with pytest.raises(ConfigError, match="experiment_id: expected the id of an existing experiment, got '987654'"):
        MLflowSink(mlflow_server.url, experiment_id="987654")
    with pytest.raises(ConfigError, match="directory of the sqlite database"):
        MLflowSink(f"sqlite:///{tmp_path}/missing/dir/mlflow.db")
    with pytest.raises(ConfigError, match="expected experiment or experiment_id, got both"):
        MLflowSink(mlflow_server.url, experiment="a", experiment_id="0")
    with pytest.raises(ConfigError, match="timeout: expected a positive number of seconds, got 0"):
        MLflowSink(mlflow_server.url, timeout=0)
    with pytest.raises(ConfigError, match="delivery: expected one of 'auto', 'process', 'inline', got 'thread'"):
        MLflowSink(mlflow_server.url, delivery="thread")
    with pytest.raises(ConfigError, match="delivery='process' creates its own run.*got run_id='abc'"):
        MLflowSink(mlflow_server.url, run_id="abc", delivery="process")


@pytest.mark.parametrize("delivery", ["process", "inline"])
def test_pickle_drops_the_client_and_logs_to_the_same_run(mlflow_server, delivery):
    url = mlflow_server.url
    g = GroupedStats()
    g.update([0], [1.0])
    sink = MLflowSink(url, experiment="pickle", delivery=delivery)
    sink.log_stats(g.compute(), step=0, name="ce", mode="train")
    assert (sink._client is not None) == (delivery == "inline")  # process delivery: no client in this process
    run_id = open_run_id(sink)  # the copy joins the run; pickling waits only `timeout` for it
    copy = pickle.loads(pickle.dumps(sink))
    assert copy._client is None and copy.run_id == run_id and copy.delivery == delivery
    g.update([0], [3.0])
    copy.log_stats(g.compute(), step=1, name="ce", mode="train")
    copy.close()
    assert get_run(url, sink.run_id)["info"]["status"] == "RUNNING"  # a copy never ends the run
    sink.close()
    assert sorted(history(url, sink.run_id, "ce/train/0/mean")) == [(0, 1.0), (1, 2.0)]
    assert get_run(url, sink.run_id)["info"]["status"] == "FINISHED"


def test_bad_step_and_closed_sink_are_clear_errors(mlflow_server, caplog):
    sink = MLflowSink(mlflow_server.url, experiment="errors")
    with pytest.raises(TypeError, match="step: expected a non-negative int, got float 1.5"):
        sink.log_stats(StatsTable.empty(), step=1.5, name="ce", mode="train")
    sink.close()
    with pytest.raises(ValueError, match="closed"):
        sink.log_stats(StatsTable.empty(), step=1, name="ce", mode="train")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_make_sinks_builds_the_mlflow_sink(mlflow_server):
    from labeltrack_log.sinks import make_sinks

    (sink,) = make_sinks({"type": "mlflow", "tracking_uri": mlflow_server.url, "experiment": "config", "label_budget": 3})
    assert isinstance(sink, MLflowSink) and sink.label_budget == 3
    sink.close()
    assert get_run(mlflow_server.url, sink.run_id)["info"]["status"] == "FINISHED"
    assert not list(Path.cwd().glob("labeltrack-spool/*"))


def test_bad_sqlite_destination_fails_at_construction(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "a-dir.db").mkdir()
    with pytest.raises(ConfigError, match=r"directory of the sqlite database '.*a-file/mlflow.db' is not a directory"):
        MLflowSink(f"sqlite:///{(tmp_path / 'a-file').as_posix()}/mlflow.db")
    with pytest.raises(ConfigError, match=r"sqlite database '.*a-dir.db': expected a database file, got a directory"):
        MLflowSink(f"sqlite:///{(tmp_path / 'a-dir.db').as_posix()}")
    with pytest.raises(ConfigError, match="directory of the sqlite database .* does not exist"):
        MLflowSink(f"sqlite:///{(tmp_path / 'missing').as_posix()}/mlflow.db")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-dir.db", "a-file"]  # nothing created


def test_explicit_ids_are_checked_at_construction_on_sqlite(tmp_path, monkeypatch):
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    with pytest.raises(ConfigError, match="run_id: expected the id of an existing run.*'0123456789abcdef'"):
        MLflowSink(uri, run_id="0123456789abcdef")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "987654")  # an id from the environment is checked too
    with pytest.raises(ConfigError, match="experiment_id: expected the id of an existing experiment, got '987654'"):
        MLflowSink(uri)


@pytest.mark.parametrize("delivery", ["process", "inline"])
@pytest.mark.parametrize("raised, status", [(SystemExit(0), "FINISHED"), (SystemExit(None), "FINISHED"),
                                            (SystemExit(3), "FAILED"), (SystemExit("bad config"), "FAILED"),
                                            (KeyboardInterrupt(), "KILLED"), (ValueError("x"), "FAILED")],
                         ids=["exit0", "exitNone", "exit3", "exit-message", "ctrl-c", "exception"])
def test_the_run_status_tells_how_the_block_ended(mlflow_server, delivery, raised, status):
    url = mlflow_server.url
    with pytest.raises(type(raised)):
        with MLflowSink(url, experiment="status", delivery=delivery) as sink:
            sink.log_stats(StatsTable(np.array([0]), np.array([1]), np.array([1.0]), np.array([0.0]), np.array([1.0]),
                                      np.array([1.0]), np.array([0])), step=0, name="ce", mode="train")
            raise raised
    assert get_run(url, sink.run_id)["info"]["status"] == status


def test_close_with_a_status_ends_the_run_with_it(mlflow_server):
    sink = MLflowSink(mlflow_server.url, experiment="status")
    sink.close(status="KILLED")
    assert sink.end_status == "KILLED"
    assert get_run(mlflow_server.url, sink.run_id)["info"]["status"] == "KILLED"
    with pytest.raises(ConfigError, match=r"status: expected one of .*'KILLED'.*, got 'DONE'"):
        MLflowSink(mlflow_server.url, experiment="status").close(status="DONE")


@pytest.mark.parametrize("delivery", ["process", "inline"])
def test_the_run_tags_name_every_tracked_name_it_holds(mlflow_server, delivery):
    url = mlflow_server.url
    g = GroupedStats()
    g.update([0, 1], [1.0, 2.0])
    with MLflowSink(url, experiment="names", run_name="one-training", delivery=delivery) as sink:
        sink.log_stats(g.compute(), step=0, name="loss_by_y", mode="train")
        sink.flush()
        if delivery == "inline":
            tags = {t["key"]: t["value"] for t in get_run(url, sink.run_id)["data"]["tags"]}
            assert tags["labeltrack.names"] == "loss_by_y"
        sink.log_stats(g.compute(), step=0, name="acc_by_y", mode="eval")
        sink.log_stats(g.compute(), step=1, name="loss_by_y", mode="train")
    run = get_run(url, sink.run_id)
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["labeltrack.names"] == "loss_by_y,acc_by_y"
    assert run["info"]["run_name"] == "one-training"
    assert history(url, sink.run_id, "acc_by_y/eval/1/mean") == [(0, 2.0)]
