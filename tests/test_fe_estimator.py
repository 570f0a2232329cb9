"""Real FastEstimator fits (PyTorch and TensorFlow backends) on sklearn digits with the tracker:
TensorBoard event files, the MLflow run and FE's ImageSaver PNG are read back; FE's own
LabelTracker runs in the same fit for parity; a failing sink does not stop training."""

from __future__ import annotations

import csv
import logging
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

fe = pytest.importorskip("fastestimator")
from fastestimator.op.tensorop.loss import CrossEntropy  # noqa: E402
from fastestimator.op.tensorop.model import ModelOp, UpdateOp  # noqa: E402
from fastestimator.summary.summary import ValWithError  # noqa: E402
from fastestimator.trace.xai import LabelTracker as FELabelTracker  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from test_fe_parity import assert_same_summaries  # noqa: E402

from labeltrack_log.fastestimator import LabelTracker  # noqa: E402
from labeltrack_log.naming import SUMMARY, figure_name, mlflow_key, tb_item_tag, tb_tag  # noqa: E402
from labeltrack_log.sinks import Sink  # noqa: E402
from tables import mode_dir  # noqa: E402  (tests/ is on sys.path, see conftest.py)

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
import fe_torch_digits  # noqa: E402

NAME = "ce_by_digit"
STD = "sample_ce ($\\mu \\pm \\sigma$)"
MAPPING = {"zero": 0, "three": 3, "eight": 8}  # only these are reported, under these names


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def by_text(tracker: LabelTracker) -> dict:
    """FE history of each reported label, keyed by the label text the sinks use."""
    return {str(s.name): s.history for s in tracker.label_summaries.values()}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def check_tensorboard(logdir: Path, history: dict, modes) -> None:
    names = sorted(history)
    for mode in modes:
        acc = events(mode_dir(logdir, mode))  # the fit's own run directory
        tags = acc.Tags()["scalars"]
        assert {t.split("/")[1] for t in tags if t.startswith(NAME + "/")} == {*names, SUMMARY}
        for label in names:
            expected = history[label][mode][STD]
            points = acc.Scalars(tb_tag(NAME, label, "mean"))
            assert [p.step for p in points] == list(expected)  # FE's global_step at each epoch end
            assert [p.value for p in points] == pytest.approx([v.y for v in expected.values()], rel=1e-6)
            lower = acc.Scalars(tb_tag(NAME, label, "mean-std"))
            assert [p.value for p in lower] == pytest.approx([v.y_min for v in expected.values()], rel=1e-5, abs=1e-6)
        last = max(history[names[0]][mode][STD])
        for bound in ("std", "range"):
            images = acc.Images(tb_item_tag(figure_name(NAME, bound), "figure"))
            assert [im.step for im in images] == [last]  # figures="end": once, at the last step
            assert images[0].width > 300 and images[0].encoded_image_string[:4] == b"\x89PNG"


def check_mlflow(uri: str, experiment: str, history: dict, modes) -> None:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    for mode in modes:
        for label in history:
            expected = history[label][mode][STD]
            points = sorted(client.get_metric_history(run_id, mlflow_key(NAME, mode, label, "mean")), key=lambda m: m.step)
            assert [p.step for p in points] == list(expected)
            assert [p.value for p in points] == pytest.approx([v.y for v in expected.values()], rel=1e-12)
    images = [f.path for f in client.list_artifacts(run_id, "images")]
    for mode in modes:
        for bound in ("std", "range"):
            prefix = f"images/{figure_name(NAME, bound)}~{mode}~figure+step+"
            assert sum(p.startswith(prefix) and p.endswith(".png") for p in images) == 1, images


