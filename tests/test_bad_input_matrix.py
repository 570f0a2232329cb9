"""The bad-input matrix of the reliability issue, through the whole stack: the FastEstimator trace
fed batch by batch (as FE's Estimator does) with real CSV, JSONL, TensorBoard and image sinks.

Wrong input gets an error that says what to pass instead; legitimate input gets correct numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastestimator")
import torch  # noqa: E402
from fastestimator.test.unittest_util import sample_system_object  # noqa: E402
from fastestimator.util.data import Data  # noqa: E402

from labeltrack_log import InputShapeError, InputTypeError, StatsHistory  # noqa: E402
from labeltrack_log.fastestimator import LabelTracker  # noqa: E402
from labeltrack_log.sinks.files import CSVSink, ImageDirSink, JSONLSink  # noqa: E402
from labeltrack_log.sinks.tensorboard import TensorBoardSink  # noqa: E402
from tables import mode_dir  # noqa: E402  (tests/ is on sys.path, see conftest.py)


def run_epoch(tracker: LabelTracker, batches, step: int = 10) -> Data:
    system = sample_system_object()
    tracker.system = system
    system.mode = "eval"
    system.global_step = step
    system.epoch_idx = 1
    tracker.on_begin(Data())
    tracker.on_epoch_begin(Data())
    for y, m in batches:
        tracker.on_batch_end(Data({"y": y, "ce": m}))
    tracker.on_epoch_end(Data())
    out = Data()
    tracker.on_end(out)
    return out


def csv_history(path: Path) -> StatsHistory:
    return StatsHistory.from_file(path)


# ------------------------------------------------------------- wrong input: clear errors
@pytest.mark.parametrize(
    ("y", "m", "exc", "match"),
    [
        pytest.param(torch.tensor([0, 1, 1, 2]), torch.tensor([0.1, 0.2, 0.3]), InputShapeError,
                     "got 4 labels and 3 values", id="length-mismatch"),
        pytest.param(torch.tensor([0, 1, 1]), torch.tensor(0.7), InputShapeError,
                     r"got a scalar \(0-d\): a batch mean\. In FastEstimator.*average_loss=False", id="scalar-metric"),
        pytest.param(torch.tensor([0, 1]), torch.ones(2, 3), InputShapeError,
                     r"values: expected a 1-D array .* got shape \(2, 3\)", id="2d-values"),
        pytest.param(torch.tensor([0.5, 1.0]), torch.tensor([0.1, 0.2]), InputTypeError,
                     r"non-integer .* value 0\.5\. Pass integer class ids", id="non-integral-float-labels"),
    ],
)
def test_wrong_input_is_a_clear_error(tmp_path: Path, y, m, exc, match):
    tracker = LabelTracker("y", "ce", sinks=[CSVSink(tmp_path / "s.csv")])
    with pytest.raises(exc, match=match):
        run_epoch(tracker, [(y, m)])


# ---------------------------------------------------------- legitimate input: right numbers
def test_nan_and_inf_values_are_counted_and_excluded(tmp_path: Path):
    tracker = LabelTracker("y", "ce", bounds="range", sinks=[CSVSink(tmp_path / "s.csv")])
    run_epoch(tracker, [(torch.tensor([0, 0, 0, 1]), torch.tensor([1.0, float("nan"), 3.0, float("inf")]))])
    table = csv_history(tmp_path / "s.csv").latest()
    assert (table[0].count, table[0].mean, table[0].nonfinite) == (2, 2.0, 1)
    assert table[1].count == 0 and table[1].nonfinite == 1 and math.isnan(table[1].mean)


def test_empty_batches_and_an_empty_epoch(tmp_path: Path):
    tracker = LabelTracker("y", "ce", sinks=[CSVSink(tmp_path / "s.csv")])
    out = run_epoch(tracker, [(torch.tensor([], dtype=torch.long), torch.tensor([])),
                              (torch.tensor([3]), torch.tensor([0.5]))])
    assert csv_history(tmp_path / "s.csv").latest()[3].mean == 0.5
    assert [s.name for s in out["ce_by_y"]] == [3]
    empty = LabelTracker("y", "ce", sinks=[CSVSink(tmp_path / "e.csv")])
    out = run_epoch(empty, [])  # an epoch with no batches at all
    assert out["ce_by_y"] == []
    assert (tmp_path / "e.csv").read_text().count("\n") <= 1  # header only: nothing made up


def test_labels_not_in_label_mapping_are_not_reported(tmp_path: Path):
    tracker = LabelTracker("y", "ce", label_mapping={"cat": 0, "dog": 2}, sinks=[CSVSink(tmp_path / "s.csv")])
    out = run_epoch(tracker, [(torch.tensor([0, 1, 2, 2, 7]), torch.tensor([1.0, 5.0, 2.0, 4.0, 9.0]))])
    table = csv_history(tmp_path / "s.csv").latest()
    assert table.labels.tolist() == [0, 2] and table[2].mean == 3.0
    assert sorted(s.name for s in out["ce_by_y"]) == ["cat", "dog"]


def test_integral_float_labels_are_class_ids(tmp_path: Path):
    tracker = LabelTracker("y", "ce", sinks=[CSVSink(tmp_path / "s.csv")])
    run_epoch(tracker, [(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([2.0, 3.0, 4.0]))])
    table = csv_history(tmp_path / "s.csv").latest()
    assert table.labels.tolist() == [0, 1] and table[1].mean == 3.0


def test_string_labels(tmp_path: Path):
    tracker = LabelTracker("y", "ce", sinks=[JSONLSink(tmp_path / "s.jsonl")])
    out = run_epoch(tracker, [(np.array(["dog", "cat", "dog"]), np.array([1.0, 2.0, 3.0]))])
    table = csv_history(tmp_path / "s.jsonl").latest()
    assert table.labels.tolist() == ["cat", "dog"] and table["dog"].mean == 2.0
    assert sorted(s.name for s in out["ce_by_y"]) == ["cat", "dog"]


def test_hundred_thousand_distinct_labels(tmp_path: Path):
    rng = np.random.default_rng(0)
    labels = rng.permutation(100_000).repeat(3)
    values = rng.random(len(labels)).astype(np.float32)
    batches = [(labels[i : i + 1024], values[i : i + 1024]) for i in range(0, len(labels), 1024)]
    tracker = LabelTracker("y", "ce", figures="end",
                           sinks=[CSVSink(tmp_path / "s.csv"), TensorBoardSink(tmp_path / "runs", label_budget=50)])
    run_epoch(tracker, batches)
    table = csv_history(tmp_path / "s.csv").latest()
    assert len(table) == 100_000 and (table.count == 3).all()
    probe = int(labels[4242])
    expected = values[labels == probe].astype(np.float64)
    assert table[probe].mean == pytest.approx(expected.mean()) and table[probe].std == pytest.approx(expected.std(ddof=1))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(mode_dir(tmp_path / "runs", "eval")), size_guidance={"scalars": 0, "images": 0}).Reload()
    per_label = {t.split("/")[1] for t in acc.Tags()["scalars"] if "/_summary/" not in t}
    assert len(per_label) == 50  # the label budget, not 100,000 series
    assert acc.Scalars("ce_by_y/_summary/num_labels")[0].value == 100_000
    assert acc.Tags()["images"]  # the figure (heatmap layout) was rendered and logged


def test_unicode_and_path_like_label_names_stay_inside(tmp_path: Path):
    names = {"../x": 0, "a/b": 1, "C:\\x": 2, "ünï 标签": 3, "$\\mu$": 4}
    out_dir = tmp_path / "out"
    sinks = [CSVSink(out_dir / "s.csv"), TensorBoardSink(out_dir / "runs"), ImageDirSink(out_dir / "images")]
    tracker = LabelTracker("y", "ce", label_mapping=names, sinks=sinks, figures="end")
    run_epoch(tracker, [(torch.tensor([0, 1, 2, 3, 4, 4]), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 7.0]))])
    created = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert created and all(out_dir in p.parents for p in created)
    history = csv_history(out_dir / "s.csv")
    assert history.label_names == {v: k for k, v in names.items()}  # display names kept verbatim
    assert history.latest()[4].mean == 6.0
    assert len(list((out_dir / "images").glob("*.png"))) == 1