def test_torch_fit_tensorboard_mlflow_and_image_saver(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sinks = [{"type": "tensorboard", "logdir": str(tmp_path / "runs")},
             {"type": "mlflow", "tracking_uri": uri, "experiment": "fe-torch"}]
    estimator, tracker = fe_torch_digits.build_estimator(
        epochs=3, sinks=sinks, subsample=500, image_dir=str(tmp_path), tracker_mode=["train", "eval"],
        label_mapping=MAPPING, bounds=["std", "range", None])
    estimator.fit()

    # FE's output: one Summary per mapped label, every key of the three bounds, every epoch
    assert sorted(s.name for s in tracker.label_summaries.values()) == sorted(MAPPING)
    history = by_text(tracker)
    steps = list(history["zero"]["eval"][STD])
    assert len(steps) == 3 and steps[-1] == estimator.system.global_step
    for label_history in history.values():
        assert list(label_history["train"]) == [STD, "sample_ce ($min, \\mu, max$)", "sample_ce"]
        assert all(isinstance(v, ValWithError) for v in label_history["train"][STD].values())
    assert estimator.system.custom_graphs[NAME] == list(tracker.label_summaries.values())

    check_tensorboard(tmp_path / "runs", history, ("train", "eval"))
    check_mlflow(uri, "fe-torch", history, ("train", "eval"))
    width, height = png_size(tmp_path / f"{NAME}_train_epoch_3.png")  # FE's ImageSaver drew our output
    assert width > 1000 and height > 500
    assert tracker._sinks is None  # closed at the end


def test_tf_fit_tensorboard_mlflow_and_image_saver(tmp_path: Path):
    import fe_tf_digits

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sinks = [{"type": "tensorboard", "logdir": str(tmp_path / "runs")},
             {"type": "mlflow", "tracking_uri": uri, "experiment": "fe-tf"}]
    estimator, tracker = fe_tf_digits.build_estimator(
        epochs=2, sinks=sinks, subsample=400, image_dir=str(tmp_path), tracker_mode=["train", "eval"],
        bounds=["std", "range"])
    estimator.fit()

    assert sorted(s.name for s in tracker.label_summaries.values()) == list(range(10))
    history = by_text(tracker)
    assert list(history["0"]["eval"][STD])[-1] == estimator.system.global_step
    check_tensorboard(tmp_path / "runs", history, ("train", "eval"))
    check_mlflow(uri, "fe-tf", history, ("train", "eval"))
    assert png_size(tmp_path / f"{NAME}_train_epoch_2.png")[0] > 1000


def test_same_output_as_fe_label_tracker_in_one_fit_with_ds_ids():
    """Both trackers in the same real fit see the same tensors; two eval datasets test ds_id."""
    train, eval_a = fe_torch_digits.digits_data(subsample=400)
    eval_b = eval_a.split(0.5)  # moves half of eval_a into eval_b
    model = fe.build(model_fn=fe_torch_digits.mlp, optimizer_fn="adam")
    network = fe.Network(ops=[
        ModelOp(model=model, inputs="x", outputs="y_pred"),
        CrossEntropy(inputs=("y_pred", "y"), outputs="ce", from_logits=True),
        CrossEntropy(inputs=("y_pred", "y"), outputs="sample_ce", from_logits=True, average_loss=False),
        UpdateOp(model=model, loss_name="ce"),
    ])
    pairs = {}
    for key, kwargs in {
        "all": dict(mode=["train", "eval"], bounds=["std", "range", None], label_mapping={"one": 1, "seven": 7}),
        "a": dict(mode="eval", ds_id="a", bounds="range"),
        "not_a": dict(mode="eval", ds_id="!a", bounds="std"),
    }.items():
        pairs[key] = (FELabelTracker("y", "sample_ce", outputs=f"fe_{key}", **kwargs),
                      LabelTracker("y", "sample_ce", outputs=f"lt_{key}", **kwargs))
    estimator = fe.Estimator(pipeline=fe.Pipeline(train_data=train, eval_data={"a": eval_a, "b": eval_b}, batch_size=32),
                             network=network, epochs=2, traces=[t for pair in pairs.values() for t in pair], log_steps=0)
    estimator.fit()
    graphs = estimator.system.custom_graphs
    for key in pairs:
        assert_same_summaries(graphs[f"fe_{key}"], graphs[f"lt_{key}"])
    count = {key: sum(1 for _ in graphs[f"lt_{key}"]) for key in ("a", "not_a")}
    assert count["a"] and count["not_a"]
    a = {s.name: s.history["eval"]["sample_ce ($min, \\mu, max$)"] for s in graphs["lt_a"]}
    b = {s.name: s.history["eval"]["sample_ce ($\\mu \\pm \\sigma$)"] for s in graphs["lt_not_a"]}
    shared = sorted(set(a) & set(b))
    assert any(a[k][max(a[k])].y != b[k][max(b[k])].y for k in shared)  # different datasets, different numbers


class ExplodingSink(Sink):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.where, self.calls = where, 0

    def log_stats(self, table, *, step, name, mode):
        self.calls += 1
        if self.where == "log_stats":
            raise RuntimeError("disk on fire")

    def log_figure(self, figure, *, step, name, mode):
        if self.where == "log_figure":
            raise OSError("no space left")

    def __repr__(self) -> str:
        return f"ExplodingSink({self.where!r})"


def test_failing_sinks_never_stop_training(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="labeltrack_log")
    bad_stats, bad_figure = ExplodingSink("log_stats"), ExplodingSink("log_figure")
    sinks = [bad_stats, bad_figure, {"type": "csv", "path": str(tmp_path / "stats.csv")}]
    estimator, tracker = fe_torch_digits.build_estimator(epochs=3, sinks=sinks, subsample=300,
                                                          tracker_mode=["train", "eval"], figures="epoch")
    estimator.fit()  # completes

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2, [r.getMessage() for r in errors]  # once per failing sink, not once per epoch
    stats_error = next(r for r in errors if "ExplodingSink('log_stats')" in r.getMessage())
    assert "log_stats()" in stats_error.getMessage() and "skipped for the rest of training" in stats_error.getMessage()
    assert stats_error.exc_info and "disk on fire" in str(stats_error.exc_info[1])
    figure_error = next(r for r in errors if "ExplodingSink('log_figure')" in r.getMessage())
    assert isinstance(figure_error.exc_info[1], OSError)
    assert bad_stats.calls == 1  # skipped after its first failure
    assert bad_figure.calls == 1  # its figure of epoch 1 (train) failed: not called again
    with (tmp_path / "stats.csv").open(newline="") as fh:  # the healthy sink got every epoch
        rows = list(csv.DictReader(fh))
    steps = list(next(iter(tracker.label_summaries.values())).history["train"][STD])
    assert len(steps) == 3
    assert {(r["mode"], int(r["step"])) for r in rows} == {(mode, step) for mode in ("train", "eval") for step in steps}
    assert estimator.system.custom_graphs[NAME]  # FE output intact
    assert np.isfinite([s.history["eval"][STD][estimator.system.global_step].y
                        for s in estimator.system.custom_graphs[NAME]]).all()
